"""Resume: committed shards are skipped, a changed config is refused, a killed run finishes the same."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dgaug.job.manifest import validate
from dgaug.job.run import run_pipeline
from dgaug.pipeline.run import FingerprintMismatch
from dgaug.pipeline.status import read_status
from dgaug.stages.download.stage import DownloadStage
from tests.helpers import dgaug_process, tiny_manifest_dict


def data_files(root: Path) -> dict[str, bytes]:
    """Every shard file and sizes.json of real/: what a consumer reads."""
    return {
        p.name: p.read_bytes()
        for p in sorted((root / "real").iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def test_rerun_skips_committed_and_redoes_only_missing(tmp_path: Path) -> None:
    m = validate(tiny_manifest_dict(tmp_path / "out"))
    first = run_pipeline(m)
    assert first.ok and first.stages["download"].done == 3
    assert first.stages["download"].samples == 24
    before = data_files(tmp_path / "out")
    assert set(before) >= {"00000.tar", "00002.parquet", "00001_stats.json", "sizes.json"}

    again = run_pipeline(m)
    s = again.stages["download"]
    assert (s.skipped, s.done, s.failed) == (3, 0, 0)
    assert data_files(tmp_path / "out") == before

    # Lose one shard (its marker and files): only that one is redone, to the same bytes.
    for name in ("00001.tar", "00001.parquet", "00001_stats.json", "_state/00001.json"):
        (tmp_path / "out/real" / name).unlink()
    third = run_pipeline(m)
    s = third.stages["download"]
    assert (s.skipped, s.done) == (2, 1)
    assert data_files(tmp_path / "out") == before

    # Tuning fields (threads, processes) are not part of the fingerprint.
    tuned = validate(
        tiny_manifest_dict(
            tmp_path / "out", stages={"download": {"image_size": 32, "threads": 2, "timeout": 5}}
        )
    )
    assert run_pipeline(tuned).stages["download"].skipped == 3


def test_changed_config_is_refused_then_forced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_pipeline(validate(tiny_manifest_dict(out)))
    before = data_files(out)
    changed = tiny_manifest_dict(out, shard_size=12)
    changed["stages"]["download"]["image_size"] = 48
    with pytest.raises(FingerprintMismatch) as exc:
        run_pipeline(validate(changed))
    msg = str(exc.value)
    assert "config.download.image_size: 32 -> 48" in msg
    assert "config.shard_size: 8 -> 12" in msg
    assert "--force" in msg
    assert data_files(out) == before, "a refused run changes nothing"

    forced = run_pipeline(validate(changed), force=True)
    s = forced.stages["download"]
    assert (s.planned, s.done) == (2, 2)
    files = sorted(p.name for p in (out / "real").iterdir())
    assert "00002.tar" not in files, "a shard the new plan lacks is removed, never mixed in"
    assert sorted((out / "real/_state").iterdir())[-1].name == "00001.json"
    st = read_status(str(out))
    assert st.complete and st.stages["download"].samples == 24


def test_failed_shard_is_recorded_others_go_on(tmp_path: Path, monkeypatch) -> None:
    m = validate(tiny_manifest_dict(tmp_path / "out"))
    real_process = DownloadStage.process

    def flaky(self, task, ctx):
        if task.shard_id == 1:
            raise MemoryError("simulated out-of-memory")
        return real_process(self, task, ctx)

    monkeypatch.setattr(DownloadStage, "process", flaky)
    summary = run_pipeline(m)
    s = summary.stages["download"]
    assert not summary.ok
    assert (s.done, s.failed) == (2, 1)
    assert "MemoryError: simulated out-of-memory" in s.errors[1]
    st = read_status(m.output)
    assert st.stages["download"].failed == 1
    assert st.stages["download"].errors[1]["attempts"] == 2  # max_attempts in the tiny manifest

    monkeypatch.setattr(DownloadStage, "process", real_process)
    retry = run_pipeline(m)
    assert retry.ok and (retry.stages["download"].skipped, retry.stages["download"].done) == (2, 1)
    assert read_status(m.output).complete


def _dgaug(*args: str, cwd: Path) -> subprocess.Popen:
    return dgaug_process(*args, cwd=cwd)


def _run_and_kill_after(manifest: Path, cwd: Path, markers: int) -> set[str]:
    """Start a run, SIGKILL its whole process group once `markers` shards are committed."""
    state = cwd / "out/real/_state"
    before = set(f.stem for f in state.glob("0*.json")) if state.exists() else set()
    p = _dgaug("run", str(manifest), cwd=cwd)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if len(set(f.stem for f in state.glob("0*.json")) - before) >= markers:
            break
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return {f.stem for f in state.glob("0*.json")}


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_sigkill_midway_then_rerun_gives_identical_bytes(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(tiny_manifest_dict("out", shard_size=2)))  # 12 shards
    p = _dgaug("run", str(manifest), cwd=tmp_path)
    assert p.wait(timeout=300) == 0, p.stdout.read().decode()
    reference = data_files(tmp_path / "out")
    shutil.move(tmp_path / "out", tmp_path / "reference")

    # Killed twice at different points, then finished by running the same command.
    for markers in (1, 3):
        committed = _run_and_kill_after(manifest, tmp_path, markers)
        assert len(committed) < 12, f"the kill should land mid-run, committed {committed}"
        for f in (tmp_path / "out/real").glob("*.tar"):
            # A visible shard is always whole: identical to the uninterrupted run's.
            assert f.read_bytes() == reference[f.name], f"{f.name} is partial"

    p = _dgaug("run", str(manifest), cwd=tmp_path)
    out = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, out
    assert data_files(tmp_path / "out") == reference
    assert not list((tmp_path / "out/_dgaug/tmp").iterdir()), "temporaries cleaned"


def test_url_list_replaced_under_the_same_name_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    rows = []
    for i in range(5):
        p = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (40, 40), (40 * i, 90, 160)).save(p)
        rows.append(f"{p.as_uri()}\tpicture number {i}")
    tsv = tmp_path / "urls.tsv"
    tsv.write_text("url\tcaption\n" + "\n".join(rows[:4]) + "\n")
    src = {"kind": "url_list", "path": str(tsv), "input_format": "tsv", "allowed_schemes": ["file"]}
    m = validate(tiny_manifest_dict(tmp_path / "out", source=src, shard_size=2))
    assert run_pipeline(m).stages["download"].samples == 4
    tsv.write_text("url\tcaption\n" + "\n".join(rows) + "\n")
    with pytest.raises(FingerprintMismatch, match="config.source_files"):
        run_pipeline(m)
