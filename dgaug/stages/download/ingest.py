"""Existing webdataset shards taken in as dgaug shards: re-keyed, checked, written reproducibly."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dgaug.pipeline.manifest import expand_paths
from dgaug.pipeline.stage import ShardResult
from dgaug.stages.download.merge import write_deterministic_tar
from dgaug.stages.download.urls import SourceError, sample_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str) -> list[str]:
    """`/d/{00000..00009}.tar`, a glob, or a list -> the tar files, in order."""
    from braceexpand import braceexpand

    paths: list[str] = []
    for p in braceexpand(pattern):
        paths.extend(expand_paths(p))
    if not paths:
        raise SourceError([f"source.path: no shard matches {pattern!r}"])
    return paths


def _iter_samples(fileobj: Any) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
    """Group adjacent members by key (up to the first dot, as webdataset does); stop at damage."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    error = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                data = tf.extractfile(m).read()
                if samples and samples[-1][0] == key:
                    samples[-1][1][ext.lower()] = data
                else:
                    samples.append((key, {ext.lower(): data}))
    except (tarfile.TarError, EOFError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
        if samples:
            samples.pop()  # the last sample may be missing members cut off by the damage
    return samples, error


def ingest_tar(
    path: str, shard_id: int, out_tar: str, out_parquet: str, out_stats: str
) -> ShardResult:
    with fsspec.open(path, "rb") as f:
        samples, damage = _iter_samples(f)
    failures: Counter[str] = Counter()
    if damage:
        failures["truncated_tar"] += 1
    kept: list[tuple[str, dict[str, bytes]]] = []
    rows: list[dict[str, Any]] = []
    for idx, (src_key, members) in enumerate(samples):
        key = sample_key(shard_id, idx)
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        caption = members.get("txt", b"").decode("utf-8", errors="replace").strip()
        reason = None if image_ext else "missing_image"
        reason = reason or (None if caption else "empty_caption")
        rows.append(
            {
                "key": key,
                "source_key": src_key,
                "status": "skipped" if reason else "success",
                "error_message": reason,
                "caption": caption or None,
            }
        )
        if reason:
            failures[reason] += 1
            continue
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except ValueError:
                meta = {}
        meta = {**(meta if isinstance(meta, dict) else {}), "key": key, "source_key": src_key}
        out = {
            image_ext: members[image_ext],
            "txt": caption.encode(),
            "json": json.dumps(meta, indent=4).encode(),
        }
        kept.append((key, out))
    write_deterministic_tar(out_tar, kept)
    schema = pa.schema(
        [(n, pa.string()) for n in ("key", "source_key", "status", "error_message", "caption")]
    )
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
    with open(out_parquet, "wb") as f:
        f.write(buf.getvalue())
    stats = {
        "count": len(rows),
        "successes": len(kept),
        "source": path,
        "damage": damage,
        "failures": dict(sorted(failures.items())),
    }
    with open(out_stats, "w") as f:
        json.dump(stats, f, indent=4)
    return ShardResult(samples=len(kept), counts={"inputs": len(rows)}, failures=dict(failures))
