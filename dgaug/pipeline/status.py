"""What an output folder holds, read from the plan, the markers' index and two listings per stage
(fast, no models, no Ray): done, failed, damaged and pending shards, samples, skipped by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dgaug.core.storage import PLAN_REL, Storage
from dgaug.pipeline.lock import LOCK_REL
from dgaug.pipeline.scan import scan_stages


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
    # The committed shards counted: shard -> marker summary (dgaug.pipeline.scan.SUMMARY_FIELDS).
    markers: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Committed shards whose files are missing or of another size than their marker says -> why;
    # counted as pending: the next run redoes them.
    damaged: dict[int, str] = field(default_factory=dict)

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

    @property
    def any_damaged(self) -> bool:
        return any(s.damaged for s in self.stages.values())


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
    stages = {}
    scans = scan_stages(storage, [p["output_dir"] for p in plan.values()])
    for name, p in plan.items():
        shards = set(p["shards"])
        st = StageStatus(name, p["output_dir"], len(shards))
        scan = scans[p["output_dir"]]
        done_shards = set()
        for shard, m in scan.markers.items():
            if shard not in shards:
                continue
            if m.get("fingerprint") != p["fingerprint"]:
                st.stale += 1
                continue
            if shard in scan.damaged:
                st.damaged[shard] = scan.damaged[shard]
                continue
            done_shards.add(shard)
            st.markers[shard] = m
            st.done += 1
            st.samples += int(m.get("samples", 0))
            if failures := m.get("failures"):  # most shards skip nothing: Counter.update is slow
                st.failures.update(failures)
        for shard, rec in scan.failures.items():
            if shard in shards and shard not in done_shards:
                st.failed += 1
                st.errors[shard] = rec
                st.damaged.pop(shard, None)  # its redo failed: shown as failed, with the error
        stages[name] = st
    return OutputStatus(storage.root, True, stages, lock)
