"""Read what a run's output holds for the report: stage status, shard timings, training results."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dgaug.core.storage import PLAN_REL, Storage

log = logging.getLogger(__name__)

TRAIN_DIR = "train"  # `dgaug train MANIFEST` writes OUTPUT/train/<mode>/
TRAIN_JSON = "train.json"  # the names dgaug.trainer.run writes (not imported: it loads torch)
EVAL_JSON = "eval.json"


class NothingToReport(Exception):
    """The output folder does not exist: no run has written anything there yet."""


@dataclass
class ShardTiming:
    """When one committed shard finished, how long its last attempt took, what it made."""

    shard: int
    finished: float  # seconds since the epoch (UTC)
    duration_s: float
    samples: int

    @property
    def started(self) -> float:
        return self.finished - self.duration_s


@dataclass
class Training:
    """One `dgaug train` result folder: its train.json and eval.json as written (None if absent)."""

    mode: str
    train: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class RunView:
    """Everything the report shows about the run that is not pixels or features."""

    storage: Storage
    status: Any  # dgaug.pipeline.status.OutputStatus, the numbers `dgaug status` prints
    plan: dict[str, dict[str, Any]]  # stage -> plan.json entry (output_dir, shards, fingerprint)
    markers: dict[str, dict[int, dict[str, Any]]]  # stage -> the committed markers status counted
    trainings: list[Training]
    problems: list[str] = field(default_factory=list)  # what could not be read, for the page

    def output_dir(self, stage: str) -> str | None:
        entry = self.plan.get(stage)
        return entry["output_dir"] if entry else None

    def committed(self, stage: str) -> dict[int, dict[str, Any]]:
        return self.markers.get(stage, {})

    def timings(self, stage: str) -> list[ShardTiming]:
        out = []
        for shard, m in sorted(self.committed(stage).items()):
            finished = parse_time(m.get("finished_at"))
            if finished is None:
                continue
            duration = float(m.get("duration_s") or 0.0)
            out.append(ShardTiming(shard, finished, duration, int(m.get("samples", 0))))
        return out


def parse_time(text: Any) -> float | None:
    """`2026-11-24T23:17:03Z` (the markers' format) -> epoch seconds; None if absent or malformed."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def read_run(output: str, read_status: Callable[[str], Any], stage_order: Sequence[str]) -> RunView:
    """The run in `output` (local path or fsspec URL). Raises NothingToReport if it is not there.

    `read_status` is what `dgaug status` uses, so both always agree; `stage_order` is the graph's.
    """
    storage = Storage(output)
    if not storage.exists(""):
        raise NothingToReport(f"output {storage.root} does not exist: no run has written there yet")
    status = read_status(output)
    problems: list[str] = []
    try:
        plan = storage.read_json(PLAN_REL) if status.started else {}
    except (FileNotFoundError, ValueError) as e:
        plan, status.started = {}, False
        problems.append(f"{PLAN_REL}: unreadable ({e})")
    # plan.json's keys are sorted by name; the page lists stages in graph order.
    order = list(stage_order)

    def position(stage: str) -> tuple[int, str]:
        return (order.index(stage) if stage in order else len(order), stage)

    plan = {n: plan[n] for n in sorted(plan, key=position)}
    status.stages = {n: status.stages[n] for n in sorted(status.stages, key=position)}
    # The markers read_status counted as done (planned shard, the plan's fingerprint).
    markers = {n: st.markers for n, st in status.stages.items()}
    return RunView(storage, status, plan, markers, read_trainings(storage, problems), problems)


def read_trainings(storage: Storage, problems: list[str]) -> list[Training]:
    """Each OUTPUT/train/<mode>/ that holds a train.json or an eval.json."""
    out = []
    for mode in storage.list(TRAIN_DIR):
        names = set(storage.list(f"{TRAIN_DIR}/{mode}"))
        if not names & {TRAIN_JSON, EVAL_JSON}:
            continue
        t = Training(mode)
        for name, attr in ((TRAIN_JSON, "train"), (EVAL_JSON, "eval")):
            if name not in names:
                continue
            rel = f"{TRAIN_DIR}/{mode}/{name}"
            try:
                data = storage.read_json(rel)
            except (OSError, ValueError) as e:
                t.problems.append(f"{rel}: unreadable ({e})")
                continue
            if isinstance(data, dict):
                setattr(t, attr, data)
            else:
                t.problems.append(f"{rel}: not a JSON object")
        problems.extend(t.problems)
        out.append(t)
    return out
