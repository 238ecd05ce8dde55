"""What an output folder holds, read from the plan and the markers alone (fast, no models, no Ray)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dgaug.core.storage import PLAN_REL, Storage
from dgaug.pipeline.ledger import Ledger
from dgaug.pipeline.lock import LOCK_REL


@dataclass
class StageStatus:
    name: str
    output_dir: str
    planned: int
    done: int = 0
    failed: int = 0
    samples: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    errors: dict[int, dict[str, Any]] = field(default_factory=dict)  # shard -> failure record
    stale: int = 0  # committed under another fingerprint
    markers: dict[int, dict[str, Any]] = field(default_factory=dict)  # the committed shards counted

    @property
    def pending(self) -> int:
        return self.planned - self.done - self.failed


@dataclass
class OutputStatus:
    output: str
    started: bool
    stages: dict[str, StageStatus]
    lock: dict[str, Any] | None

    @property
    def complete(self) -> bool:
        return self.started and all(s.done == s.planned for s in self.stages.values())

    @property
    def any_failed(self) -> bool:
        return any(s.failed for s in self.stages.values())


def read_status(output: str) -> OutputStatus:
    storage = Storage(output)
    storage.check()
    try:
        plan = storage.read_json(PLAN_REL)
    except FileNotFoundError:
        return OutputStatus(storage.root, False, {}, None)
    try:
        lock = storage.read_json(LOCK_REL)
    except (FileNotFoundError, ValueError):
        lock = None
    ledger = Ledger(storage)
    stages = {}
    for name, p in plan.items():
        shards = set(p["shards"])
        st = StageStatus(name, p["output_dir"], len(shards))
        done_shards = set()
        for shard, m in ledger.committed(p["output_dir"]).items():
            if shard not in shards:
                continue
            if m.get("fingerprint") != p["fingerprint"]:
                st.stale += 1
                continue
            done_shards.add(shard)
            st.markers[shard] = m
            st.done += 1
            st.samples += int(m.get("samples", 0))
            st.failures.update(m.get("failures", {}))
        for shard, rec in ledger.failures(p["output_dir"]).items():
            if shard in shards and shard not in done_shards:
                st.failed += 1
                st.errors[shard] = rec
        stages[name] = st
    return OutputStatus(storage.root, True, stages, lock)
