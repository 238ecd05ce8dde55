"""The `dgaug` command: exit codes scripts can use, clear errors without tracebacks, light start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dgaug.cli.app import app
from dgaug.core import errors as exitcodes
from dgaug.pipeline.lock import LOCK_REL
from dgaug.stages.download.stage import DownloadStage
from tests.helpers import REPO, tiny_manifest_dict

runner = CliRunner()


def write_manifest(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_help_and_status_do_not_import_heavy_libraries(tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "m.yaml", tiny_manifest_dict(tmp_path / "out"))
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from dgaug.cli.app import app\n"
        f"r1 = CliRunner().invoke(app, ['--help'])\n"
        f"r2 = CliRunner().invoke(app, ['status', {str(m)!r}])\n"
        "assert r1.exit_code == 0 and r2.exit_code == 4, (r1.output, r2.output)\n"
        "print(sorted(x for x in ('torch', 'ray', 'img2dataset', 'webdataset', 'diffusers')"
        " if x in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_teaches() -> None:
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for word in ("run", "status", "plan", "validate", "Exit codes", "manifests/demo.yaml"):
        assert word in r.output
    r = runner.invoke(app, ["run", "--help"])
    assert "--set" in r.output and "--force" in r.output and "--executor" in r.output


def test_invalid_manifest_lists_every_error_without_traceback(tmp_path: Path) -> None:
    bad = tiny_manifest_dict(tmp_path / "out", shard_size=-5, colour="red")
    bad["stages"]["download"]["threads"] = "many"
    m = write_manifest(tmp_path / "bad.yaml", bad)
    for cmd in ("validate", "run", "status", "plan"):
        r = runner.invoke(app, [cmd, str(m)])
        assert r.exit_code == exitcodes.INVALID, (cmd, r.output)
        assert "Traceback" not in r.output
        assert "shard_size:" in r.output
        assert "colour: unknown field" in r.output
        assert "stages.download.threads:" in r.output


def test_bad_override_and_missing_source(tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "m.yaml", tiny_manifest_dict(tmp_path / "out"))
    r = runner.invoke(app, ["validate", str(m), "--set", "stages.download.image_size=-1"])
    assert r.exit_code == exitcodes.INVALID
    assert "stages.download.image_size:" in r.output
    src = {"kind": "url_list", "path": str(tmp_path / "missing.tsv"), "input_format": "tsv"}
    m2 = write_manifest(tmp_path / "m2.yaml", tiny_manifest_dict(tmp_path / "o2", source=src))
    for cmd in ("validate", "run"):
        r = runner.invoke(app, [cmd, str(m2)])
        assert r.exit_code == exitcodes.INVALID, r.output
        assert "source.path: file not found" in r.output
        assert "Traceback" not in r.output
    r = runner.invoke(app, ["run", str(m), "--executor", "slurm"])
    assert r.exit_code == exitcodes.INVALID


def test_run_status_plan_and_refusals(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    m = write_manifest(tmp_path / "m.yaml", tiny_manifest_dict("out"))
    r = runner.invoke(app, ["plan", str(m)])
    assert r.exit_code == 0, r.output
    assert "download" in r.output and "real/" in r.output
    assert not (tmp_path / "out/real").exists(), "plan writes nothing"

    r = runner.invoke(app, ["run", str(m)])
    assert r.exit_code == exitcodes.OK, r.output
    assert "out/real/" in r.output
    saved = yaml.safe_load((tmp_path / "out/_dgaug/manifest.yaml").read_text())
    assert saved["stages"]["download"]["resize_mode"] == "border", "defaults written out"

    r = runner.invoke(app, ["status", str(m)])
    assert r.exit_code == exitcodes.OK, r.output
    assert "3/3" in r.output and "24" in r.output

    # A changed config is refused, naming the field; --force redoes.
    r = runner.invoke(app, ["run", str(m), "--set", "stages.download.image_size=40"])
    assert r.exit_code == exitcodes.REFUSED
    assert "config.download.image_size: 32 -> 40" in r.output and "Traceback" not in r.output

    # A live run holding the folder is named.
    (tmp_path / "out" / LOCK_REL).write_text(
        json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "heartbeat": 0})
    )
    r = runner.invoke(app, ["run", str(m)])
    assert r.exit_code == exitcodes.REFUSED, r.output
    assert f"pid {os.getppid()}" in r.output
    (tmp_path / "out" / LOCK_REL).unlink()


def test_failed_shard_exits_1_and_status_explains(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    m = write_manifest(tmp_path / "m.yaml", tiny_manifest_dict("out"))
    real = DownloadStage.process

    def broken(self, task, ctx):
        if task.shard_id == 2:
            raise RuntimeError("disk on fire")
        return real(self, task, ctx)

    monkeypatch.setattr(DownloadStage, "process", broken)
    r = runner.invoke(app, ["run", str(m)])
    assert r.exit_code == exitcodes.FAILED, r.output
    assert "disk on fire" in r.output
    r = runner.invoke(app, ["status", str(m)])
    assert r.exit_code == exitcodes.FAILED
    assert "00002: RuntimeError: disk on fire (attempts 2" in r.output


@pytest.mark.parametrize("flag", ["--set", "-s"])
def test_set_reaches_the_run(tmp_path: Path, monkeypatch, flag: str) -> None:
    monkeypatch.chdir(tmp_path)
    m = write_manifest(tmp_path / "m.yaml", tiny_manifest_dict("out"))
    r = runner.invoke(app, ["plan", str(m), flag, "shard_size=12"])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "download" in line and "real/" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[:3] == ["download", "real/", "2"], cells  # 24 images in shards of 12
