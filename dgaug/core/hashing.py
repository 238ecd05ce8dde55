"""Stable hashes of records and files, and the seeds every random choice derives from."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal


def canonical_json(record: Any, *, compact: bool = False) -> bytes:
    """`record` as sorted-key JSON; `compact` drops the spaces (and shows unknown types as str)."""
    if compact:
        return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()
    return json.dumps(record, sort_keys=True).encode()


def record_hash(record: Any, length: int = 16, *, compact: bool = False) -> str:
    """The first `length` hex digits of sha256 of the record's canonical JSON."""
    return hashlib.sha256(canonical_json(record, compact=compact)).hexdigest()[:length]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    """sha256 of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def derive_seed(*parts: object, byteorder: Literal["big", "little"] = "big") -> int:
    """A 63-bit seed: the first 8 bytes of sha256("/".join(parts)). The same parts give the same
    stream on every machine, whatever the batch, shard or worker.

    The trainer's batches were drawn with `byteorder="little"` from the start; it keeps that so
    its checkpoints resume bit-identically.
    """
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], byteorder) >> 1
