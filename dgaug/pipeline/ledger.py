"""Shard markers: the commit record of each finished shard, failure records, and stage fingerprints."""

from __future__ import annotations

from typing import Any

from dgaug import __version__
from dgaug.core.hashing import record_hash
from dgaug.core.storage import Storage

STATE_DIR = "_state"


def version_major_minor() -> str:
    return ".".join(__version__.split(".")[:2])


def fingerprint_record(
    stage: str, config: dict[str, Any], upstream: dict[str, str]
) -> dict[str, Any]:
    """Everything a stage's output depends on: its effective config, its inputs, dgaug's version."""
    return {
        "stage": stage,
        "config": config,
        "upstream": dict(sorted(upstream.items())),
        "dgaug": version_major_minor(),
    }


def fingerprint(record: dict[str, Any]) -> str:
    return record_hash(record, 16, compact=True)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human lines naming each field whose value differs, e.g. `config.image_size: 64 -> 128`."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


class Ledger:
    """Reads and writes `S/_state/{i:05d}.json` (committed) and `.error.json` (last failure)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def marker_rel(stage_dir: str, shard_id: int) -> str:
        return f"{stage_dir}/{STATE_DIR}/{shard_id:05d}.json"

    @staticmethod
    def error_rel(stage_dir: str, shard_id: int) -> str:
        return f"{stage_dir}/{STATE_DIR}/{shard_id:05d}.error.json"

    def _read_all(self, stage_dir: str, suffix: str) -> dict[int, dict[str, Any]]:
        out = {}
        for name in self.storage.list(f"{stage_dir}/{STATE_DIR}"):
            stem = name[: -len(suffix)] if name.endswith(suffix) else None
            if stem is None or not stem.isdigit():
                continue
            try:
                out[int(stem)] = self.storage.read_json(f"{stage_dir}/{STATE_DIR}/{name}")
            except (OSError, ValueError):
                continue  # unreadable marker: the shard counts as not committed and is redone
        return out

    def committed(self, stage_dir: str) -> dict[int, dict[str, Any]]:
        return self._read_all(stage_dir, ".json")

    def failures(self, stage_dir: str) -> dict[int, dict[str, Any]]:
        return self._read_all(stage_dir, ".error.json")

    def read_marker(self, stage_dir: str, shard_id: int) -> dict[str, Any] | None:
        try:
            return self.storage.read_json(self.marker_rel(stage_dir, shard_id))
        except (FileNotFoundError, ValueError):
            return None

    def read_failure(self, stage_dir: str, shard_id: int) -> dict[str, Any] | None:
        try:
            return self.storage.read_json(self.error_rel(stage_dir, shard_id))
        except (FileNotFoundError, ValueError):
            return None

    def write_marker(self, stage_dir: str, shard_id: int, marker: dict[str, Any]) -> None:
        self.storage.write_json(self.marker_rel(stage_dir, shard_id), marker)

    def clear_marker(self, stage_dir: str, shard_id: int) -> None:
        self.storage.remove(self.marker_rel(stage_dir, shard_id))

    def write_failure(self, stage_dir: str, shard_id: int, record: dict[str, Any]) -> None:
        self.storage.write_json(self.error_rel(stage_dir, shard_id), record)

    def clear_failure(self, stage_dir: str, shard_id: int) -> None:
        self.storage.remove(self.error_rel(stage_dir, shard_id))
