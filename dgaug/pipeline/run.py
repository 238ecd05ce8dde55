"""A run: lock the output, plan every stage, skip what is committed, execute the rest, write
sizes.json and the mix/ view."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dgaug.core.storage import DGAUG_DIR, Storage
from dgaug.job.graph import build_stages
from dgaug.job.manifest import Manifest, dump_manifest
from dgaug.pipeline.executors import RunListener, make_executor
from dgaug.pipeline.ledger import (
    STATE_DIR,
    Ledger,
    changed_fields,
    fingerprint,
    fingerprint_record,
)
from dgaug.pipeline.lock import RunLock
from dgaug.pipeline.mix import write_mix
from dgaug.pipeline.stage import ShardTask, Stage, StageContext
from dgaug.pipeline.status import PLAN_REL

log = logging.getLogger(__name__)

MANIFEST_REL = f"{DGAUG_DIR}/manifest.yaml"


class FingerprintMismatch(Exception):
    """Committed shards were made with a different config; mixing them would corrupt the dataset."""

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
        return all(s.failed == 0 and s.blocked == 0 for s in self.stages.values())


def plan_stages(manifest: Manifest, storage: Storage, *, dry_run: bool) -> dict[str, StagePlan]:
    """Plan every enabled stage and compare with what is committed. Writes nothing if dry_run."""
    stages = build_stages(manifest)
    ledger = Ledger(storage)
    ctx = StageContext(manifest, storage, dry_run=dry_run)
    plans: dict[str, StagePlan] = {}
    for name, stage in stages.items():
        ctx.upstream = {up: plans[up].tasks for up in stage.upstream}
        tasks = stage.plan(ctx)
        record = fingerprint_record(
            name, stage.fingerprint_config(), {up: plans[up].fingerprint for up in stage.upstream}
        )
        plan = StagePlan(stage, tasks, record)
        planned = {t.shard_id for t in tasks}
        for shard, marker in ledger.committed(stage.output_dir).items():
            if shard not in planned:
                plan.extra.append(shard)
            elif marker.get("fingerprint") == plan.fingerprint:
                plan.committed.add(shard)
            else:
                plan.mismatched[shard] = changed_fields(
                    marker.get("fingerprint_record", {}), record
                )
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


def write_sizes(storage: Storage, plan: StagePlan) -> dict[str, int]:
    """`sizes.json` beside the shards ({"00000.tar": n, ...}) so open_clip needs no sample count."""
    stage = plan.stage
    ledger = Ledger(storage)
    committed = ledger.committed(stage.output_dir)
    sizes = {
        f"{stage.shard_name(t.shard_id)}{stage.shard_ext}": int(committed[t.shard_id]["samples"])
        for t in plan.tasks
        if t.shard_id in committed
    }
    if stage.shard_ext == ".tar":
        storage.write_json(f"{stage.output_dir}/sizes.json", sizes)
    return sizes


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


def run_pipeline(
    manifest: Manifest, *, force: bool = False, listener: RunListener | None = None
) -> RunSummary:
    """Run (or resume) the manifest's stage graph. Raises LockHeld, FingerprintMismatch, ManifestError."""
    listener = listener or RunListener()
    storage = Storage(manifest.output)
    storage.check()
    started = time.time()
    with RunLock(storage) as lock:
        cleaned = storage.clean_scratch()
        # A run killed inside an atomic write leaves its hidden `.tmp`; nothing else removes it.
        for rel in (f"{DGAUG_DIR}/inputs", f"{DGAUG_DIR}/source"):
            cleaned += storage.clean_stray_temporaries(rel, recursive=True)
        if cleaned:
            log.info("removed %d temporary item(s) left by an interrupted run", cleaned)
        storage.write_text(MANIFEST_REL, dump_manifest(manifest))
        plans = plan_stages(manifest, storage, dry_run=False)
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

        summary = RunSummary(
            storage.root, {}, cleaned_temporaries=cleaned, took_over_lock=lock.took_over
        )
        satisfied: set[tuple[str, int]] = set()
        todo: list[ShardTask] = []
        for name, p in plans.items():
            summary.stages[name] = StageSummary(
                name, p.stage.output_dir, planned=len(p.tasks), skipped=len(p.committed)
            )
            satisfied |= {(name, s) for s in p.committed}
            todo += p.todo
            listener.stage_planned(name, len(p.tasks), len(p.committed))

        if todo:
            executor = make_executor(manifest)
            ctx = StageContext(manifest, storage)
            stages = {n: p.stage for n, p in plans.items()}
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
        for p in plans.values():
            sizes = write_sizes(storage, p)
            if p.stage.shard_ext == ".tar":
                tar_sizes[p.stage.output_dir] = sizes
        summary.mix = write_mix(storage, tar_sizes)
        summary.seconds = time.time() - started
        return summary
