"""Kill soak: SIGKILL dgaug at seeded-random moments in every stage; every rerun must end with the
bytes of an uninterrupted run, and no sample lost or duplicated.

    python tests/soak.py --kills 50 --seed 0 [--ray-rounds 1] [--driver-executor local|ray]

prints a table (kills survived per stage, files compared, keys checked, samples lost and
duplicated) and writes bench/results/soak.json. tests/test_kills.py runs the same harness with a
few kills.

The manifest: 32 synthetic images in 4 shards through every stage (download, edsam, features,
ldfs_fit, ldfs) with tiny random models on the CPU, then `dgaug train` (clip, 18 steps, a
checkpoint every 2). One uninterrupted run is the reference. Each round starts from an empty
output, kills each stage and the training in turn (rerunning the same command after each kill),
finishes, and compares every data file byte for byte, every sample id (no loss, no duplicate) and
every marker's commit fields with the reference; the output must hold no temporary file.

What is killed, and how a moment is chosen:
- the driver, `python -m dgaug.cli.app run M` (local executor, or `--driver-executor ray`: each
  run starts its own Ray), with SIGKILL to its pid only: the img2dataset launcher and its child,
  Ray's processes, must go by themselves; what outlives it by 20 s is a failure (Ray's own
  per-node agents, which exit about 60 s after their raylet, are counted apart). And
  `dgaug train M`;
- a Ray worker: the actor process running a shard, found by the pid in its scratch folder's name
  (`_dgaug/tmp/<stage>-<shard>.<pid>.<hex>`), while the run goes on in this process.
A kill aimed at a stage fires `u * window` seconds after a trigger seen in the output folder, u
uniform in [0, 1) from the seed: `setup` (the run wrote its plan and the previous stage is
committed; window: the stage's setup time in the reference run), `shard` (the scratch folder of
shard j appears; window: that shard's duration in the reference), `clock` (the process started;
window: the whole reference run), `checkpoint` (train: checkpoint k appears). Where the kill
really landed is read from the folder after it (a scratch folder names the shard in progress) and
is what the table counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `tests.helpers` must import
    sys.path.insert(0, str(REPO))

from tests.helpers import TINY_EDSAM, TINY_FEATURES, TINY_LDFS, tiny_manifest_dict  # noqa: E402

PIPELINE = ("download", "edsam", "features", "ldfs_fit", "ldfs")
TARGETS = (*PIPELINE, "train")
STAGE_DIRS = {
    "download": "real",
    "edsam": "edsam",
    "features": "features",
    "ldfs_fit": "ldfs/fit",
    "ldfs": "ldfs",
}
# 4 shards of 8: enough for a kill to land between shards of a stage, small enough for CI.
NUM_IMAGES, SHARD_SIZE = 32, 8
SHARDS = {s: 1 if s == "ldfs_fit" else NUM_IMAGES // SHARD_SIZE for s in PIPELINE}
TRAIN_MODE = "clip"
TRAIN_DIR = f"train/{TRAIN_MODE}"
# Compared without these keys: they say how the result was reached, not what it is.
TRAIN_JSON_VOLATILE = ("resumed_from",)
# Marker fields that must match the reference: what the commit vouches for. The rest (duration,
# finished_at, host, pid, attempts, info with timings) says how the shard was made.
MARKER_FIELDS = ("status", "samples", "counts", "failures", "outputs", "fingerprint")
POLL_S = 0.005
ORPHAN_GRACE_S = 20.0
RUN_TIMEOUT_S = 600.0


# ------------------------------------------------------------------------------------ manifest


def manifest_dict(output: Path | str, executor: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every stage on 4 shards of tiny models on the CPU, threads fixed so bytes are reproducible,
    and a short `clip` training with a checkpoint every 2 steps."""
    d = tiny_manifest_dict(output, shard_size=SHARD_SIZE)
    d["source"].update(num_images=NUM_IMAGES, eval_images=24)
    d["stages"]["edsam"] = dict(TINY_EDSAM)
    d["stages"]["features"] = {**TINY_FEATURES, "batch_size": 32}
    d["stages"]["ldfs"] = dict(TINY_LDFS)
    d["train"] = {
        "mode": TRAIN_MODE,
        "model": "tiny-random",
        "device": "cpu",
        "cpu_threads": 1,
        "epochs": 3,
        "batch_size": 8,
        "lr": 0.001,
        "checkpoint_every": 2,
        "decode_threads": 1,
    }
    if executor is not None:
        d["executor"] = {**d["executor"], **executor}
    return d


def write_manifest(path: Path, output: Path, executor: dict[str, Any] | None = None) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(manifest_dict(output, executor)))
    return path


# The driver starts its own Ray (no address): what a SIGKILL of the driver leaves of Ray is seen.
RAY_EXECUTOR = {"kind": "ray", "resources": {"download": {"workers": 1, "num_cpus": 0.5}}}


# ------------------------------------------------------------------------------------ snapshot


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _skipped(rel: Path) -> bool:
    """Not a data file: dgaug's own folder, markers, checkpoints (intermediate)."""
    return rel.parts[0] == "_dgaug" or "_state" in rel.parts or "checkpoints" in rel.parts


def data_files(out: Path, *, train: bool = True) -> dict[str, str]:
    """rel path -> sha256 of every data file (a link: `-> target`); train.json minus its volatile
    keys. Markers, checkpoints, logs and dgaug's scratch are left out (they hold timings)."""
    files: dict[str, str] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if _skipped(rel) or p.name.startswith(".") or (not train and rel.parts[0] == "train"):
            continue
        if p.is_symlink():
            files[str(rel)] = f"-> {os.readlink(p)}"
        elif p.is_file():
            if p.name == "train.json":
                rec = json.loads(p.read_text())
                for k in TRAIN_JSON_VOLATILE:
                    rec.pop(k, None)
                files[str(rel)] = hashlib.sha256(
                    json.dumps(rec, sort_keys=True).encode()
                ).hexdigest()
            else:
                files[str(rel)] = _sha256(p)
    return files


def temporaries(out: Path) -> list[str]:
    """Leftovers of interrupted writes: hidden `.tmp` files anywhere, and scratch entries."""
    left = [str(p.relative_to(out)) for p in out.rglob(".*.tmp")]
    tmp = out / "_dgaug" / "tmp"
    if tmp.is_dir():
        left += [f"_dgaug/tmp/{e}" for e in os.listdir(tmp)]
    return sorted(left)


def _tar_keys(path: Path) -> list[str]:
    keys: list[str] = []
    with tarfile.open(path) as tf:
        for name in tf.getnames():
            key = os.path.basename(name).split(".", 1)[0]
            if not keys or keys[-1] != key:  # a sample's members are adjacent
                keys.append(key)
    return keys


def _parquet_ids(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    if {"domain", "draw"} <= set(t.column_names) and "origin" not in t.column_names:
        # LDFS: one row per (real key, target domain, draw).
        rows = t.select(["key", "domain", "draw"]).to_pylist()
        return [f"{r['key']}|{r['domain']}|{r['draw']}" for r in rows]
    return [str(k) for k in t.column("key").to_pylist()]


def sample_ids(out: Path) -> dict[str, Counter[str]]:
    """Per collection (a stage folder and file kind): how often each sample id occurs."""
    ids: dict[str, Counter[str]] = {}
    for stage, folder in STAGE_DIRS.items():
        d = out / folder
        if stage == "ldfs_fit" or not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith(".") or not p.name[:1].isdigit():
                continue
            if p.suffix == ".tar":
                got = _tar_keys(p)
            elif p.suffix == ".parquet":
                got = _parquet_ids(p)
            else:
                continue
            ids.setdefault(f"{folder}/*{p.suffix}", Counter()).update(got)
    return ids


def markers(out: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for folder in STAGE_DIRS.values():
        for p in sorted((out / folder / "_state").glob("0*.json")):
            if p.name.endswith(".error.json"):
                continue
            m = json.loads(p.read_text())
            found[f"{folder}/_state/{p.name}"] = {k: m.get(k) for k in MARKER_FIELDS}
    return found


@dataclass
class Snapshot:
    files: dict[str, str]
    ids: dict[str, Counter[str]]
    markers: dict[str, dict[str, Any]]


def snapshot(out: Path, *, train: bool = True) -> Snapshot:
    return Snapshot(data_files(out, train=train), sample_ids(out), markers(out))


@dataclass
class Comparison:
    files_compared: int = 0
    keys_checked: int = 0
    lost: int = 0
    duplicated: int = 0
    differing: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    marker_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.duplicated
            or self.differing
            or self.missing
            or self.extra
            or self.marker_problems
        )

    def describe(self) -> str:
        parts = [
            f"{k}: {v[:8]}"
            for k, v in (
                ("differing", self.differing),
                ("missing", self.missing),
                ("extra", self.extra),
                ("markers", self.marker_problems),
            )
            if v
        ]
        return f"lost {self.lost}, duplicated {self.duplicated}; " + "; ".join(parts)


def compare(ref: Snapshot, got: Snapshot) -> Comparison:
    """Every data file byte for byte, every collection's sample ids, every marker's commit fields."""
    c = Comparison()
    for rel, digest in ref.files.items():
        if rel not in got.files:
            c.missing.append(rel)
        else:
            c.files_compared += 1
            if got.files[rel] != digest:
                c.differing.append(rel)
    c.extra = sorted(set(got.files) - set(ref.files))
    for coll, want in ref.ids.items():
        have = got.ids.get(coll, Counter())
        c.keys_checked += sum(have.values())
        c.lost += sum((want - have).values())
        c.duplicated += sum(n - 1 for n in have.values() if n > 1)
    for rel, want_m in ref.markers.items():
        if got.markers.get(rel) != want_m:
            c.marker_problems.append(rel)
    c.marker_problems += sorted(set(got.markers) - set(ref.markers))
    return c


def partial_files(out: Path, ref: Snapshot) -> list[str]:
    """After a kill: visible shard files that differ from the reference (a reader must never see
    a partial shard), and markers vouching for bytes that are not there."""
    bad = []
    for folder in STAGE_DIRS.values():
        d = out / folder
        if not d.is_dir():
            continue
        for p in d.iterdir():
            rel = f"{folder}/{p.name}"
            shard = p.is_file() and not p.name.startswith(".") and p.name != "sizes.json"
            if shard and ref.files.get(rel) != _sha256(p):
                bad.append(rel)
    for rel, m in markers(out).items():
        folder = rel.split("/_state/")[0]
        for name, o in (m["outputs"] or {}).items():
            p = out / folder / name
            if not p.is_file() or _sha256(p) != o["sha256"]:
                bad.append(f"{rel} vouches for {name}")
    return sorted(bad)


# ----------------------------------------------------------------------------- watching a run


def _scratch(out: Path, stale: frozenset[str] = frozenset()) -> list[str]:
    """Scratch folders of running attempts (`<stage>-<shard>.<pid>.<hex>`), less `stale`: what a
    killed run left, there when this one started and until it has taken the lock."""
    try:
        return [n for n in os.listdir(out / "_dgaug" / "tmp") if n not in stale]
    except FileNotFoundError:
        return []


def _count_markers(out: Path, stage: str) -> int:
    try:
        names = os.listdir(out / STAGE_DIRS[stage] / "_state")
    except FileNotFoundError:
        return 0
    return sum(1 for n in names if n[:1].isdigit() and n.endswith(".json") and "error" not in n)


def _has_marker(out: Path, stage: str, shard: int) -> bool:
    return (out / STAGE_DIRS[stage] / "_state" / f"{shard:05d}.json").exists()


def _stage_complete(out: Path, stage: str) -> bool:
    return _count_markers(out, stage) >= SHARDS[stage]


def _scratch_of(
    out: Path, stage: str, shard: int | None = None, stale: frozenset[str] = frozenset()
) -> str | None:
    prefix = f"{stage}-" if shard is None else f"{stage}-{shard:05d}."
    for name in _scratch(out, stale):
        if name.startswith(prefix):
            return name
    return None


def _planned_by_this_run(out: Path, since: float) -> bool:
    try:
        return (out / "_dgaug" / "plan.json").stat().st_mtime >= since
    except FileNotFoundError:
        return False


def _written_since(p: Path, since: float) -> bool:
    try:
        return p.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def _checkpoint_steps(out: Path, since: float = 0.0) -> list[int]:
    """Steps of the checkpoints in the training output; with `since`, those written since then
    (a killed training's checkpoints are there when the next one starts)."""
    folder = out / TRAIN_DIR / "checkpoints"
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(
        int(n[5:13])
        for n in names
        if n.startswith("step_")
        and n.endswith(".safetensors")
        and _written_since(folder / n, since)
    )


def where(out: Path, since: float, command: str, stale: frozenset[str]) -> tuple[str, str]:
    """(stage, phase) a run was at, read from the folder: a scratch folder names the shard in
    progress; else the first stage not committed (its setup); `startup` before the plan is
    written (imports, source, planning); `finish` once every stage is committed (sizes, mix)."""
    if command == "train":
        steps = _checkpoint_steps(out, since)
        if _written_since(out / TRAIN_DIR / "model.safetensors", since):
            return "train", "evaluate"
        return "train", f"after step {steps[-1]}" if steps else "startup"
    for name in _scratch(out, stale):
        stage, _, rest = name.partition("-")
        if stage in PIPELINE:
            return stage, f"shard {int(rest.split('.')[0])}"
    if not _planned_by_this_run(out, since):
        return "startup", "plan"
    for stage in PIPELINE:
        if not _stage_complete(out, stage):
            return stage, "setup"
    return "finish", "sizes/mix"


@dataclass
class Timeline:
    """When things happened in the reference run, in seconds from the process start."""

    total: float = 0.0
    planned: float = 0.0
    first_scratch: dict[str, float] = field(default_factory=dict)
    complete: dict[str, float] = field(default_factory=dict)
    shard_s: dict[str, list[float]] = field(default_factory=dict)  # from the markers
    checkpoints: dict[int, float] = field(default_factory=dict)

    def setup_window(self, stage: str) -> float:
        i = PIPELINE.index(stage)
        begin = max(self.planned, self.complete.get(PIPELINE[i - 1], 0.0) if i else 0.0)
        first = self.first_scratch.get(stage, self.complete.get(stage, begin))
        return max(first - begin, 0.05)

    def step_s(self) -> float:
        steps = sorted(self.checkpoints)
        if len(steps) < 2:
            return 0.1
        return (self.checkpoints[steps[-1]] - self.checkpoints[steps[0]]) / (steps[-1] - steps[0])


@dataclass
class KillSpec:
    target: str  # a pipeline stage or "train"
    trigger: str  # setup | shard | clock | checkpoint
    u: float  # fraction of the trigger's window
    shard: int = 0  # shard (trigger shard) or checkpoint step index (trigger checkpoint)


@dataclass
class KillEvent:
    round: int
    target: str
    trigger: str
    command: str
    killed: bool
    stage: str = ""  # where it landed
    phase: str = ""
    at_s: float = 0.0
    returncode: int | None = None
    orphans_s: float = 0.0  # how long processes of the killed run outlived it
    orphans_left: list[str] = field(default_factory=list)
    ray_agents_left: list[str] = field(default_factory=list)  # see RAY_AGENTS
    partial: list[str] = field(default_factory=list)


def _group_members(pgid: int) -> list[Any]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


# Ray's per-node agents poll their raylet and exit about 60 s after it died with a killed driver
# that had started Ray itself; they never touch the output. Counted apart, not waited for.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _cmdline(p: Any) -> str:
    return " ".join(p.info["cmdline"] or []).strip()[:120]


def _await_orphans(pgid: int) -> tuple[float, list[str], list[str]]:
    """How long processes of the killed run's group lived on (Ray's agents aside). Kills any left
    after ORPHAN_GRACE_S and names them; also kills and names the Ray agents."""
    t0 = time.monotonic()
    while True:
        members = _group_members(pgid)
        ours = [p for p in members if not _cmdline(p).startswith(RAY_AGENTS)]
        elapsed = time.monotonic() - t0
        if not ours or elapsed >= ORPHAN_GRACE_S:
            break
        time.sleep(0.05)
    agents = [p for p in members if _cmdline(p).startswith(RAY_AGENTS)]
    for p in members:
        try:
            p.kill()
        except Exception:
            pass
    return elapsed, [_cmdline(p) for p in ours], [_cmdline(p) for p in agents]


def _command(command: str, manifest: Path) -> list[str]:
    return [sys.executable, "-m", "dgaug.cli.app", command, str(manifest)]


def drive(
    command: str,
    manifest: Path,
    out: Path,
    spec: KillSpec | None,
    ref: Timeline | None,
    *,
    log: Path,
    timeline: Timeline | None = None,
) -> tuple[int, KillEvent | None]:
    """Run `dgaug COMMAND MANIFEST`; SIGKILL its pid when `spec` says. Returns (returncode, event).

    With `timeline`, records when each stage started and finished (the reference run).
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    since = time.time()
    stale = frozenset(_scratch(out))
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            _command(command, manifest),
            cwd=manifest.parent,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: what outlives it is found and counted
            env=env,
        )
    t0 = time.monotonic()
    fire_at: float | None = None
    while proc.poll() is None:
        now = time.monotonic() - t0
        if now > RUN_TIMEOUT_S:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"dgaug {command} ran over {RUN_TIMEOUT_S} s; see {log}")
        if timeline is not None:
            _record(timeline, out, command, since, now, stale)
        if spec is not None and ref is not None and fire_at is None:
            fire_at = _trigger(spec, ref, out, since, now, stale)
        if fire_at is not None and now >= fire_at:
            os.kill(proc.pid, signal.SIGKILL)  # the driver only
            proc.wait()
            stage, phase = where(out, since, command, stale)
            orphans_s, left, agents = _await_orphans(proc.pid)
            ev = KillEvent(0, spec.target, spec.trigger, command, True, stage, phase, now)
            ev.returncode, ev.orphans_s, ev.orphans_left = proc.returncode, orphans_s, left
            ev.ray_agents_left = agents
            return proc.returncode, ev
        time.sleep(POLL_S)
    if timeline is not None:
        timeline.total = time.monotonic() - t0
        _record(timeline, out, command, since, timeline.total, stale)
    if spec is None:
        return proc.returncode, None
    return proc.returncode, KillEvent(
        0, spec.target, spec.trigger, command, False, returncode=proc.returncode
    )


def _record(
    t: Timeline, out: Path, command: str, since: float, now: float, stale: frozenset[str]
) -> None:
    if command == "train":
        for step in _checkpoint_steps(out):
            t.checkpoints.setdefault(step, now)
        return
    if not t.planned and _planned_by_this_run(out, since):
        t.planned = now
    for stage in PIPELINE:
        if stage not in t.first_scratch and _scratch_of(out, stage, stale=stale) is not None:
            t.first_scratch[stage] = now
        if stage not in t.complete and _stage_complete(out, stage):
            t.complete[stage] = now


def _trigger(
    spec: KillSpec, ref: Timeline, out: Path, since: float, now: float, stale: frozenset[str]
) -> float | None:
    """When the kill fires (seconds from the process start), once its trigger is seen; else None."""
    if spec.trigger == "clock":
        return spec.u * ref.total
    if spec.trigger == "checkpoint":
        steps = sorted(ref.checkpoints)
        step = steps[min(spec.shard, len(steps) - 1)] if steps else 0
        # This run's checkpoints only (the first one if it resumed past `step`).
        written = _checkpoint_steps(out, since)
        if written and written[-1] >= step:
            return now + spec.u * ref.step_s() * 2
        return None
    if spec.trigger == "shard":
        if _scratch_of(out, spec.target, spec.shard, stale) is not None:
            durations = ref.shard_s.get(spec.target) or [0.1]
            return now + spec.u * durations[min(spec.shard, len(durations) - 1)]
        if _has_marker(out, spec.target, spec.shard) and _planned_by_this_run(out, since):
            return now  # done between two looks (or before this run): kill now, a shard later
        return None
    # setup: the run has planned and the previous stage is committed
    i = PIPELINE.index(spec.target)
    if _planned_by_this_run(out, since) and (i == 0 or _stage_complete(out, PIPELINE[i - 1])):
        return now + spec.u * ref.setup_window(spec.target)
    return None


def _shard_durations(out: Path) -> dict[str, list[float]]:
    found = {}
    for stage, folder in STAGE_DIRS.items():
        found[stage] = [
            float(json.loads(p.read_text())["duration_s"])
            for p in sorted((out / folder / "_state").glob("0*.json"))
            if not p.name.endswith(".error.json")
        ]
    return found


# ------------------------------------------------------------------------------------ the runs


@dataclass
class Reference:
    snapshot: Snapshot
    pipeline: Timeline
    train: Timeline
    work: Path  # the output folder is always work/out: its path is inside the url list's bytes

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def manifest(self) -> Path:
        return self.work / "m.yaml"

    @property
    def kept(self) -> Path:
        return self.work / "reference"


def make_reference(work: Path) -> Reference:
    """One uninterrupted `dgaug run` and `dgaug train`; moved to work/reference afterwards."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    manifest = write_manifest(work / "m.yaml", out)
    log = work / "reference.log"
    pipe, train = Timeline(), Timeline()
    rc, _ = drive("run", manifest, out, None, None, log=log, timeline=pipe)
    if rc != 0:
        raise RuntimeError(f"the reference run failed ({rc}); see {log}")
    pipe.shard_s = _shard_durations(out)
    rc, _ = drive("train", manifest, out, None, None, log=log, timeline=train)
    if rc != 0:
        raise RuntimeError(f"the reference training failed ({rc}); see {log}")
    ref = Reference(snapshot(out), pipe, train, work)
    problems = [c for c, ids in ref.snapshot.ids.items() if any(n > 1 for n in ids.values())]
    if problems or temporaries(out):
        raise RuntimeError(f"the reference has duplicates {problems} or leftovers")
    shutil.rmtree(ref.kept, ignore_errors=True)
    shutil.move(out, ref.kept)
    return ref


@dataclass
class RoundResult:
    round: int
    events: list[KillEvent]
    comparison: Comparison
    leftovers: list[str]
    final_rc: dict[str, int]
    problems: list[str] = field(default_factory=list)


def kill_round(
    ref: Reference,
    specs: list[KillSpec],
    round_no: int = 0,
    *,
    commands: tuple[str, ...] = ("run", "train"),
    start_from: Path | None = None,
    manifest: Path | None = None,
    before_rerun: Callable[[str, Path], None] | None = None,
) -> RoundResult:
    """From an empty output (or a copy of `start_from`): for each of `commands`, the kills of
    `specs` aimed at it, in order, each in a fresh process, then one run that must finish (exit
    0). Then every data file, sample id and marker is compared with the reference, and the
    output must hold no temporary. `before_rerun(command, out)` runs before each finishing run.
    `manifest`: another manifest of the same output (the reference's on another executor)."""
    out = ref.out
    manifest = manifest or ref.manifest
    shutil.rmtree(out, ignore_errors=True)
    if start_from is not None:
        shutil.copytree(start_from, out, symlinks=True)
    log = ref.work / f"round-{round_no:03d}.log"
    events: list[KillEvent] = []
    problems: list[str] = []
    final_rc: dict[str, int] = {}
    for command in commands:
        timeline = ref.train if command == "train" else ref.pipeline
        for spec in specs:
            if (spec.target == "train") != (command == "train"):
                continue
            rc, ev = drive(command, manifest, out, spec, timeline, log=log)
            assert ev is not None
            ev.round = round_no
            if ev.killed:
                ev.partial = partial_files(out, ref.snapshot)
                problems += [f"partial after kill: {p}" for p in ev.partial]
                problems += [f"outlived the kill: {p}" for p in ev.orphans_left]
            elif rc != 0:
                problems.append(f"dgaug {command} exited {rc} before its kill; see {log}")
            events.append(ev)
        if before_rerun is not None:
            before_rerun(command, out)
        rc, _ = drive(command, manifest, out, None, None, log=log)
        final_rc[command] = rc
        if rc != 0:
            problems.append(f"the rerun of dgaug {command} exited {rc}; see {log}")
    with_train = "train" in commands
    want = ref.snapshot if with_train else without_train(ref.snapshot)
    comparison = compare(want, snapshot(out, train=with_train))
    leftovers = temporaries(out)
    if not comparison.ok:
        problems.append(f"differs from the reference: {comparison.describe()}")
    if leftovers:
        problems.append(f"temporaries left after the finishing run: {leftovers}")
    return RoundResult(round_no, events, comparison, leftovers, final_rc, problems)


def plan_kills(n: int, seed: int) -> list[list[KillSpec]]:
    """`n` kills in rounds; each round goes through the targets in order (one kill each, a second
    now and then), so every stage and the training are hit once per round."""
    rng = random.Random(seed)
    rounds: list[list[KillSpec]] = []
    left = n
    while left > 0:
        specs = []
        for target in TARGETS:
            for _ in range(1 + (rng.random() < 0.25)):
                if left == 0:
                    break
                specs.append(_spec(target, rng))
                left -= 1
        rounds.append(specs)
    return rounds


def _spec(target: str, rng: random.Random) -> KillSpec:
    if target == "train":
        trigger = rng.choices(["checkpoint", "clock"], [0.7, 0.3])[0]
        return KillSpec(target, trigger, rng.random(), rng.randrange(8))
    trigger = rng.choices(["setup", "shard", "clock"], [0.35, 0.5, 0.15])[0]
    return KillSpec(target, trigger, rng.random(), rng.randrange(SHARDS[target]))


# ------------------------------------------------------------------------------ Ray worker kills


@dataclass
class WorkerKill:
    stage: str
    shard: int
    pid: int
    killed: bool
    cmdline: str = ""


def ray_worker_round(
    ref: Reference, stages: list[str], rng: random.Random, run: Callable[[], Any]
) -> tuple[list[WorkerKill], list[Any]]:
    """While `run()` (a pipeline run on Ray, in this process) works, SIGKILL the actor process
    running a shard of each of `stages`, once each. Returns the kills and every summary: the
    first run, and reruns until one is ok (at most 2)."""
    import psutil

    out = ref.out
    kills: list[WorkerKill] = []
    stop = threading.Event()

    def killer() -> None:
        for stage in stages:
            shard = rng.randrange(SHARDS[stage])
            durations = ref.pipeline.shard_s.get(stage) or [0.1]
            delay = rng.random() * durations[min(shard, len(durations) - 1)]
            name = None
            while not stop.is_set():
                # The wanted shard, or any of the stage if that one is already behind.
                name = _scratch_of(out, stage, shard)
                if name is None and _count_markers(out, stage) > shard:
                    name = _scratch_of(out, stage)
                if name is not None:
                    break
                time.sleep(POLL_S)
            if name is None:
                return
            pid = int(name.split(".")[1])
            time.sleep(delay)
            mine = [n for n in _scratch(out) if n.split(".")[1:2] == [str(pid)]]
            try:
                cmd = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                cmd = ""
            # Only a Ray worker of this run: never the driver (this process) or a stranger.
            ok = pid != os.getpid() and cmd.startswith("ray::")
            if ok:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    ok = False
            # The shard it was on when killed (it may have moved on during the delay).
            name = mine[0] if mine else name
            kills.append(WorkerKill(stage, int(name.split(".")[0].split("-")[1]), pid, ok, cmd))

    shutil.rmtree(out, ignore_errors=True)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summaries = []
    try:
        summaries.append(run())
    finally:
        stop.set()
        thread.join(timeout=30)
    while not summaries[-1].ok and len(summaries) < 3:
        summaries.append(run())
    return kills, summaries


def ray_manifest(ref: Reference, stages: tuple[str, ...] = PIPELINE) -> Any:
    """The reference manifest on the Ray executor, with the stages up to the last of `stages`
    (a stage's bytes and fingerprint depend only on its upstream, so they still match)."""
    from dgaug.job.manifest import validate

    d = manifest_dict(ref.out, executor=RAY_EXECUTOR)
    last = max(PIPELINE.index(s) for s in stages)
    keep = {"ldfs" if s.startswith("ldfs") else s for s in PIPELINE[: last + 1]}
    d["stages"] = {k: v for k, v in d["stages"].items() if k in keep}
    return validate(d)


def only(s: Snapshot, stages: tuple[str, ...]) -> Snapshot:
    """The part of a snapshot that `stages` write (and mix/ and eval/, which every run writes)."""
    folders = [STAGE_DIRS[x] for x in stages]

    def mine(rel: str) -> bool:
        folder = rel.rsplit("/", 1)[0].split("/_state")[0].removesuffix("/*.tar")
        folder = folder.removesuffix("/*.parquet")
        return folder in folders

    # mix/ links name the tar shards of every stage the run had: only those of `stages`.
    prefixes = tuple(f"mix/{STAGE_DIRS[x]}-" for x in stages)
    all_tars = {"download", "edsam"} <= set(stages)
    files = {
        k: v
        for k, v in s.files.items()
        if mine(k) or k.startswith(("eval/", *prefixes)) or (k == "mix/sizes.json" and all_tars)
    }
    return Snapshot(
        files,
        {k: v for k, v in s.ids.items() if mine(k)},
        {k: v for k, v in s.markers.items() if mine(k)},
    )


# ------------------------------------------------------------------------------------- the soak


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="driver and train kills in all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray-rounds", type=int, default=1, help="Ray runs, a worker kill per stage")
    ap.add_argument(
        "--driver-executor",
        choices=["local", "ray"],
        default="local",
        help="executor of the killed `dgaug run` (ray: each run starts its own Ray)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--json", type=Path, default=REPO / "bench/results/soak.json")
    args = ap.parse_args(argv)

    import tempfile

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dgaug-soak-"))
    started = time.time()
    print(f"work folder {work}; reference run ...", flush=True)
    ref = make_reference(work)
    print(
        f"reference: run {ref.pipeline.total:.1f} s, train {ref.train.total:.1f} s, "
        f"{len(ref.snapshot.files)} data files",
        flush=True,
    )
    rounds: list[RoundResult] = []
    manifest = ref.manifest
    if args.driver_executor == "ray":
        manifest = write_manifest(work / "m-ray.yaml", ref.out, RAY_EXECUTOR)
    for i, specs in enumerate(plan_kills(args.kills, args.seed)):
        r = kill_round(ref, specs, i, manifest=manifest)
        rounds.append(r)
        landed = ", ".join(f"{e.stage}/{e.phase}" if e.killed else "missed" for e in r.events)
        verdict = "ok" if not r.problems else "; ".join(r.problems)
        print(f"round {i}: {len(specs)} kill(s) [{landed}] -> {verdict}", flush=True)

    ray_results = []
    if args.ray_rounds:
        import ray

        from dgaug.job.run import run_pipeline

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        rng = random.Random(args.seed)
        for i in range(args.ray_rounds):
            m = ray_manifest(ref)
            kills, summaries = ray_worker_round(
                ref, list(PIPELINE), rng, lambda m=m: run_pipeline(m)
            )
            c = compare(without_train(ref.snapshot), snapshot(ref.out, train=False))
            ray_results.append(
                {
                    "round": i,
                    "kills": [asdict(k) for k in kills],
                    "runs": len(summaries),
                    "first_run_ok": summaries[0].ok,
                    "ok": summaries[-1].ok and c.ok,
                    "comparison": asdict(c),
                }
            )
            print(
                f"ray round {i}: killed {[(k.stage, k.shard) for k in kills if k.killed]}, "
                f"runs {len(summaries)}, {'ok' if c.ok else c.describe()}",
                flush=True,
            )

    report = _report(rounds, ray_results)
    print()
    print(report["table"])
    print()
    print(report["totals_table"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python tests/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "driver_executor": args.driver_executor,
        "host": os.uname().nodename,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "reference": {
            "run_s": round(ref.pipeline.total, 2),
            "train_s": round(ref.train.total, 2),
            "data_files": len(ref.snapshot.files),
        },
        **{k: v for k, v in report.items() if not k.endswith("table")},
        "rounds": [
            {
                "round": r.round,
                "events": [asdict(e) for e in r.events],
                "comparison": asdict(r.comparison),
                "leftovers": r.leftovers,
                "final_rc": r.final_rc,
                "problems": r.problems,
            }
            for r in rounds
        ],
        "ray": ray_results,
    }
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nJSON in {args.json}")
    return 0 if report["ok"] else 1


def without_train(s: Snapshot) -> Snapshot:
    files = {k: v for k, v in s.files.items() if not k.startswith("train/")}
    return Snapshot(files, s.ids, s.markers)


def _report(rounds: list[RoundResult], ray_results: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, Counter[str]] = {}
    for r in rounds:
        for e in r.events:
            c = per.setdefault(e.stage if e.killed else e.target, Counter())
            if not e.killed:
                c["missed"] += 1
                continue
            c["survived" if not r.problems else "failed"] += 1
            c["in a shard" if e.phase.startswith(("shard", "after step")) else "elsewhere"] += 1
    for rr in ray_results:
        for k in rr["kills"]:
            c = per.setdefault(f"ray worker: {k['stage']}", Counter())
            if k["killed"]:
                c["survived" if rr["ok"] else "failed"] += 1
                c["in a shard"] += 1
            else:
                c["missed"] += 1
    order = ["startup", *PIPELINE, "finish", "train"]
    order += [f"ray worker: {s}" for s in PIPELINE]
    labels = sorted(per, key=lambda s: (order.index(s) if s in order else len(order), s))
    columns = ("survived", "failed", "in a shard", "elsewhere", "missed")
    rows = [(s, *(str(per[s][k]) for k in columns)) for s in labels]
    comps = [r.comparison for r in rounds] + [
        Comparison(**{**rr["comparison"]}) for rr in ray_results
    ]
    totals = {
        "kills_survived": sum(c["survived"] for c in per.values()),
        "kills_failed": sum(c["failed"] for c in per.values()),
        "kills_missed": sum(c["missed"] for c in per.values()),
        "rounds": len(rounds) + len(ray_results),
        "files_compared": sum(c.files_compared for c in comps),
        "keys_checked": sum(c.keys_checked for c in comps),
        "samples_lost": sum(c.lost for c in comps),
        "samples_duplicated": sum(c.duplicated for c in comps),
        "differing_files": sum(len(c.differing) + len(c.missing) + len(c.extra) for c in comps),
        "partial_files_seen": sum(len(e.partial) for r in rounds for e in r.events),
        "processes_outliving_a_kill": sum(len(e.orphans_left) for r in rounds for e in r.events),
        "ray_agents_outliving_a_kill": sum(
            len(e.ray_agents_left) for r in rounds for e in r.events
        ),
        "max_orphan_s": round(max([e.orphans_s for r in rounds for e in r.events] or [0]), 2),
        "leftover_temporaries": sum(len(r.leftovers) for r in rounds),
    }
    problems = [p for r in rounds for p in r.problems] + [
        f"ray round {rr['round']} not ok" for rr in ray_results if not rr["ok"]
    ]
    return {
        "per_stage": {s: dict(per[s]) for s in labels},
        "totals": totals,
        "problems": problems,
        "ok": not problems,
        "table": _table(rows, ("where the kill landed", *columns)),
        "totals_table": _table(
            [(k.replace("_", " "), str(v)) for k, v in totals.items()], ("figure", "value")
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
