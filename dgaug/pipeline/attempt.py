"""One attempt at one shard: process into scratch, commit the files, then the marker (the commit)."""

from __future__ import annotations

import os
import shutil
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from dgaug import __version__
from dgaug.core.hashing import sha256_file
from dgaug.core.storage import DiskFull, disk_full
from dgaug.pipeline.ledger import Ledger, fingerprint
from dgaug.pipeline.stage import ShardTask, Stage, StageContext


@dataclass
class Outcome:
    """What an executor learns of one attempt; small, so it can travel back from a Ray worker."""

    stage: str
    shard_id: int
    ok: bool
    samples: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 1
    duration_s: float = 0.0
    blocked: bool = False  # not tried because an upstream shard failed

    @property
    def id(self) -> tuple[str, int]:
        return (self.stage, self.shard_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_attempt(
    stage: Stage,
    task: ShardTask,
    ctx: StageContext,
    fp_record: dict[str, Any],
    *,
    node: str | None = None,
) -> Outcome:
    """Process `task` once. Never raises for a failure of the shard: it is recorded and returned.

    `node` names the cluster node doing it (the Ray executor's), for the marker.
    """
    ledger = Ledger(ctx.storage)
    stage_dir = stage.output_dir
    shard = task.shard_id
    prior = ledger.read_failure(stage_dir, shard)
    attempts = int(prior.get("attempts", 0)) + 1 if prior else 1
    # An old marker must never vouch for new bytes: drop it before anything is overwritten.
    ledger.clear_marker(stage_dir, shard)
    scratch = ctx.storage.scratch_dir(f"{stage.name}-{shard:05d}")
    started = time.time()
    try:
        result = stage.process(task.in_dir(scratch), ctx)
        missing = [o for o in task.outputs if not os.path.isfile(os.path.join(scratch, o))]
        if missing:
            raise RuntimeError(f"stage {stage.name} did not write {missing} for shard {shard}")
        outputs = {}
        for name in task.outputs:
            local = os.path.join(scratch, name)
            outputs[name] = {"bytes": os.path.getsize(local), "sha256": sha256_file(local)}
        for name in task.outputs:
            ctx.storage.commit_file(os.path.join(scratch, name), f"{stage_dir}/{name}")
        duration = time.time() - started
        marker = {
            "stage": stage.name,
            "shard": shard,
            "status": "done",
            "samples": result.samples,
            "counts": result.counts,
            "failures": result.failures,
            "info": result.info,
            "outputs": outputs,
            "fingerprint": fingerprint(fp_record),
            "fingerprint_record": fp_record,
            "attempts": attempts,
            "duration_s": round(duration, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "dgaug_version": __version__,
        }
        if node:
            marker["node"] = node
        ledger.write_marker(stage_dir, shard, marker)
        ledger.clear_failure(stage_dir, shard)
        return Outcome(
            stage.name, shard, True, result.samples, dict(result.failures), None, attempts, duration
        )
    except Exception as e:  # a shard's failure is data: record it, let the executor decide
        if disk_full(e):
            # Not this shard's fault, and every shard after it would fail the same way (nor could
            # the failure be recorded): the run stops and says so; committed shards are intact.
            raise DiskFull(_where_full(e, ctx.storage.root)) from e
        duration = time.time() - started
        error = f"{type(e).__name__}: {e}"
        stage.log.warning(
            "shard %s/%05d failed (attempt %d): %s", stage.name, shard, attempts, error
        )
        record_failure(
            ctx,
            stage,
            shard,
            error,
            type(e).__name__,
            tb=traceback.format_exc(),
            duration=duration,
            node=node,
        )
        return Outcome(stage.name, shard, False, 0, {}, error, attempts, duration)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def record_failure(
    ctx: StageContext,
    stage: Stage,
    shard: int,
    error: str,
    error_type: str,
    *,
    tb: str = "",
    duration: float = 0.0,
    host: str | None = None,
    pid: int | None = None,
    node: str | None = None,
) -> int:
    """Write `S/_state/{i}.error.json` (attempts counted across runs); returns the attempt count."""
    ledger = Ledger(ctx.storage)
    prior = ledger.read_failure(stage.output_dir, shard)
    attempts = int(prior.get("attempts", 0)) + 1 if prior else 1
    try:
        ledger.write_failure(
            stage.output_dir,
            shard,
            {
                "stage": stage.name,
                "shard": shard,
                "status": "failed",
                "error": error,
                "error_type": error_type,
                "traceback": tb,
                "attempts": attempts,
                "duration_s": round(duration, 3),
                "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": host or socket.gethostname(),
                "pid": pid or os.getpid(),
                **({"node": node} if node else {}),
            },
        )
    except OSError as e:  # one line: the failure itself is in the run's summary
        stage.log.warning("could not record the failure of %s/%05d: %s", stage.name, shard, e)
    return attempts


def _where_full(exc: BaseException, root: str) -> str:
    """The path whose write ran out of space, if the error names one; else the output root."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
        e = e.__cause__ or e.__context__
    return root
