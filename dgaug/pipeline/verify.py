"""`dgaug verify`: read every committed shard and compare its sha256 with its marker; optionally
drop the markers of damaged shards so that the next run remakes them."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from dgaug.core.storage import PLAN_REL, Storage
from dgaug.pipeline.ledger import Ledger
from dgaug.pipeline.lock import RunLock
from dgaug.pipeline.mix import MIX_DIR, SIZES
from dgaug.pipeline.scan import scan_stage

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read at a time: memory is threads x CHUNK whatever the shard size


@dataclass
class StageCheck:
    """One stage's verification: shards and bytes read, and the damaged shards -> why."""

    name: str
    output_dir: str
    shards: int = 0  # committed shards checked (planned, with the plan's fingerprint)
    bytes: int = 0
    damaged: dict[int, str] = field(default_factory=dict)
    repaired: int = 0  # markers dropped by --repair

    @property
    def ok(self) -> int:
        return self.shards - len(self.damaged)


@dataclass
class VerifyResult:
    output: str
    started: bool
    stages: dict[str, StageCheck]

    @property
    def damaged(self) -> int:
        return sum(len(s.damaged) for s in self.stages.values())

    @property
    def repaired(self) -> int:
        return sum(s.repaired for s in self.stages.values())


def sha256_of(storage: Storage, rel: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(rel) as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Job:
    stage: str
    shard: int
    marker: str  # its marker's relative path: the files' sha256s are read from it
    files: list[tuple[str, str, int]]  # (output name, relative path, bytes) as the marker records


def _check(storage: Storage, job: _Job) -> tuple[int, str | None]:
    """(bytes read, why the shard is damaged or None)."""
    read, problems = 0, []
    try:
        outputs = storage.read_json(job.marker).get("outputs") or {}
    except (OSError, ValueError, AttributeError) as e:
        return 0, f"its marker cannot be read ({e})"
    for name, rel, size in job.files:
        out = outputs.get(name)
        want = out.get("sha256") if isinstance(out, dict) else None
        try:
            got = sha256_of(storage, rel)
        except FileNotFoundError:
            problems.append(f"{os.path.basename(rel)} is missing")
            continue
        except OSError as e:
            problems.append(f"{os.path.basename(rel)} cannot be read ({e})")
            continue
        read += size
        if got != want:
            problems.append(f"{os.path.basename(rel)}: sha256 {got[:12]}… differs from its marker")
    return read, "; ".join(problems) or None


def _bounded(
    pool: ThreadPoolExecutor, fn: Callable[[_Job], Any], jobs: Iterator[_Job], window: int
) -> Iterator[tuple[_Job, Any]]:
    """pool.map with at most `window` jobs in flight, results as they finish (bounded memory at
    any number of shards, unlike Executor.map which submits every job first)."""
    pending: dict[Future, _Job] = {}
    for job in jobs:
        pending[pool.submit(fn, job)] = job
        if len(pending) >= window:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield pending.pop(f), f.result()
    for f in list(pending):
        yield pending.pop(f), f.result()


def verify_output(
    output: str,
    *,
    repair: bool = False,
    threads: int = 8,
    on_start: Callable[[int, int], None] | None = None,
    on_shard: Callable[[str, int], None] | None = None,
) -> VerifyResult:
    """Check every committed shard of `output` (those `dgaug status` counts as done, and those it
    shows as damaged): presence and size from the listings, then the sha256 of every file read
    in full. `on_start(shards, bytes)` once, `on_shard(stage, bytes)` per shard, for a progress
    bar. With `repair`, under the run lock, drop the markers of damaged shards (and their mix/
    links) so that the next `dgaug run` remakes them."""
    storage = Storage(output)
    storage.check()
    try:
        plan = storage.read_json(PLAN_REL)
    except FileNotFoundError:
        return VerifyResult(storage.root, False, {})
    result = VerifyResult(storage.root, True, {})
    jobs: list[_Job] = []
    total_bytes = 0
    for name, p in plan.items():
        check = StageCheck(name, p["output_dir"])
        result.stages[name] = check
        scan = scan_stage(storage, p["output_dir"])
        planned = set(p["shards"])
        for shard, m in sorted(scan.markers.items()):
            if shard not in planned or m.get("fingerprint") != p["fingerprint"]:
                continue
            check.shards += 1
            if shard in scan.damaged:
                check.damaged[shard] = scan.damaged[shard]  # no need to read it
                continue
            files = [
                (f, f"{p['output_dir']}/{f}", int(size or 0))
                for f, size in sorted((m.get("outputs") or {}).items())
            ]
            total_bytes += sum(size for _, _, size in files)
            jobs.append(_Job(name, shard, Ledger.marker_rel(p["output_dir"], shard), files))
    if on_start:
        on_start(sum(s.shards for s in result.stages.values()), total_bytes)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        check_one = functools.partial(_check, storage)
        for job, (read, why) in _bounded(pool, check_one, iter(jobs), 4 * max(1, threads)):
            check = result.stages[job.stage]
            check.bytes += read
            if why:
                check.damaged[job.shard] = why
            if on_shard:
                on_shard(job.stage, read)
    if repair and result.damaged:
        drop_damaged(storage, result)
    return result


def drop_damaged(storage: Storage, result: VerifyResult) -> None:
    """Under the run lock: remove the marker of every damaged shard (its files stay until the
    next run overwrites them) and its entry in the mix/ view, so nothing names it as whole."""
    ledger = Ledger(storage)
    with RunLock(storage):
        gone: set[str] = set()
        for check in result.stages.values():
            prefix = check.output_dir.rstrip("/").rsplit("/", 1)[-1]
            for shard in sorted(check.damaged):
                ledger.clear_marker(check.output_dir, shard)
                check.repaired += 1
                gone.add(f"{prefix}-{shard:05d}.tar")
            _drop_sizes(
                storage, f"{check.output_dir}/{SIZES}", {f"{s:05d}.tar" for s in check.damaged}
            )
        if storage.is_local and gone:
            # sizes.json first: a reader never finds a name there whose link is already gone.
            _drop_sizes(storage, f"{MIX_DIR}/{SIZES}", gone)
            for name in gone:
                storage.remove(f"{MIX_DIR}/{name}")
        log.info("dropped %d damaged shard marker(s)", result.repaired)


def _drop_sizes(storage: Storage, rel: str, names: set[str]) -> None:
    """Remove `names` from the sizes.json at `rel`, if it is there and names any of them."""
    try:
        sizes = storage.read_json(rel)
    except (FileNotFoundError, ValueError):
        return
    if isinstance(sizes, dict) and names & set(sizes):
        storage.write_json(rel, {k: v for k, v in sizes.items() if k not in names})
