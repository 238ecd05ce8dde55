"""The embedded demo end to end: `dgaug run manifests/demo.yaml` offline, then again as a no-op."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import webdataset as wds
from typer.testing import CliRunner

from dgaug.cli.app import app
from tests.helpers import REPO

DEMO = REPO / "manifests/demo.yaml"


def test_demo_runs_end_to_end_then_is_a_no_op(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(DEMO), "--set", f"output={out}"])
    assert r.exit_code == 0, r.output
    assert f"{out}/real/" in r.output, "the demo says where its shards are"

    sizes = json.loads((out / "real/sizes.json").read_text())
    assert len(sizes) == 8 and sum(sizes.values()) == 384
    urls = [str(out / "real" / name) for name in sorted(sizes)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 384
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 384 and all(k.isdigit() for k in keys)
    meta = json.loads(samples[0]["json"])
    assert meta["domain"] in {"photo", "sketch", "cartoon", "painting"} and meta["label"]
    assert samples[0]["txt"].decode().strip()

    tars = {p.name: p.read_bytes() for p in (out / "real").glob("*.tar")}
    r = runner.invoke(app, ["run", str(DEMO), "--set", f"output={out}"])
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in (out / "real").glob("*.tar")} == tars
    r = runner.invoke(app, ["status", str(DEMO), "--set", f"output={out}"])
    assert r.exit_code == 0 and "8/8" in r.output


@pytest.mark.ray
def test_demo_on_ray_gives_the_same_bytes_as_local(tmp_path: Path, ray_session) -> None:
    out = tmp_path / "demo-output"
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(DEMO), "--set", f"output={out}"])
    assert r.exit_code == 0, r.output
    local = {p.name: p.read_bytes() for p in (out / "real").glob("*") if p.is_file()}
    shutil.move(out, tmp_path / "local")

    r = runner.invoke(
        app,
        [
            "run",
            str(DEMO),
            "--set",
            f"output={out}",
            "--executor",
            "ray",
            "--set",
            "executor.resources.download={workers: 2, num_cpus: 0.5}",
        ],
    )
    assert r.exit_code == 0, r.output
    on_ray = {p.name: p.read_bytes() for p in (out / "real").glob("*") if p.is_file()}
    assert on_ray == local
    assert len([n for n in on_ray if n.endswith(".tar")]) == 8
