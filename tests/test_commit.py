"""The commit rule: a shard is visible only whole, its marker comes last, a failure is recorded."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from dgaug.core.atomic import atomic_write
from dgaug.core.storage import Storage
from dgaug.job.manifest import validate
from dgaug.pipeline.attempt import run_attempt
from dgaug.pipeline.ledger import Ledger, changed_fields, fingerprint, fingerprint_record
from dgaug.pipeline.stage import ShardResult, ShardTask, Stage, StageContext
from tests.helpers import tiny_manifest_dict


class ToyStage(Stage):
    """Writes `{shard}.txt` and `{shard}.json`; can die half-way or raise on demand."""

    name = "download"
    output_dir = "toy"
    mode = "ok"

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        Path(task.tmp_dir, f"{task.shard_id:05d}.txt").write_text("x" * 1000)
        if self.mode == "die":
            os._exit(9)  # a SIGKILL-like death after half the outputs were written
        if self.mode == "raise":
            raise ValueError("bad things")
        if self.mode == "forget":
            return ShardResult(samples=1)
        Path(task.tmp_dir, f"{task.shard_id:05d}.json").write_text("{}")
        return ShardResult(samples=3, failures={"http_404": 1})


def _task(i: int) -> ShardTask:
    return ShardTask("download", i, outputs=(f"{i:05d}.txt", f"{i:05d}.json"))


@pytest.fixture
def ctx(tmp_path: Path) -> StageContext:
    m = validate(tiny_manifest_dict(tmp_path / "out"))
    return StageContext(m, Storage(m.output))


RECORD = fingerprint_record("download", {"a": 1}, {})


def test_success_commits_files_then_marker(ctx: StageContext) -> None:
    stage = ToyStage(ctx.manifest)
    out = run_attempt(stage, _task(0), ctx, RECORD)
    assert out.ok and out.samples == 3
    root = Path(ctx.storage.root)
    assert (root / "toy/00000.txt").read_text() == "x" * 1000
    marker = json.loads((root / "toy/_state/00000.json").read_text())
    assert marker["status"] == "done"
    assert marker["samples"] == 3
    assert marker["failures"] == {"http_404": 1}
    assert marker["fingerprint"] == fingerprint(RECORD)
    assert set(marker["outputs"]) == {"00000.txt", "00000.json"}
    assert marker["outputs"]["00000.txt"]["bytes"] == 1000
    assert len(marker["outputs"]["00000.txt"]["sha256"]) == 64
    assert not list((root / "_dgaug/tmp").iterdir()), "scratch must be removed"


def test_exception_is_recorded_not_raised(ctx: StageContext) -> None:
    stage = ToyStage(ctx.manifest)
    stage.mode = "raise"
    out1 = run_attempt(stage, _task(1), ctx, RECORD)
    out2 = run_attempt(stage, _task(1), ctx, RECORD)
    assert not out1.ok and "ValueError: bad things" in out1.error
    assert out2.attempts == 2
    ledger = Ledger(ctx.storage)
    rec = ledger.read_failure("toy", 1)
    assert rec["attempts"] == 2 and "Traceback" in rec["traceback"]
    assert ledger.read_marker("toy", 1) is None
    assert not Path(ctx.storage.root, "toy/00001.txt").exists()
    stage.mode = "ok"
    assert run_attempt(stage, _task(1), ctx, RECORD).ok
    assert ledger.read_failure("toy", 1) is None, "a success clears the failure record"
    assert ledger.read_marker("toy", 1)["attempts"] == 3


def test_missing_output_fails_the_shard(ctx: StageContext) -> None:
    stage = ToyStage(ctx.manifest)
    stage.mode = "forget"
    out = run_attempt(stage, _task(2), ctx, RECORD)
    assert not out.ok and "did not write" in out.error
    assert not Path(ctx.storage.root, "toy/00002.txt").exists()


def test_killed_attempt_leaves_no_visible_shard(ctx: StageContext) -> None:
    stage = ToyStage(ctx.manifest)
    stage.mode = "die"
    proc = multiprocessing.get_context("fork").Process(
        target=run_attempt, args=(stage, _task(3), ctx, RECORD)
    )
    proc.start()
    proc.join()
    assert proc.exitcode == 9
    root = Path(ctx.storage.root)
    assert not (root / "toy/00003.txt").exists()
    assert Ledger(ctx.storage).read_marker("toy", 3) is None
    assert list((root / "_dgaug/tmp").iterdir()), "the dead attempt left scratch behind"
    assert ctx.storage.clean_scratch() == 1
    assert not list((root / "_dgaug/tmp").iterdir())


def test_redo_drops_the_old_marker_first(ctx: StageContext, monkeypatch) -> None:
    stage = ToyStage(ctx.manifest)
    assert run_attempt(stage, _task(4), ctx, RECORD).ok
    ledger = Ledger(ctx.storage)

    def crash(*a, **k):
        raise OSError("disk went away")

    # Killed between the file renames and the marker: files may be new, the marker must be gone.
    monkeypatch.setattr(Ledger, "write_marker", crash)
    out = run_attempt(stage, _task(4), ctx, fingerprint_record("download", {"a": 2}, {}))
    assert not out.ok
    assert ledger.read_marker("toy", 4) is None


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "f.json"
    atomic_write(str(target), b"old")

    def boom(src, dst):
        raise OSError("no space left")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(str(target), b"new" * 100)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"], "no temporary left behind"


def test_storage_on_an_fsspec_store() -> None:
    s = Storage("memory://dgaug-test-store")
    s.write_json("a/_state/00000.json", {"ok": 1})
    s.write_bytes("a/00000.tar", b"tar")
    assert s.list("a") == ["00000.tar", "_state"]
    assert s.read_json("a/_state/00000.json") == {"ok": 1}
    assert s.url("a/00000.tar") == "memory:///dgaug-test-store/a/00000.tar"
    assert Ledger(s).committed("a") == {0: {"ok": 1}}
    s.remove_tree("a")
    assert s.list("a") == []


def test_changed_fields_names_each_difference() -> None:
    old = fingerprint_record("download", {"download": {"image_size": 64, "x": 1}}, {})
    new = fingerprint_record("download", {"download": {"image_size": 128, "x": 1}}, {})
    assert changed_fields(old, new) == ["config.download.image_size: 64 -> 128"]
    assert fingerprint(old) != fingerprint(new)
