"""`dgaug train`'s config: a manifest's `train:` section, or --set and path options alone."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from dgaug.job.manifest import Manifest, ManifestError, apply_overrides, validation_problems
from dgaug.trainer.config import TrainConfig


class _TrainOnly(BaseModel):
    """A bare train section, validated so that error paths read `train.field`."""

    model_config = ConfigDict(extra="forbid")
    train: TrainConfig


def _validate(section: dict[str, Any]) -> TrainConfig:
    try:
        return _TrainOnly.model_validate({"train": section}).train
    except ValidationError as e:
        raise ManifestError(validation_problems(e)) from None


def _with_options(section: dict[str, Any], options: dict[str, Any]) -> TrainConfig:
    """Apply --mode, --real, ... (dotted keys; they win over the manifest) and validate."""
    for key, value in options.items():
        if value is None:
            continue
        node = section
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return _validate(section)


def config_from_manifest(m: Manifest, options: dict[str, Any]) -> TrainConfig:
    """The manifest's `train:` section, with what it leaves unset taken from the run's outputs:
    the real and ED-SAM shards, features and LDFS files of the stages the manifest runs, the
    synthetic source's evaluation folder, and OUTPUT/train/<mode> for checkpoints and results."""
    from dgaug.core.storage import Storage

    storage = Storage(m.output)
    if not storage.is_local:
        raise ManifestError([f"output: {m.output}: the trainer reads local folders only"])
    section = m.train.model_dump(mode="json", exclude_unset=True) if m.train else {}
    cfg = _with_options(section, options)
    data = cfg.data.model_copy()
    stages = m.stages
    if data.real is None and stages.download.enabled:
        data.real = storage.path("real")
    if data.edsam is None and stages.edsam is not None and stages.edsam.enabled:
        data.edsam = storage.path("edsam")
    if data.features is None and stages.features is not None and stages.features.enabled:
        data.features = storage.path("features")
    if data.ldfs is None and stages.ldfs is not None and stages.ldfs.enabled:
        data.ldfs = storage.path("ldfs")
    update: dict[str, Any] = {"data": data}
    src = m.source
    if cfg.eval.path is None and getattr(src, "eval_images", 0):
        # The synthetic source's held-out image folder (see `eval_images`).
        update["eval"] = cfg.eval.model_copy(update={"path": storage.path("eval/images")})
    if cfg.output is None:
        update["output"] = storage.path(f"train/{cfg.mode}")
    return cfg.model_copy(update=update)


def config_from_options(overrides: list[str], options: dict[str, Any]) -> TrainConfig:
    """No manifest: the config from --set train.FIELD=VALUE and the path options alone."""
    data = apply_overrides({}, overrides)
    other = sorted(set(data) - {"train"})
    if other:
        raise ManifestError(
            [f"--set {k}.…: without a manifest only train.* fields can be set" for k in other]
        )
    return _with_options(data.get("train") or {}, options)
