"""A run of a stage graph: lock the output, plan every stage, skip what is committed, execute the
rest, write sizes.json and the mix/ view. Which stages and which executor is the job's choice."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dgaug.core.errors import REFUSED, DgaugError
from dgaug.core.storage import DGAUG_DIR, Storage
from dgaug.pipeline.executors import Executor, RunListener
from dgaug.pipeline.ledger import (
    STATE_DIR,
    Ledger,
    changed_fields,
    fingerprint,
    fingerprint_record,
)
from dgaug.pipeline.lock import RunLock
from dgaug.pipeline.mix import ViewFilter, write_mix
from dgaug.pipeline.scan import INDEX_DIR, StageScan, scan_stages, write_index
from dgaug.pipeline.stage import ShardTask, Stage, StageContext
from dgaug.pipeline.status import PLAN_REL

log = logging.getLogger(__name__)

MANIFEST_REL = f"{DGAUG_DIR}/manifest.yaml"


class FingerprintMismatch(DgaugError):
    """Committed shards were made with a different config; mixing them would corrupt the dataset."""

    exit_code = REFUSED

    def __init__(self, mismatches: dict[str, tuple[int, list[str]]], output: str):
        self.mismatches = mismatches
        lines = []
        for stage, (count, changes) in mismatches.items():
            lines.append(
                f"stage {stage}: {count} committed shard(s) were made with another config:"
            )
            lines += [f"    {c}" for c in changes[:20]] or ["    (fingerprint differs)"]
        super().__init__(
            "\n".join(lines)
            + f"\nNothing was changed. Rerun with --force to redo those shards in {output}, "
            "or set a new `output` folder to keep both."
        )


@dataclass
class StagePlan:
    stage: Stage
    tasks: list[ShardTask]
    fp_record: dict[str, Any]
    committed: set[int] = field(default_factory=set)  # planned shards already done, fingerprint ok
    mismatched: dict[int, list[str]] = field(default_factory=dict)  # shard -> changed fields
    extra: list[int] = field(default_factory=list)  # committed shards the plan no longer has
    # Planned shards with this fingerprint whose files are missing or of another size than their
    # marker says -> why: not committed, so this run redoes them (byte-identical: shards are
    # deterministic); their downstream shards keep their markers.
    damaged: dict[int, str] = field(default_factory=dict)
    scan: StageScan | None = None  # what the output folder held when planned

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.fp_record)

    @property
    def todo(self) -> list[ShardTask]:
        return [t for t in self.tasks if t.shard_id not in self.committed]


@dataclass
class StageSummary:
    name: str
    output_dir: str
    planned: int = 0
    skipped: int = 0  # committed before this run
    done: int = 0
    failed: int = 0
    blocked: int = 0
    samples: int = 0  # written this run
    failures: dict[str, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    damaged: dict[int, str] = field(default_factory=dict)  # still missing or damaged at the end
    redone: int = 0  # damaged shards found when planned (redone by this run unless they failed)


@dataclass
class RunSummary:
    output: str
    stages: dict[str, StageSummary]
    seconds: float = 0.0
    cleaned_temporaries: int = 0
    took_over_lock: dict[str, Any] | None = None
    mix: dict[str, int] | None = None  # mix/sizes.json: every committed tar shard, by link name

    @property
    def ok(self) -> bool:
        return all(s.failed == 0 and s.blocked == 0 and not s.damaged for s in self.stages.values())


def stage_context(
    stages: dict[str, Stage], manifest: Any, storage: Storage, *, dry_run: bool = False
) -> StageContext:
    """The context every stage of the graph plans and processes in."""
    dirs = {n: s.output_dir for n, s in stages.items()}
    return StageContext(manifest, storage, dry_run=dry_run, output_dirs=dirs)


def plan_graph(
    stages: dict[str, Stage], manifest: Any, storage: Storage, *, dry_run: bool
) -> dict[str, StagePlan]:
    """Plan every stage (graph order) and compare with what is committed. Writes nothing if dry_run."""
    ctx = stage_context(stages, manifest, storage, dry_run=dry_run)
    # Every stage folder at once: on an object store their listings overlap.
    scans = scan_stages(storage, [stage.output_dir for stage in stages.values()])
    plans: dict[str, StagePlan] = {}
    for name, stage in stages.items():
        ctx.upstream = {up: plans[up].tasks for up in stage.upstream}
        planned = stage.plan(ctx)
        tasks = planned.tasks
        config = {**stage.fingerprint_config(), **planned.fingerprint_inputs}
        record = fingerprint_record(
            name, config, {up: plans[up].fingerprint for up in stage.upstream}
        )
        scan = scans[stage.output_dir]
        plan = StagePlan(stage, tasks, record, scan=scan)
        planned_ids = {t.shard_id for t in tasks}
        for shard, marker in scan.markers.items():
            if shard not in planned_ids:
                plan.extra.append(shard)
            elif marker.get("fingerprint") == plan.fingerprint:
                if shard in scan.damaged:
                    plan.damaged[shard] = scan.damaged[shard]
                else:
                    plan.committed.add(shard)
            else:
                plan.mismatched[shard] = changed_fields(scan.record(shard), record)
        plans[name] = plan
    return plans


def _check_mismatches(plans: dict[str, StagePlan], output: str) -> None:
    mism = {}
    for name, p in plans.items():
        if p.mismatched:
            first = p.mismatched[min(p.mismatched)]
            mism[name] = (len(p.mismatched), first)
    if mism:
        raise FingerprintMismatch(mism, output)


def _remove_shard(storage: Storage, ledger: Ledger, stage_dir: str, shard: int) -> None:
    marker = ledger.read_marker(stage_dir, shard) or {}
    ledger.clear_marker(stage_dir, shard)
    for name in marker.get("outputs", {}):
        storage.remove(f"{stage_dir}/{name}")


def write_sizes(storage: Storage, plan: StagePlan, scan: StageScan) -> dict[str, int]:
    """`sizes.json` beside the shards ({"00000.tar": n, ...}) so open_clip needs no sample count:
    the planned shards committed under the plan's fingerprint whose files are whole in `scan`."""
    stage = plan.stage
    committed = scan.committed(plan.fingerprint)
    sizes = {
        f"{stage.shard_name(t.shard_id)}{stage.shard_ext}": int(committed[t.shard_id]["samples"])
        for t in plan.tasks
        if t.shard_id in committed
    }
    if stage.shard_ext == ".tar":
        storage.write_json(f"{stage.output_dir}/sizes.json", sizes)
    return sizes


def refresh_index(storage: Storage, scan: StageScan) -> None:
    """Rewrite a stage's marker index when the scan had to read markers (new ones, or an output
    written before the index): the next status or resume then reads only what changes."""
    if scan.read:
        try:
            write_index(storage, scan)
        except OSError as e:  # only a cache: the markers still decide
            log.warning("could not write the marker index of %s: %s", scan.stage_dir, e)


def write_plan(storage: Storage, plans: dict[str, StagePlan]) -> None:
    storage.write_json(
        PLAN_REL,
        {
            name: {
                "output_dir": p.stage.output_dir,
                "shards": [t.shard_id for t in p.tasks],
                "fingerprint": p.fingerprint,
                "shard_ext": p.stage.shard_ext,
            }
            for name, p in plans.items()
        },
    )


def run_graph(
    stages: dict[str, Stage],
    manifest: Any,
    storage: Storage,
    make_executor: Callable[[], Executor],
    *,
    manifest_text: str,
    force: bool = False,
    listener: RunListener | None = None,
    view_filter: ViewFilter | None = None,
) -> RunSummary:
    """Run (or resume) a stage graph into `storage`; `manifest_text` is kept beside the shards.
    `view_filter` leaves samples out of the mix/ view. Raises LockHeld, FingerprintMismatch."""
    listener = listener or RunListener()
    storage.check()
    started = time.time()
    with RunLock(storage) as lock:
        cleaned = storage.clean_scratch()
        # A run killed inside an atomic write leaves its hidden `.tmp`; nothing else removes it.
        for rel in (f"{DGAUG_DIR}/inputs", f"{DGAUG_DIR}/source", INDEX_DIR):
            cleaned += storage.clean_stray_temporaries(rel, recursive=True)
        if cleaned:
            log.info("removed %d temporary item(s) left by an interrupted run", cleaned)
        storage.write_text(MANIFEST_REL, manifest_text)
        plans = plan_graph(stages, manifest, storage, dry_run=False)
        if not force:
            _check_mismatches(plans, storage.root)
        ledger = Ledger(storage)
        for p in plans.values():
            cleaned += storage.clean_stray_temporaries(p.stage.output_dir)
            # Markers are written the same way: a kill inside that write leaves one in _state.
            cleaned += storage.clean_stray_temporaries(f"{p.stage.output_dir}/{STATE_DIR}")
            if force and (p.mismatched or p.extra):
                # --force redoes mismatched shards; shards the new plan lacks would mix: remove them.
                for shard in p.extra:
                    _remove_shard(storage, ledger, p.stage.output_dir, shard)
                log.warning(
                    "--force: redoing %d shard(s) of %s made with another config, removed %d",
                    len(p.mismatched),
                    p.stage.name,
                    len(p.extra),
                )
        write_plan(storage, plans)
        for p in plans.values():
            if p.scan is not None:
                refresh_index(storage, p.scan)
            if p.damaged:
                first = min(p.damaged)
                log.warning(
                    "%s: %d committed shard(s) are missing or damaged and will be redone "
                    "(%05d: %s)",
                    p.stage.name,
                    len(p.damaged),
                    first,
                    p.damaged[first],
                )

        summary = RunSummary(
            storage.root, {}, cleaned_temporaries=cleaned, took_over_lock=lock.took_over
        )
        satisfied: set[tuple[str, int]] = set()
        todo: list[ShardTask] = []
        for name, p in plans.items():
            summary.stages[name] = StageSummary(
                name,
                p.stage.output_dir,
                planned=len(p.tasks),
                skipped=len(p.committed),
                redone=len(p.damaged),
            )
            satisfied |= {(name, s) for s in p.committed}
            todo += p.todo
            listener.stage_planned(name, len(p.tasks), len(p.committed))

        if todo:
            # The planning scans' findings are in the plans; the end-of-run scan must not
            # hold a second copy of every marker summary (41,000 shards per stage: 1 GB, not 0.9).
            for p in plans.values():
                p.scan = None
            executor = make_executor()
            ctx = stage_context(stages, manifest, storage)
            fp_records = {n: p.fp_record for n, p in plans.items()}
            for outcome in executor.execute(stages, todo, fp_records, ctx, satisfied, listener):
                s = summary.stages[outcome.stage]
                if outcome.ok:
                    s.done += 1
                    s.samples += outcome.samples
                    for reason, n in outcome.failures.items():
                        s.failures[reason] = s.failures.get(reason, 0) + n
                elif outcome.blocked:
                    s.blocked += 1
                else:
                    s.failed += 1
                    s.errors[outcome.shard_id] = outcome.error or "unknown error"

        tar_sizes: dict[str, dict[str, int]] = {}  # stage folder -> sizes, for mix/
        # What this run committed, and any shard lost meanwhile, as the view must show it. A run
        # with nothing to do ran nothing since its planning scans: they are that answer.
        if todo:
            scans = scan_stages(storage, [p.stage.output_dir for p in plans.values()])
        else:
            scans = {p.stage.output_dir: p.scan for p in plans.values() if p.scan is not None}
        for p in plans.values():
            scan = scans[p.stage.output_dir]
            if todo:  # else the index was refreshed from this very scan after planning
                refresh_index(storage, scan)
            sizes = write_sizes(storage, p, scan)
            if scan.damaged:
                summary.stages[p.stage.name].damaged = dict(scan.damaged)
            if p.stage.shard_ext == ".tar":
                tar_sizes[p.stage.output_dir] = sizes
        summary.mix = write_mix(storage, tar_sizes, view_filter)
        summary.seconds = time.time() - started
        return summary
