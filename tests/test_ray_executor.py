"""Tests for the Ray executor: commits, overlap of stages, retries, lost actors, blocked shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from dgaug.core.storage import Storage
from dgaug.job.manifest import Manifest, StageResources, validate
from dgaug.pipeline.attempt import Outcome
from dgaug.pipeline.executors.base import RunListener
from dgaug.pipeline.executors.ray import RayExecutor
from dgaug.pipeline.ledger import Ledger
from dgaug.pipeline.stage import ShardResult, ShardTask, Stage, StageContext
from tests.helpers import RAY_GPU_SLOTS, RAY_TOY_SLOTS

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.timeout(120),
]  # a scheduling bug hangs: fail fast


# Workers cannot import this test module by name: send its toy stages by value instead.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------------------------ toy stages


def _touch(folder: str, name: str) -> None:
    with open(os.path.join(folder, name), "w") as f:
        f.write(repr(time.time()))


def _wait_for(path: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.05)
    return False


class _Toy(Stage):
    """Writes `{shard}.txt`; logs its starts into `events` (actors are other processes)."""

    def __init__(self, manifest: Manifest, events: Path, workers: int = 1, **options: Any):
        super().__init__(manifest)
        self.events = str(events)
        self.workers = workers
        self.options = options

    def default_resources(self) -> StageResources:
        # Half a CPU each, so two stages' actors fit the 2-CPU test cluster side by side.
        return StageResources(
            workers=self.workers, num_cpus=0.5, custom=self.options.get("custom", {})
        )

    def fingerprint_config(self) -> dict[str, Any]:
        return {}

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        _touch(self.events, f"{self.name}-{task.shard_id:05d}.start")
        text, info = self.make(task, ctx)
        with open(os.path.join(task.tmp_dir, f"{task.shard_id:05d}.txt"), "w") as f:
            f.write(text)
        return ShardResult(samples=1, info=info)

    def make(self, task: ShardTask, ctx: StageContext) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError


class WriteStage(_Toy):
    name = "write"
    output_dir = "write"

    def make(self, task, ctx):
        gate = self.options.get("wait_for")
        # Finish only once the downstream stage has started: proves the stages overlap.
        if gate and task.shard_id == gate[0] and not _wait_for(f"{self.events}/{gate[1]}", 30):
            raise RuntimeError(f"{gate[1]} never appeared: stages did not overlap")
        time.sleep(self.options.get("sleep", 0))
        return f"shard {task.shard_id}\n", {}


class FlakyStage(_Toy):
    """Fails (raise) or dies (os._exit) on chosen shards, always or on the first attempt only."""

    name = "flaky"
    output_dir = "flaky"

    def make(self, task, ctx):
        i = task.shard_id
        n = 1 + sum(1 for f in os.listdir(self.events) if f.startswith(f"flaky-{i:05d}.try"))
        _touch(self.events, f"flaky-{i:05d}.try{n}")
        o = self.options
        if i in o.get("die_always", ()) or (i in o.get("die_first", ()) and n == 1):
            os._exit(1)
        if i in o.get("fail_always", ()) or (i in o.get("fail_first", ()) and n == 1):
            raise RuntimeError(f"boom on shard {i}")
        return f"shard {i}\n", {}


class UpperStage(_Toy):
    """Reads its upstream shard's file and writes it in capitals."""

    name = "upper"
    output_dir = "upper"

    def make(self, task, ctx):
        src = self.options["src"]
        committed = Ledger(ctx.storage).read_marker(src, task.shard_id) is not None
        text = ctx.storage.read_text(f"{src}/{task.shard_id:05d}.txt")
        return text.upper(), {"upstream_committed_at_start": committed}


class BadSetupStage(_Toy):
    name = "badsetup"
    output_dir = "badsetup"

    def setup(self, ctx):
        raise OSError("no model here")


class UnloadableStage(_Toy):
    """Pickles in the driver but cannot be unpickled by a worker, like a missing dependency."""

    name = "unloadable"
    output_dir = "unloadable"

    def __setstate__(self, state):
        raise ImportError("no module named 'missing_dependency'")


class GpuStage(_Toy):
    """Declares one GPU per worker and no worker count; each shard waits to meet another."""

    name = "gpu"
    output_dir = "gpu"

    def default_resources(self) -> StageResources:
        return StageResources(workers=None, num_cpus=0.5, num_gpus=1)

    def make(self, task, ctx):
        # Two shards must run at once: with a single actor the first one would wait in vain.
        others = lambda: [f for f in os.listdir(self.events) if f.startswith("gpu-")]  # noqa: E731
        deadline = time.monotonic() + 30
        while len(others()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(others()) < 2:
            raise RuntimeError("no other worker started a shard: the pool has one actor")
        return str(os.getpid()), {"gpu_ids": ray.get_gpu_ids()}


class BusyStage(_Toy):
    """Beats a file for 20 s; shard 0 first presses Ctrl-C on the driver, like a user would."""

    name = "busy"
    output_dir = "busy"

    def make(self, task, ctx):
        if task.shard_id == 0:
            os.kill(self.options["driver_pid"], signal.SIGINT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _touch(self.events, f"beat-{task.shard_id}")
            time.sleep(0.05)
        return "", {}


# --------------------------------------------------------------------------------------- helpers


class Recorder(RunListener):
    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.finished: list[tuple[Outcome, bool]] = []

    def task_started(self, task: ShardTask) -> None:
        self.started.append(task.id)

    def task_finished(self, outcome: Outcome, final: bool) -> None:
        self.finished.append((outcome, final))


def _manifest(tmp_path: Path, max_attempts: int = 3) -> Manifest:
    return validate(
        {
            "output": str(tmp_path / "out"),
            "source": {"kind": "synthetic", "num_images": 8},
            "executor": {"kind": "ray", "max_attempts": max_attempts},
        }
    )


def _tasks(stage: str, shards: range, up: str | None = None) -> list[ShardTask]:
    return [
        ShardTask(stage, i, deps=((up, i),) if up else (), outputs=(f"{i:05d}.txt",))
        for i in shards
    ]


def _execute(
    manifest: Manifest,
    stages: list[Stage],
    tasks: list[ShardTask],
    satisfied: set[tuple[str, int]] = frozenset(),
    listener: RunListener | None = None,
) -> tuple[dict[tuple[str, int], Outcome], Recorder, Storage]:
    storage = Storage(manifest.output)
    rec = listener or Recorder()
    outcomes = RayExecutor(manifest.executor).execute(
        {s.name: s for s in stages},
        tasks,
        {s.name: {"stage": s.name} for s in stages},
        StageContext(manifest, storage),
        set(satisfied),
        rec,
    )
    assert len(outcomes) == len(tasks)
    return {o.id: o for o in outcomes}, rec, storage


@pytest.fixture
def events(tmp_path: Path) -> Path:
    d = tmp_path / "events"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------------------- tests


def test_chain_commits_every_shard_and_stages_overlap(ray_session, tmp_path, events):
    m = _manifest(tmp_path)
    n = 4
    # The last upstream shard waits until downstream shard 0 has started: a stage-by-stage
    # executor would fail it.
    write = WriteStage(m, events, wait_for=(n - 1, "upper-00000.start"), sleep=0.2)
    upper = UpperStage(m, events, src="write")
    outcomes, rec, storage = _execute(
        m, [write, upper], _tasks("write", range(n)) + _tasks("upper", range(n), up="write")
    )

    assert all(o.ok for o in outcomes.values()), outcomes
    ledger = Ledger(storage)
    for stage in ("write", "upper"):
        markers = ledger.committed(stage)
        assert sorted(markers) == list(range(n))
        assert all(mk["status"] == "done" and mk["attempts"] == 1 for mk in markers.values())
    for i in range(n):
        assert storage.read_text(f"upper/{i:05d}.txt") == f"SHARD {i}\n"
        assert ledger.read_marker("upper", i)["info"] == {"upstream_committed_at_start": True}
        # Commit (marker written) of upstream i precedes the start of downstream i.
        committed_at = os.stat(storage.path(Ledger.marker_rel("write", i))).st_mtime
        started_at = float((events / f"upper-{i:05d}.start").read_text())
        assert committed_at <= started_at
    assert sorted(rec.started) == sorted(outcomes)
    assert all(final for _, final in rec.finished) and len(rec.finished) == 2 * n
    assert storage.list("_dgaug/tmp") == []  # scratch folders are gone


def test_failed_shard_blocks_only_its_downstream(ray_session, tmp_path, events):
    m = _manifest(tmp_path, max_attempts=2)
    storage = Storage(m.output)
    # Shard 3 of flaky was committed by an earlier run; shard 4 is neither done nor in this run.
    storage.write_text("flaky/00003.txt", "shard 3\n")
    tasks = _tasks("flaky", range(3)) + _tasks("upper", range(5), up="flaky")
    stages = [FlakyStage(m, events, fail_always={1}), UpperStage(m, events, src="flaky")]
    outcomes, rec, _ = _execute(m, stages, tasks, satisfied={("flaky", 3)})

    bad = outcomes[("flaky", 1)]
    assert not bad.ok and not bad.blocked and "boom on shard 1" in bad.error
    record = Ledger(storage).read_failure("flaky", 1)
    assert record["status"] == "failed" and record["attempts"] == 2
    assert record["error_type"] == "RuntimeError" and "boom" in record["traceback"]
    assert [final for o, final in rec.finished if o.id == ("flaky", 1)] == [False, True]

    blocked = outcomes[("upper", 1)]
    assert blocked.blocked and blocked.attempts == 0
    assert blocked.error == "an upstream shard failed"
    missing = outcomes[("upper", 4)]
    assert missing.blocked and "not committed" in missing.error
    assert ("upper", 1) not in rec.started and ("upper", 4) not in rec.started
    for tid in [("flaky", 0), ("flaky", 2), ("upper", 0), ("upper", 2), ("upper", 3)]:
        assert outcomes[tid].ok, outcomes[tid]
    assert sorted(Ledger(storage).committed("upper")) == [0, 2, 3]


def test_shard_failing_once_succeeds_on_retry(ray_session, tmp_path, events):
    m = _manifest(tmp_path, max_attempts=3)
    outcomes, rec, storage = _execute(
        m, [FlakyStage(m, events, fail_first={0})], _tasks("flaky", range(2))
    )
    assert outcomes[("flaky", 0)].ok and outcomes[("flaky", 1)].ok
    ledger = Ledger(storage)
    assert ledger.read_marker("flaky", 0)["attempts"] == 2
    assert ledger.read_failure("flaky", 0) is None  # cleared by the successful attempt
    assert rec.started.count(("flaky", 0)) == 2


def test_lost_actor_counts_as_an_attempt_and_is_replaced(ray_session, tmp_path, events):
    m = _manifest(tmp_path, max_attempts=2)
    stage = FlakyStage(m, events, die_first={1}, die_always={2})
    outcomes, rec, storage = _execute(m, [stage], _tasks("flaky", range(4)))
    ledger = Ledger(storage)

    # Shard 1's actor died once; a new actor redid the shard. The driver's failure record
    # counts as attempt 1, so the committing attempt is number 2.
    assert outcomes[("flaky", 1)].ok
    assert ledger.read_marker("flaky", 1)["attempts"] == 2
    lost = [o for o, final in rec.finished if o.id == ("flaky", 1) and not final]
    assert len(lost) == 1 and "worker lost" in lost[0].error

    # Shard 2 kills every actor that tries it: failed for good after max_attempts.
    assert not outcomes[("flaky", 2)].ok and not outcomes[("flaky", 2)].blocked
    record = ledger.read_failure("flaky", 2)
    assert record["attempts"] == 2 and record["status"] == "failed"
    assert record["error_type"] and record["traceback"] == "" and record["pid"]
    assert outcomes[("flaky", 0)].ok and outcomes[("flaky", 3)].ok
    assert sorted(ledger.committed("flaky")) == [0, 1, 3]


def test_failing_setup_fails_the_attempt(ray_session, tmp_path, events):
    m = _manifest(tmp_path, max_attempts=2)
    outcomes, rec, storage = _execute(m, [BadSetupStage(m, events)], _tasks("badsetup", range(2)))
    for i in range(2):
        assert not outcomes[("badsetup", i)].ok
        record = Ledger(storage).read_failure("badsetup", i)
        assert record["attempts"] == 2 and record["error_type"] == "OSError"
        assert "no model here" in record["error"] and "no model here" in record["traceback"]
    assert len(rec.started) == 4


def test_workers_that_cannot_start_fail_their_shards(ray_session, tmp_path, events):
    m = _manifest(tmp_path, max_attempts=2)
    tasks = _tasks("unloadable", range(2)) + _tasks("upper", range(2), up="unloadable")
    stages = [UnloadableStage(m, events), UpperStage(m, events, src="unloadable")]
    outcomes, rec, storage = _execute(m, stages, tasks)
    for i in range(2):
        failed = outcomes[("unloadable", i)]
        assert not failed.ok and not failed.blocked and "could not start" in failed.error
        assert "missing_dependency" in failed.error
        assert Ledger(storage).read_failure("unloadable", i)["status"] == "failed"
        assert outcomes[("upper", i)].blocked
    assert rec.started == []  # no task was sent to an actor that never started


def test_pool_larger_than_the_cluster_still_finishes(ray_session, tmp_path, events):
    # Only two of the three actors fit the toy slots: tasks must not wait on the third.
    m = _manifest(tmp_path)
    stage = WriteStage(m, events, workers=3, custom={"toy": RAY_TOY_SLOTS / 2})
    outcomes, _, storage = _execute(m, [stage], _tasks("write", range(5)))
    assert all(o.ok for o in outcomes.values())
    assert sorted(Ledger(storage).committed("write")) == list(range(5))


def test_idle_downstream_actor_yields_to_a_starved_upstream(ray_session, tmp_path, events):
    # Upstream's actor dies on shard 1; the downstream actor, placed meanwhile, leaves too few
    # toy slots for its replacement. Freeing the idle downstream actor lets upstream go on.
    m = _manifest(tmp_path, max_attempts=2)
    flaky = FlakyStage(m, events, die_first={1}, custom={"toy": 2})
    upper = UpperStage(m, events, src="flaky", custom={"toy": 3})
    ex = RayExecutor(m.executor)
    ex.poll_s, ex.starved_after_s = 0.2, 1.0
    storage = Storage(m.output)
    outcomes = ex.execute(
        {"flaky": flaky, "upper": upper},
        _tasks("flaky", range(2)) + _tasks("upper", range(2), up="flaky"),
        {"flaky": {}, "upper": {}},
        StageContext(m, storage),
        set(),
        RunListener(),
    )
    assert all(o.ok for o in outcomes), outcomes
    assert sorted(Ledger(storage).committed("upper")) == [0, 1]


def test_gpu_stage_without_a_worker_count_gets_one_actor_per_gpu(ray_session, tmp_path, events):
    from dgaug.pipeline.executors.ray import _workers

    m = _manifest(tmp_path)
    stage = GpuStage(m, events)
    assert _workers(stage) == RAY_GPU_SLOTS
    outcomes, _, storage = _execute(m, [stage], _tasks("gpu", range(4)))
    assert all(o.ok for o in outcomes.values()), outcomes
    pids = {storage.read_text(f"gpu/{i:05d}.txt") for i in range(4)}
    assert len(pids) == RAY_GPU_SLOTS
    gpu_ids = [Ledger(storage).read_marker("gpu", i)["info"]["gpu_ids"] for i in range(4)]
    assert all(len(ids) == 1 for ids in gpu_ids)  # Ray gave each actor its own GPU


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt during the test, as in a terminal. A suite started in the
    background of a non-interactive shell inherits SIGINT ignored, and Python keeps it so."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_interrupt_kills_the_actors(ray_session, tmp_path, events, ctrl_c_raises):
    m = _manifest(tmp_path)
    stage = BusyStage(m, events, workers=2, custom={"toy": 1}, driver_pid=os.getpid())
    with pytest.raises(KeyboardInterrupt):
        _execute(m, [stage], _tasks("busy", range(2)))

    def beats() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in events.glob("beat-*")}

    time.sleep(1)
    before = beats()
    time.sleep(1)
    assert before and beats() == before  # no shard is still being worked on
    deadline = time.monotonic() + 20
    while ray.available_resources().get("toy", 0) < RAY_TOY_SLOTS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("toy", 0) == RAY_TOY_SLOTS
    assert Ledger(Storage(m.output)).committed("busy") == {}


def test_run_pipeline_on_ray_matches_local_bytes(ray_session, tmp_path):
    from dgaug.job.run import run_pipeline

    out = tmp_path / "out"

    def manifest(kind: str) -> Manifest:
        return validate(
            {
                "output": str(out),
                "shard_size": 8,
                "source": {"kind": "synthetic", "num_images": 24, "image_size": 32},
                "executor": {
                    "kind": kind,
                    "max_attempts": 2,
                    "resources": {"download": {"workers": 3, "num_cpus": 0.5}},
                },
                "stages": {"download": {"image_size": 32, "threads": 4}},
            }
        )

    # The url list names files under the output folder: both runs must use the same path.
    assert run_pipeline(manifest("local")).ok
    shutil.move(out, tmp_path / "local")
    summary = run_pipeline(manifest("ray"))
    assert summary.ok and summary.stages["download"].done == 3

    real, ref = out / "real", tmp_path / "local" / "real"
    shards = sorted(p.name for p in real.iterdir() if p.suffix in (".tar", ".parquet"))
    assert shards == [f"{i:05d}{ext}" for i in range(3) for ext in (".parquet", ".tar")]
    for name in shards:
        assert (real / name).read_bytes() == (ref / name).read_bytes(), name
    sizes = (real / "sizes.json").read_text()
    assert sizes == (ref / "sizes.json").read_text()
    assert sorted(Ledger(Storage(str(out))).committed("real")) == [0, 1, 2]
    assert json.loads(sizes) == {"00000.tar": 8, "00001.tar": 8, "00002.tar": 8}
