"""The Ray executor: an actor pool per stage; a shard starts as soon as its inputs are committed."""

from __future__ import annotations

import heapq
import logging
import os
import re
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray

from dgaug.core.storage import TMP_DIR, DiskFull, clean_dead_local_scratch, disk_full
from dgaug.pipeline.attempt import Outcome, record_failure, run_attempt
from dgaug.pipeline.executors.base import Executor, RunListener
from dgaug.pipeline.stage import ShardTask, Stage, StageContext

log = logging.getLogger(__name__)

TaskId = tuple[str, int]

UPSTREAM_FAILED = "an upstream shard failed"
UPSTREAM_MISSING = "an upstream shard is not committed"


@ray.remote
class _StageWorker:
    """One worker of a stage's pool: sets the stage up once, then runs attempts one at a time."""

    def __init__(self, stage: Stage, ctx: StageContext):
        self.stage = stage
        self.ctx = ctx
        self.set_up = False
        # The Ray node, recorded in each marker: on a cluster several nodes can share a host name.
        self.node = ray.get_runtime_context().get_node_id()
        if not ctx.storage.is_local:
            # Scratch is this node's temp folder: remove what workers killed here left behind.
            clean_dead_local_scratch()

    def ready(self) -> dict[str, Any]:
        # Resolves once the actor has been placed and constructed; says where, for failure records.
        return {"host": socket.gethostname(), "pid": os.getpid(), "node": self.node}

    def run(self, task: ShardTask, fp_record: dict[str, Any]) -> Outcome:
        if not self.set_up:
            try:
                self.stage.setup(self.ctx)
            except Exception as e:  # a broken setup fails this attempt; the next one tries again
                error = f"setup failed: {type(e).__name__}: {e}"
                attempts = record_failure(
                    self.ctx,
                    self.stage,
                    task.shard_id,
                    error,
                    type(e).__name__,
                    tb=traceback.format_exc(),
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    node=self.node,
                )
                return Outcome(
                    self.stage.name, task.shard_id, False, error=error, attempts=attempts
                )
            self.set_up = True
        return run_attempt(self.stage, task, self.ctx, fp_record, node=self.node)

    def teardown(self) -> None:
        if self.set_up:
            self.set_up = False
            try:
                self.stage.teardown()
            except Exception:  # the actor is killed next anyway; its resources go with it
                self.stage.log.exception("teardown of %s failed", self.stage.name)


@dataclass
class _Slot:
    """One actor of a pool and the task it is running (at most one)."""

    actor: Any
    ready_ref: Any  # resolves once the actor has been placed and constructed
    created: float
    task: ShardTask | None = None
    where: dict[str, Any] | None = None  # host and pid; set once the actor has started
    warned: bool = False

    @property
    def started(self) -> bool:
        return self.where is not None


@dataclass
class _Pool:
    """The actors of one stage; grown up to `size` while tasks are ready, never beyond."""

    stage: Stage
    stage_ref: Any
    ctx_ref: Any
    fp_ref: Any  # the stage's fingerprint record, put once: every marker holds it
    size: int
    slots: list[_Slot] = field(default_factory=list)
    start_failures: int = 0
    ever_started: bool = False
    broken: str | None = None  # why no actor of this stage can start; its tasks fail at once
    broken_detail: str = ""  # Ray's full message, with the worker's traceback

    def idle(self) -> list[_Slot]:
        return [s for s in self.slots if s.started and s.task is None]

    def starting(self) -> list[_Slot]:
        return [s for s in self.slots if not s.started]

    def grow(self, wanted: int) -> None:
        r = self.stage.resources()
        for _ in range(min(wanted, self.size - len(self.slots))):
            actor = _StageWorker.options(
                num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=r.custom or None
            ).remote(self.stage_ref, self.ctx_ref)
            self.slots.append(_Slot(actor, actor.ready.remote(), time.monotonic()))

    def discard(self, slot: _Slot) -> None:
        self.slots.remove(slot)
        _kill(slot.actor)

    def close(self, teardown: bool, timeout_s: float) -> None:
        slots, self.slots = self.slots, []
        refs = [s.actor.teardown.remote() for s in slots if teardown and s.started]
        if refs:
            # ray.wait rather than ray.get: one actor's broken teardown must not skip the others'.
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for s in slots:
            _kill(s.actor)


def _workers(stage: Stage) -> int:
    """The stage's pool size: as declared, or (null) as many as the cluster has GPUs for."""
    r = stage.resources()
    if r.workers is not None:
        return r.workers
    if r.num_gpus <= 0:
        return 1
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < r.num_gpus:
        log.warning(
            "stage %s needs %s GPU per worker; the cluster has %s", stage.name, r.num_gpus, gpus
        )
    return max(1, int(gpus // r.num_gpus))


def _remove_scratch(ctx: StageContext, task: ShardTask, pid: Any) -> None:
    """Remove the scratch folder of an attempt whose worker died in it. A killed process runs no
    `finally`, so its partial shard would stay in `_dgaug/tmp` until the next run starts: with
    workers lost again and again (OOM kills) in a long run, that fills the disk. The folder is
    named `<stage>-<shard>.<pid>.<hex>` (Storage.scratch_dir); the worker is killed by now."""
    storage = ctx.storage
    if not storage.is_local or not pid:
        return
    prefix = f"{task.stage}-{task.shard_id:05d}.{pid}."
    for name in storage.list(TMP_DIR):
        if name.startswith(prefix):
            storage.remove_tree(f"{TMP_DIR}/{name}")


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def connect(address: str | None) -> None:
    """Use the Ray the caller started, else join `address`, else start one on this machine."""
    if ray.is_initialized():
        return
    # Worker output stays in Ray's session logs: failures are recorded per shard in the ledger,
    # and workers printing into the driver would garble the CLI's progress bars.
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


class RayExecutor(Executor):
    """Runs each stage on its own actor pool; stages overlap shard by shard.

    Scheduling happens in the driver. A task is ready once each of its deps is committed (before
    the run or by this run), so a downstream shard starts as soon as its upstream shard commits.
    Ready tasks go, lowest shard first, to actors that have started and hold no task: one task per
    actor, because a queue per actor would let a slow actor sit on work an idle one could take,
    and a shard lasts far longer than a Ray round trip. A stage's actors are created only when it
    has ready work (so a downstream stage takes no GPU before it can use it), never more than
    `workers` or its task count, and a task never waits behind an actor that Ray cannot place yet.
    When a stage has no task left its actors are torn down and killed, freeing their GPUs for the
    next stage. A failed attempt, or an actor lost mid-shard, is retried up to `max_attempts` times
    in this run (a lost actor is replaced); shards downstream of a shard that failed for good are
    reported blocked; every other shard goes on.
    """

    poll_s: float = 5.0  # how often the driver looks up from ray.wait to look for starved stages
    starved_after_s: float = 60.0  # a stage with no started actor by then lacks resources
    teardown_timeout_s: float = 60.0

    def execute(
        self,
        stages: dict[str, Stage],
        tasks: list[ShardTask],
        fp_records: dict[str, dict[str, Any]],
        ctx: StageContext,
        satisfied: set[tuple[str, int]],
        listener: RunListener,
    ) -> list[Outcome]:
        if not tasks:
            return []
        connect(self.config.address)
        run = _Run(self, stages, tasks, fp_records, ctx, satisfied, listener)
        try:
            return run.loop()
        finally:
            # Normally every pool is closed by now; on an interrupt or a driver error, free the
            # actors (and their GPUs) at once rather than when the driver process exits.
            run.kill_all()


class _Run:
    """The state of one execute() call."""

    def __init__(
        self,
        ex: RayExecutor,
        stages: dict[str, Stage],
        tasks: list[ShardTask],
        fp_records: dict[str, dict[str, Any]],
        ctx: StageContext,
        satisfied: set[tuple[str, int]],
        listener: RunListener,
    ):
        self.ex = ex
        self.stages = stages
        self.fp_records = fp_records
        self.ctx = ctx
        self.listener = listener
        self.max_attempts = ex.config.max_attempts
        self.tasks: dict[TaskId, ShardTask] = {t.id: t for t in tasks}
        self.committed: set[TaskId] = set(satisfied)
        self.dead: set[TaskId] = set()  # failed for good, or blocked
        self.tries: dict[TaskId, int] = {}
        self.outcomes: list[Outcome] = []
        self.left: dict[str, int] = {}  # tasks per stage without a final outcome yet
        self.counts: dict[str, int] = {}
        self.ready: dict[str, list[tuple[int, int, ShardTask]]] = {n: [] for n in stages}
        self.seq = 0  # heap tie-breaker: ShardTask has no ordering
        self.pools: dict[str, _Pool] = {}
        self.in_flight: dict[Any, tuple[_Pool, _Slot]] = {}
        self.ctx_ref: Any = None
        # Dependency bookkeeping, so a commit touches only the tasks that wait on it.
        self.waiting: dict[TaskId, set[TaskId]] = {}
        self.dependents: dict[TaskId, list[TaskId]] = {}
        for t in self.tasks.values():
            self.left[t.stage] = self.left.get(t.stage, 0) + 1
            self.counts[t.stage] = self.counts.get(t.stage, 0) + 1

    # -- bookkeeping
    def _push_ready(self, task: ShardTask) -> None:
        self.seq += 1
        heapq.heappush(self.ready[task.stage], (task.shard_id, self.seq, task))

    def _final(self, outcome: Outcome) -> None:
        self.listener.task_finished(outcome, final=True)
        self.outcomes.append(outcome)
        if outcome.ok:
            self.committed.add(outcome.id)
            for tid in self.dependents.get(outcome.id, ()):
                waits = self.waiting[tid]
                waits.discard(outcome.id)
                if not waits and tid not in self.dead:
                    self._push_ready(self.tasks[tid])
        else:
            self._kill_downstream(outcome.id)
        self._count_down(outcome.stage)

    def _kill_downstream(self, failed: TaskId, why: str = UPSTREAM_FAILED) -> None:
        self.dead.add(failed)
        stack = list(self.dependents.get(failed, ()))
        while stack:
            tid = stack.pop()
            if tid in self.dead:
                continue
            self._block(self.tasks[tid], why)
            stack.extend(self.dependents.get(tid, ()))

    def _block(self, task: ShardTask, why: str) -> None:
        self.dead.add(task.id)
        outcome = Outcome(task.stage, task.shard_id, False, blocked=True, attempts=0, error=why)
        self.listener.task_finished(outcome, final=True)
        self.outcomes.append(outcome)
        self._count_down(task.stage)

    def _count_down(self, stage: str) -> None:
        self.left[stage] -= 1
        if self.left[stage] == 0:
            pool = self.pools.pop(stage, None)
            if pool is not None:
                log.debug(
                    "stage %s has no task left; releasing %d actor(s)", stage, len(pool.slots)
                )
                pool.close(teardown=True, timeout_s=self.ex.teardown_timeout_s)

    def kill_all(self) -> None:
        for pool in self.pools.values():
            pool.close(teardown=False, timeout_s=0)
        self.pools.clear()
        self.in_flight.clear()

    # -- the loop
    def loop(self) -> list[Outcome]:
        for tid, t in self.tasks.items():
            waits = {d for d in t.deps if d not in self.committed}
            self.waiting[tid] = waits
            for d in waits:
                self.dependents.setdefault(d, []).append(tid)
        for tid, t in self.tasks.items():
            if tid in self.dead:
                continue
            if any(d not in self.tasks for d in self.waiting[tid]):
                # Neither committed before nor part of this run: it cannot be committed now.
                self._block(t, UPSTREAM_MISSING)
                self._kill_downstream(tid, UPSTREAM_MISSING)
            elif not self.waiting[tid]:
                self._push_ready(t)

        while any(self.left.values()):
            self._dispatch()
            starting = {
                s.ready_ref: (p, s) for p in self.pools.values() for s in p.slots if not s.started
            }
            waitable = [*self.in_flight, *starting]
            if not waitable:
                # Nothing runs, starts, or can start: only a dependency cycle gets here.
                for tid, t in self.tasks.items():
                    if tid not in self.dead and tid not in self.committed:
                        self._block(t, UPSTREAM_MISSING)
                break
            done, _ = ray.wait(waitable, num_returns=1, timeout=self.ex.poll_s)
            if not done:
                self._relieve_starvation()
                continue
            if len(waitable) > 1:
                # Everything else that has finished too, so that one dispatch follows many
                # results (cost per wake-up: the actors in flight, never the tasks).
                done, _ = ray.wait(waitable, num_returns=len(waitable), timeout=0)
            for ref in done:
                if ref in self.in_flight:
                    pool, slot = self.in_flight.pop(ref)
                    task, slot.task = slot.task, None
                    assert task is not None
                    self._collect(ref, pool, slot, task)
                else:
                    pool, slot = starting[ref]
                    if self.pools.get(pool.stage.name) is pool and slot in pool.slots:
                        # (a result before it in this batch may have closed its pool)
                        self._started(ref, pool, slot)
        return self.outcomes

    def _pool(self, name: str) -> _Pool:
        if name not in self.pools:
            stage = self.stages[name]
            if self.ctx_ref is None:
                self.ctx_ref = ray.put(self.ctx)
            size = max(1, min(_workers(stage), self.counts[name]))
            fp_ref = ray.put(self.fp_records[name])
            self.pools[name] = _Pool(stage, ray.put(stage), self.ctx_ref, fp_ref, size)
        return self.pools[name]

    def _dispatch(self) -> None:
        for name, heap in self.ready.items():
            if not heap:
                continue
            pool = self._pool(name)
            if pool.broken:
                while heap:
                    self._fail_unstartable(pool, heapq.heappop(heap)[2])
                continue
            for slot in pool.idle():
                if not heap:
                    break
                task = heapq.heappop(heap)[2]
                self.tries[task.id] = self.tries.get(task.id, 0) + 1
                self.listener.task_started(task)
                slot.task = task
                # The record goes by reference: serialized once per stage, not once per task.
                self.in_flight[slot.actor.run.remote(task, pool.fp_ref)] = (pool, slot)
            pool.grow(len(heap) - len(pool.starting()))

    def _started(self, ref: Any, pool: _Pool, slot: _Slot) -> None:
        try:
            slot.where = ray.get(ref)
            pool.ever_started = True
        except Exception as e:  # it could not be created: unpicklable stage, import error, ...
            pool.discard(slot)
            pool.start_failures += 1
            error = f"a worker of stage {pool.stage.name} could not start: {_summary(e)}"
            log.warning("%s", error)
            if not pool.ever_started and pool.start_failures >= self.max_attempts:
                # Every try failed the same way: fail the stage's shards instead of looping.
                pool.broken = error
                pool.broken_detail = _plain(e)

    def _fail_unstartable(self, pool: _Pool, task: ShardTask) -> None:
        error = pool.broken or "no worker could start"
        attempts = record_failure(
            self.ctx, pool.stage, task.shard_id, error, "WorkerStartError", tb=pool.broken_detail
        )
        self._final(Outcome(task.stage, task.shard_id, False, error=error, attempts=attempts))

    def _collect(self, ref: Any, pool: _Pool, slot: _Slot, task: ShardTask) -> None:
        try:
            outcome: Outcome = ray.get(ref)
        except Exception as e:  # the actor died (crash, OOM kill, node lost) or run() itself broke
            if disk_full(e):  # run_attempt's DiskFull: the run stops, as under the local executor
                raise DiskFull(self.ctx.storage.root) from None
            error = f"{type(e).__name__}: worker lost while processing the shard: {_summary(e)}"
            where = slot.where or {}
            attempts = record_failure(
                self.ctx,
                pool.stage,
                task.shard_id,
                error,
                type(e).__name__,
                host=where.get("host"),
                pid=where.get("pid"),
                node=where.get("node"),
            )
            log.warning("shard %s/%05d: %s", task.stage, task.shard_id, error)
            # Its state is unknown, or it is gone: a fresh actor takes the next task.
            pool.discard(slot)
            _remove_scratch(self.ctx, task, where.get("pid"))
            outcome = Outcome(task.stage, task.shard_id, False, error=error, attempts=attempts)
        if outcome.ok or self.tries[task.id] >= self.max_attempts:
            self._final(outcome)
        else:
            self.listener.task_finished(outcome, final=False)
            self._push_ready(task)

    def _relieve_starvation(self) -> None:
        """Free idle actors of other stages when a stage with work has no actor able to start.

        Without this, a downstream stage's idle actors could hold the GPUs that a replacement
        upstream actor needs, while they wait for the very shards that actor would make.
        """
        now = time.monotonic()
        starved = []
        for name, pool in self.pools.items():
            if any(s.started for s in pool.slots):
                continue
            waiting = [s for s in pool.starting() if now - s.created >= self.ex.starved_after_s]
            if not waiting:
                continue
            starved.append(name)
            if not waiting[0].warned:
                waiting[0].warned = True
                r = pool.stage.resources()
                log.warning(
                    "stage %s has work but no worker started in %.0f s; it needs num_cpus=%s "
                    "num_gpus=%s custom=%s",
                    name,
                    now - waiting[0].created,
                    r.num_cpus,
                    r.num_gpus,
                    r.custom,
                )
        for name, pool in self.pools.items():
            idle = pool.idle() if starved and name not in starved else []
            for s in idle:
                pool.discard(s)  # recreated once this stage has ready work again
            if idle:
                log.info("released %d idle worker(s) of %s for %s", len(idle), name, starved)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain(e: BaseException) -> str:
    return _ANSI.sub("", str(e)).strip()


def _summary(e: BaseException) -> str:
    """One line saying why a Ray call failed; Ray's own messages run to a dozen lines."""
    lines = [ln.strip() for ln in _plain(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if any(ln.startswith("Traceback") or ln.startswith("traceback:") for ln in lines):
        return lines[-1][:300]  # an error raised on the worker: its last line names it
    detail = re.search(r"Worker exit detail: ([^.]*)", _plain(e))
    return (lines[0] + (f" ({detail.group(1)})" if detail else ""))[:300]
