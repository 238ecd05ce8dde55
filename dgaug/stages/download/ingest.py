"""Existing webdataset shards taken in as dgaug shards: re-keyed, checked, written reproducibly."""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dgaug.core.constants import IMAGE_EXTS
from dgaug.core.tars import TarDamage, stream_samples, write_deterministic_tar
from dgaug.pipeline.stage import ShardResult
from dgaug.stages.download.urls import sample_key


def _iter_samples(
    fileobj: Any,
) -> tuple[list[tuple[str, dict[str, bytes]]], str | None, str | None]:
    """Every whole sample of a foreign tar, the damage that ended it (or None), and the source
    key of the sample the damage cut (or None)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        for sample in stream_samples(fileobj):
            samples.append(sample)
    except TarDamage as e:
        return samples, e.error, e.lost
    return samples, None, None


def _skip_reason(
    duplicate: bool, image_ext: str | None, members: dict[str, bytes], caption: str
) -> str | None:
    """Why a source sample is not taken in, or None.

    - `duplicate_key`: its key was already met in this tar (a sample written twice, or two
      samples under one name). The first is kept: the status rows map each source key to one
      dgaug key, and a sample written twice would be trained on twice.
    - `dotted_key`: no image member, but one whose name has dots before its image extension
      (`a.b.c.jpg`: key `a`, extension `b.c.jpg`). webdataset and open_clip split names the same
      way and would not find its image either; where the key ends is a guess, so it is counted,
      not guessed. Rename such members (`a_b_c.jpg`) to take them in.
    - `missing_image`, `empty_image` (zero bytes), `empty_caption`.
    Images are not decoded here (their bytes are kept as they are); the stages that decode them
    skip and count what they cannot use.
    """
    if duplicate:
        return "duplicate_key"
    if image_ext is None:
        dotted = any(e.rpartition(".")[2] in IMAGE_EXTS for e in members if "." in e)
        return "dotted_key" if dotted else "missing_image"
    if not members[image_ext]:
        return "empty_image"  # as the download stage counts a body with no bytes
    return None if caption else "empty_caption"


def ingest_tar(
    path: str, shard_id: int, out_tar: str, out_parquet: str, out_stats: str
) -> ShardResult:
    with fsspec.open(path, "rb") as f:
        samples, damage, lost = _iter_samples(f)
    failures: Counter[str] = Counter()
    kept: list[tuple[str, dict[str, bytes]]] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for idx, (src_key, members) in enumerate(samples):
        key = sample_key(shard_id, idx)
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        caption = members.get("txt", b"").decode("utf-8", errors="replace").strip()
        reason = _skip_reason(src_key in seen, image_ext, members, caption)
        seen.add(src_key)
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
    if damage:
        # The sample cut by the damage (if any was being read) gets a status row like any other
        # skipped one, so that samples + failures == inputs == status rows.
        failures["truncated_tar"] += 1
        rows.append(
            {
                "key": sample_key(shard_id, len(samples)),
                "source_key": lost,
                "status": "skipped",
                "error_message": "truncated_tar",
                "caption": None,
            }
        )
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
