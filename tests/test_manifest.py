"""Manifest schema: every problem at once with its field path, overrides, safe YAML, shipped manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dgaug.job.manifest import (
    ManifestError,
    apply_overrides,
    dump_manifest,
    load_manifest,
    validate,
)
from tests.helpers import REPO, tiny_manifest_dict

SHIPPED = sorted((REPO / "manifests").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_manifests_validate(path: Path) -> None:
    m = load_manifest(path)
    assert m.output
    assert m.stages.download.enabled


def test_real_world_manifests_are_shipped() -> None:
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "cc3m.yaml", "cc12m.yaml", "laion400m.yaml"} <= names
    assert {"pacs.yaml", "officehome.yaml"} <= names  # class datasets, single-source


def test_every_problem_reported_with_its_path(tmp_path: Path) -> None:
    bad = tiny_manifest_dict(tmp_path)
    bad["shard_size"] = 0
    bad["seed"] = -1
    bad["colour"] = "blue"
    bad["stages"]["download"]["image_size"] = "big"
    bad["stages"]["download"]["threads"] = 0
    bad["stages"]["download"]["procesess"] = 2
    bad["executor"]["kind"] = "slurm"
    with pytest.raises(ManifestError) as exc:
        validate(bad)
    problems = exc.value.problems
    text = "\n".join(problems)
    for path in (
        "shard_size:",
        "seed:",
        "colour: unknown field",
        "stages.download.image_size:",
        "stages.download.threads:",
        "stages.download.procesess: unknown field",
        "executor.kind:",
    ):
        assert any(p.startswith(path) for p in problems), (path, text)
    assert len(problems) == 7


def test_source_kind_errors_name_the_user_path(tmp_path: Path) -> None:
    d = tiny_manifest_dict(tmp_path, source={"kind": "url_list", "input_format": "xlsx"})
    with pytest.raises(ManifestError) as exc:
        validate(d)
    problems = exc.value.problems
    assert any(p.startswith("source.path: ") for p in problems), problems
    assert any(p.startswith("source.input_format: ") for p in problems), problems
    with pytest.raises(ManifestError) as exc:
        validate(tiny_manifest_dict(tmp_path, source={"kind": "ftp"}))
    assert exc.value.problems[0].startswith("source: unknown kind 'ftp'")


def test_missing_required_fields(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as exc:
        validate({})
    assert {p.split(":")[0] for p in exc.value.problems} == {"output", "source"}


def test_resources_must_name_known_stages(tmp_path: Path) -> None:
    d = tiny_manifest_dict(tmp_path)
    d["executor"]["resources"] = {"dowload": {"workers": 2}}
    with pytest.raises(ManifestError) as exc:
        validate(d)
    assert "dowload" in str(exc.value)


def test_overrides_parse_values_as_yaml(tmp_path: Path) -> None:
    d = apply_overrides(
        tiny_manifest_dict(tmp_path),
        [
            "stages.download.threads=64",
            "stages.download.timeout=2.5",
            "executor.kind=ray",
            "executor.resources.download.workers=3",
            "source.classes=[circle, star]",
        ],
    )
    m = validate(d)
    assert m.stages.download.threads == 64
    assert m.stages.download.timeout == 2.5
    assert m.executor.kind == "ray"
    assert m.executor.resources["download"].workers == 3
    assert m.source.classes == ["circle", "star"]


def test_override_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as exc:
        apply_overrides(tiny_manifest_dict(tmp_path), ["seed", "seed.x=1", "a..b=2"])
    problems = exc.value.problems
    assert len(problems) == 3
    assert "expected key.path=value" in problems[0]
    assert "seed is a int, not a section" in problems[1]
    assert "empty field name" in problems[2]


def test_load_reports_yaml_syntax_with_line(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text("output: x\nsource:\n  kind: synthetic\n bad: [\n")
    with pytest.raises(ManifestError) as exc:
        load_manifest(p)
    assert "line" in str(exc.value)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text("output: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ManifestError) as exc:
        load_manifest(p)
    assert "not valid YAML" in str(exc.value)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ManifestError, match="mapping"):
        load_manifest(p)


def test_dump_round_trips(tmp_path: Path) -> None:
    m = validate(tiny_manifest_dict(tmp_path))
    again = validate(yaml.safe_load(dump_manifest(m)))
    assert again == m


def test_txt_url_lists_have_no_caption_column(tmp_path: Path) -> None:
    src = {"kind": "url_list", "path": "urls.txt", "input_format": "txt"}
    assert validate(tiny_manifest_dict(tmp_path, source=src)).source.caption_col is None
    with pytest.raises(ManifestError, match="txt url list has one url per line"):
        validate(tiny_manifest_dict(tmp_path, source={**src, "caption_col": "text"}))
