"""What a stage folder holds, decided by two listings (its markers, its shards) and a cached index
of the markers, instead of one read per marker: the committed shards, the damaged ones, failures.

The marker stays the commit. `_dgaug/index/S.json` is only a cache of marker summaries, each kept
with the marker's listing stamp (size, mtime and inode; or the object's ETag): a marker whose
stamp differs from the index's, or that the index lacks, is read (in parallel); an index entry
whose marker is not listed is ignored. So a stale, missing or damaged index costs reads, never a
wrong answer, and outputs written before the index existed are read as they are.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dgaug.core.storage import DGAUG_DIR, Storage
from dgaug.pipeline.ledger import STATE_DIR

log = logging.getLogger(__name__)

INDEX_DIR = f"{DGAUG_DIR}/index"  # dgaug's own folder: the stage folders hold only shards, _state
INDEX_VERSION = 2  # 2: outputs as {name: bytes} (the sha256s stay in the markers, for verify)
MARKER_SUFFIX = ".json"
ERROR_SUFFIX = ".error.json"
# What status, plan and the report need of a marker; the rest stays in the marker.
SUMMARY_FIELDS = (
    "fingerprint",
    "samples",
    "failures",
    "outputs",
    "finished_at",
    "duration_s",
    "attempts",
)
READ_THREADS = 16  # markers read at once where the index does not hold them (object stores)


@dataclass
class StageScan:
    """One stage folder as its listings and markers show it."""

    stage_dir: str
    # Every readable marker: shard -> summary (SUMMARY_FIELDS + "stamp"), whatever its fingerprint.
    markers: dict[int, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprint -> its record
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)  # shard -> failure record
    damaged: dict[int, str] = field(default_factory=dict)  # marked shard whose files are not whole
    read: int = 0  # markers read because the index did not hold them (as listed)
    indexed: int = 0  # markers taken from the index

    def committed(self, fingerprint: str | None = None) -> dict[int, dict[str, Any]]:
        """Markers whose files are all there at their recorded sizes (of `fingerprint` if given)."""
        return {
            s: m
            for s, m in self.markers.items()
            if s not in self.damaged
            and (fingerprint is None or m.get("fingerprint") == fingerprint)
        }

    def record(self, shard: int) -> dict[str, Any]:
        """The fingerprint record of shard `shard`'s marker ({} if unknown)."""
        fp = self.markers.get(shard, {}).get("fingerprint")
        return self.records.get(fp, {}) if isinstance(fp, str) else {}


def summarize(marker: dict[str, Any]) -> dict[str, Any]:
    """The marker's SUMMARY_FIELDS, its outputs as {name: bytes}: at 41,000 shards per stage
    every summary is held and indexed, and a file's sha256 is needed only by verify, which
    reads the marker (an output dict and its hash were half of a summary's memory)."""
    summary = {k: marker[k] for k in SUMMARY_FIELDS if k in marker and k != "outputs"}
    outputs = marker.get("outputs")
    if isinstance(outputs, dict):
        summary["outputs"] = {
            name: (out.get("bytes") if isinstance(out, dict) else None)
            for name, out in outputs.items()
        }
    return summary


def _shard_of(name: str, suffix: str) -> int | None:
    stem = name[: -len(suffix)] if name.endswith(suffix) else None
    return int(stem) if stem is not None and stem.isdigit() else None


def index_rel(stage_dir: str) -> str:
    """Where the marker index of stage folder `stage_dir` is kept."""
    return f"{INDEX_DIR}/{stage_dir.strip('/').replace('/', '__')}.json"


def _read_index(storage: Storage, stage_dir: str) -> dict[str, Any]:
    try:
        index = storage.read_json(index_rel(stage_dir))
    except (OSError, ValueError):
        return {}
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        return {}
    return index


def _read_many(storage: Storage, rels: list[str]) -> list[Any]:
    """Read JSON files in parallel (one request each); None for one that cannot be read."""

    def one(rel: str) -> Any:
        try:
            return storage.read_json(rel)
        except (OSError, ValueError):
            return None  # unreadable marker: the shard counts as not committed and is redone

    if len(rels) <= 1:
        return [one(r) for r in rels]
    with ThreadPoolExecutor(min(READ_THREADS, len(rels))) as pool:
        return list(pool.map(one, rels))


def scan_stage(storage: Storage, stage_dir: str, *, check_files: bool = True) -> StageScan:
    """Scan `stage_dir`: list its markers, take what the index holds, read the rest; then (if
    `check_files`) list the shard files and mark as damaged every marked shard whose file is
    missing or not of the size its marker recorded."""
    with gc_paused():
        return _scan_stage(storage, stage_dir, check_files=check_files)


def _scan_stage(storage: Storage, stage_dir: str, *, check_files: bool) -> StageScan:
    scan = StageScan(stage_dir)
    state = f"{stage_dir}/{STATE_DIR}"
    listed = storage.list_detail(state)
    index = _read_index(storage, stage_dir)
    cached: dict[str, Any] = index.get("shards", {})
    scan.records = dict(index.get("records", {}))
    to_read: list[tuple[int, str]] = []
    error_names: list[tuple[int, str]] = []
    markers = scan.markers
    for name, (_, stamp) in listed.items():
        # "00042.json" (a marker), "00042.error.json" (a failure), anything else ignored
        stem = name[: -len(MARKER_SUFFIX)] if name.endswith(MARKER_SUFFIX) else ""
        if stem.isdigit():
            shard = int(stem)
            hit = cached.get(str(shard))  # the index's keys are str(shard): "42"
            if hit is not None and hit.get("stamp") == stamp:
                markers[shard] = hit
            else:
                to_read.append((shard, name))
        elif (shard := _shard_of(name, ERROR_SUFFIX)) is not None:
            error_names.append((shard, name))
    scan.indexed = len(markers)
    read = _read_many(storage, [f"{state}/{n}" for _, n in to_read])
    for (shard, name), marker in zip(to_read, read, strict=True):
        if not isinstance(marker, dict):
            continue
        summary = summarize(marker)
        summary["stamp"] = listed[name][1]
        scan.markers[shard] = summary
        fp = marker.get("fingerprint")
        if isinstance(fp, str) and fp not in scan.records:
            scan.records[fp] = marker.get("fingerprint_record", {})
        scan.read += 1
    errors = _read_many(storage, [f"{state}/{n}" for _, n in error_names])
    for (shard, _), rec in zip(error_names, errors, strict=True):
        if isinstance(rec, dict):
            scan.failures[shard] = rec
    if check_files:
        scan.damaged = find_damaged(storage.list_sizes(stage_dir), scan.markers)
    return scan


def scan_stages(storage: Storage, stage_dirs: list[str]) -> dict[str, StageScan]:
    """scan_stage of every folder in `stage_dirs`, all at once: on an object store each is a few
    listings' round trips, which overlap instead of adding up."""
    with gc_paused():
        if len(stage_dirs) <= 1 or storage.is_local:
            return {d: scan_stage(storage, d) for d in stage_dirs}
        with ThreadPoolExecutor(len(stage_dirs)) as pool:
            return dict(
                zip(stage_dirs, pool.map(lambda d: scan_stage(storage, d), stage_dirs), strict=True)
            )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a scan builds its millions of small, acyclic objects
    (index entries, listings): each automatic collection would walk all of them again, 1.1 of
    5.7 s of a status at 41,000 shards per stage. Collection resumes as it was after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def find_damaged(files: dict[str, int], markers: dict[int, dict]) -> dict[int, str]:
    """Marked shards whose files (`files`: a listing of the stage folder) are missing or not of
    the size the marker recorded -> why, naming each file."""
    damaged: dict[int, str] = {}
    for shard, m in markers.items():
        for name, want in (m.get("outputs") or {}).items():
            size = files.get(name)
            if size is None or (want is not None and size != want and size != int(want)):
                damaged[shard] = _damage(files, m["outputs"])  # rare: spell it out
                break
    return damaged


def _damage(files: dict[str, int], outputs: dict[str, Any]) -> str:
    problems = []
    for name, want in outputs.items():
        if name not in files:
            problems.append(f"{name} is missing")
        elif want is not None and files[name] != int(want):
            problems.append(f"{name} is {files[name]} bytes, its marker says {want}")
    return "; ".join(problems)


def write_index(storage: Storage, scan: StageScan) -> None:
    """Cache `scan`'s markers in `_dgaug/index/S.json` (one atomic write). Call it under the run
    lock, after a scan that read markers: the next scan then reads only markers written since."""
    used = {m.get("fingerprint") for m in scan.markers.values()}
    storage.write_bytes(
        index_rel(scan.stage_dir),
        _dumps(
            {
                "version": INDEX_VERSION,
                "records": {fp: r for fp, r in scan.records.items() if fp in used},
                "shards": {str(s): m for s, m in sorted(scan.markers.items())},
            }
        ),
    )
    log.debug("%s: index of %d marker(s) written", scan.stage_dir, len(scan.markers))


def _dumps(obj: Any) -> bytes:
    # Compact: at 41,000 shards the index is read whole by every status and resume.
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
