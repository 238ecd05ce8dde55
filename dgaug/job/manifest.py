"""The manifest: a typed description of one batch job, loaded from YAML and validated before any work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dgaug.core.errors import ManifestError
from dgaug.core.values import (
    MAX_DEPTH,
    check_protocols,
    join_loc,
    size_problem,
    url_secret,
    value_problems,
)
from dgaug.job.dg_config import DgConfig
from dgaug.job.view import MixConfig
from dgaug.pipeline.resources import ExecutorConfig, StageResources
from dgaug.sources import (  # the source kinds' schemas, read from here with the rest
    ImageFolderSource,  # noqa: F401
    ShardsSource,  # noqa: F401
    Source,
    SyntheticSource,  # noqa: F401
    UrlListSource,  # noqa: F401
)
from dgaug.stages.download.config import DownloadConfig
from dgaug.stages.edsam.config import EdsamConfig
from dgaug.stages.features.config import FeaturesConfig
from dgaug.stages.ldfs.config import LdfsConfig
from dgaug.trainer.config import TrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------- executor


# ----------------------------------------------------------------------------------------- stages


class StagesConfig(_Strict):
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    edsam: EdsamConfig | None = Field(None, description="ED-SAM sampling; absent: not run.")
    features: FeaturesConfig | None = Field(
        None, description="CLIP features of real and ED-SAM samples; absent: not run."
    )
    ldfs: LdfsConfig | None = Field(
        None, description="LDFS synthetic features of unseen domains; absent: not run."
    )


# --------------------------------------------------------------------------------------- manifest


class Manifest(_Strict):
    """One batch job: where data comes from, what each stage does, where shards go."""

    name: str | None = None
    output: str = Field(description="Output folder: local path or fsspec URL (s3://bucket/prefix).")
    seed: int = Field(0, ge=0, lt=2**63)
    shard_size: int = Field(10_000, ge=1, le=100_000, description="Samples per shard.")
    source: Source
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    mix: MixConfig | None = Field(
        None,
        description="Score thresholds for the ED-SAM samples in the mix/ open_clip view; "
        "absent: every sample is linked.",
    )
    train: TrainConfig | None = Field(
        None, description="`dgaug train MANIFEST`: the lightweight trainer; `dgaug run` ignores it."
    )
    dg: DgConfig | None = Field(
        None,
        description="`dgaug dg MANIFEST`: the domain-generalization sweep; `dgaug run` ignores it.",
    )

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return check_protocols(v)

    @model_validator(mode="after")
    def _resources_name_stages(self) -> Manifest:
        known = set(StagesConfig.model_fields)
        unknown = sorted(set(self.executor.resources) - known)
        if unknown:
            raise ValueError(
                f"executor.resources names unknown stage(s) {unknown}; known: {sorted(known)}"
            )
        return self

    @model_validator(mode="after")
    def _mix_needs_scores(self) -> Manifest:
        if self.mix is not None and self.mix.score_filter.active:
            edsam, features = self.stages.edsam, self.stages.features
            scored = edsam and edsam.enabled and features and features.enabled
            if not (scored and features.include_edsam):
                raise ValueError(
                    "mix thresholds read the ED-SAM samples' scores: the edsam stage and the "
                    "features stage (with include_edsam) must run"
                )
        return self

    def resources_for(self, stage: str, default: StageResources) -> StageResources:
        """The stage's defaults, with the fields the manifest sets for it replaced.

        Only the fields written count: `resources.edsam: {workers: 4}` keeps edsam's GPU.
        """
        given = self.executor.resources.get(stage)
        if given is None:
            return default
        return default.model_copy(update=given.model_dump(exclude_unset=True))


# ------------------------------------------------------------------------------------ load / save


def _format_loc(loc: tuple[Any, ...]) -> str:
    # Discriminated unions put the tag into the path (source.url_list.path); users wrote source.path.
    return join_loc(p for p in loc if p not in {"url_list", "image_folder", "shards", "synthetic"})


def validation_problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "union_tag_invalid":
            tag = e.get("ctx", {}).get("tag", e["input"])
            tag = "(a value holding credentials)" if url_secret(str(tag)) else repr(tag)
            msg = f"unknown kind {tag}; use url_list, image_folder, shards or synthetic"
        out.append(f"{_format_loc(tuple(e['loc']))}: {msg}")
    return out


def _shown(item: str) -> str:
    """An override as error messages show it: a value holding credentials is not repeated."""
    key, eq, value = item.partition("=")
    if not url_secret(value if eq else item):
        return item
    return f"{key}=(a value holding credentials)" if eq else "(an override holding credentials)"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML, so 0.3 is a float and [1,2] a list)."""
    if "=" not in item:
        raise ManifestError([f"--set {_shown(item)}: expected key.path=value"])
    key, _, raw = item.partition("=")
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ManifestError([f"--set {_shown(item)}: empty field name in {key!r}"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        detail = "" if url_secret(raw) else f" ({e})"
        raise ManifestError([f"--set {_shown(item)}: value is not valid YAML{detail}"]) from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    problems = []
    for item in overrides:
        try:
            path, value = parse_override(item)
        except ManifestError as e:
            problems.extend(e.problems)
            continue
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append(
                    f"--set {_shown(item)}: {'.'.join(path[: i + 1])} is a {type(nxt).__name__}, "
                    "not a section"
                )
                break
            node = nxt
        else:
            node[path[-1]] = value
    if problems:
        raise ManifestError(problems)
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError([f"manifest file not found: {p}"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError([f"cannot read manifest {p}: {e}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(
            [f"not valid YAML{where}: {getattr(e, 'problem', e)}"], str(p)
        ) from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ManifestError(
            [f"not valid YAML: nested deeper than {MAX_DEPTH} levels"], str(p)
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ManifestError([f"top level: must be a mapping, got {type(data).__name__}"], str(p))
    _check_size(data, str(p))
    return data


def _check_size(data: Any, source: str | None) -> None:
    problem = size_problem(data)
    if problem:
        raise ManifestError([problem], source)


def validate(data: dict[str, Any], source: str | None = None) -> Manifest:
    _check_size(data, source)  # again: `--set` values are YAML too
    values = value_problems(data)
    try:
        m = Manifest.model_validate(data)
    except ValidationError as e:
        problems = validation_problems(e)
        raise ManifestError(problems + [p for p in values if p not in problems], source) from None
    if values:
        raise ManifestError(values, source)
    return m


def load_manifest(path: str | os.PathLike, overrides: list[str] | None = None) -> Manifest:
    """Read, override and validate a manifest; raises ManifestError listing every problem."""
    data = read_yaml(path)
    data = apply_overrides(data, list(overrides or []))
    # Relative local paths stay relative to the current directory, as a shell user expects.
    return validate(data, str(path))


def dump_manifest(m: Manifest) -> str:
    """The resolved manifest as YAML, every default written out."""
    return yaml.safe_dump(m.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
