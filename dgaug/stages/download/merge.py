"""img2dataset's sub-shards merged into one dgaug shard: re-keyed, sorted, byte-for-byte reproducible."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dgaug.core.tars import write_deterministic_tar
from dgaug.stages.download.urls import KEY_COL

# Timing fields of img2dataset's stats would make two identical runs differ; durations live in markers.
_STATS_TIME_FIELDS = {"start_time", "end_time", "duration"}


def failure_reason(status: str | None, error: str | None) -> str:
    """A short, countable reason for a sample that did not make it into the shard.

    Reasons must not carry byte counts, paths or URLs: they are counted across millions of rows.
    """
    e = (error or "").lower()
    m = re.search(r"http error (\d{3})", e)
    if m:
        code = int(m.group(1))
        return f"http_{code}" if code in (403, 404, 410, 429) else f"http_{code // 100}xx"
    if "x-robots-tag" in e:
        return "opted_out"
    # A transfer cut short: "IncompleteRead(300 bytes read, 700 more expected)".
    if "incompleteread" in e or "incomplete read" in e:
        return "truncated_download"
    # urllib: "unknown url type: 'x'", "<urlopen error unknown url type: ftp2>", "no host given".
    if "unknown url type" in e or "no host given" in e or "control characters" in e:
        return "bad_url"
    # A file:// URL to nothing: "<urlopen error [Errno 2] No such file or directory: '/x.jpg'>".
    if "no such file" in e:
        return "file_not_found"
    # The launcher's decode guard (a decompression bomb), or OpenCV's own pixel limit behind it.
    if "image too large" in e or "cv_io_max_image" in e:
        return "image_too_large"
    # A 200 with no body: the guard's message, or OpenCV's assertion where the guard is absent.
    if "empty image" in e or "buf.empty()" in e:
        return "empty_image"
    if "timed out" in e or "timeout" in e:
        return "timeout"
    if any(s in e for s in ("connection", "name or service", "urlopen error", "remote end")):
        return "connection"
    if any(s in e for s in ("decod", "identify image", "truncated", "cannot read")):
        return "undecodable_image"
    if "too small" in e or "aspect ratio" in e or "too large" in e:
        return "filtered_size"
    if status == "failed_to_resize":
        return "resize_error"
    if not error:
        return "other"
    # Unknown message: a slug without numbers or quoted parts, so that it stays countable.
    slug = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", " ", e)
    return re.sub(r"[^a-z]+", "_", slug).strip("_")[:40].strip("_") or "other"


# What img2dataset appends to the input columns of its status rows, called as the stage calls it
# (compute_hash="sha256", extract_exif left on).
_I2D_STATUS_FIELDS = [
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
]


def _status_schema_without_download(rows: list[dict[str, Any]]) -> pa.Schema:
    """img2dataset's status schema for a shard none of whose rows reached it.

    img2dataset orders the input columns as: extra columns, caption, url.
    """
    own = {name for name, _ in _I2D_STATUS_FIELDS} | {KEY_COL, "url", "caption"}
    first = rows[0] if rows else {}
    cols = [c for c in first if c not in own]
    cols += ["caption"] if "caption" in first else []
    cols += ["url"]
    return pa.schema([(c, pa.string()) for c in cols] + _I2D_STATUS_FIELDS)


def merge_shards(
    i2d_dir: str,
    out_tar: str,
    out_parquet: str,
    out_stats: str,
    expected_keys: list[str],
    skipped_rows: list[dict[str, Any]],
) -> tuple[int, dict[str, int], dict[str, int]]:
    """Merge every `i2d_dir/*.tar|parquet` into one shard keyed by KEY_COL, all at once.

    `skipped_rows` are inputs rejected before download (no URL, empty caption); they get a status
    row too. Raises if any expected key is missing or duplicated: a lost sample is an error.
    Returns (samples written, counts, failures by reason).
    """
    tar_paths = sorted(glob.glob(os.path.join(i2d_dir, "*.tar")))
    located = [sample for path in tar_paths for sample in _subshard_samples(path)]
    located.sort(key=lambda x: x[0])
    write_deterministic_tar(out_tar, located)
    return merge_status(i2d_dir, out_parquet, out_stats, expected_keys, skipped_rows, len(located))


class SubShardsOutOfOrder(RuntimeError):
    """A sub-shard holds a key below one already written: only a whole merge can sort them."""


def stream_tar(subshard_tars: Iterable[str], out_tar: str) -> int:
    """Write the samples of img2dataset's tars, given in sub-shard order, as they come.

    Each sub-shard covers a run of consecutive input rows (img2dataset cuts its input in order),
    so sub-shard after sub-shard, each sorted, is key order: the bytes `merge_shards` writes. The
    caller hands over a sub-shard as soon as img2dataset has closed it, so this merge runs while
    later sub-shards download. Returns the samples written; raises SubShardsOutOfOrder if a
    sub-shard breaks the order (then nothing written may be kept).
    """
    written = 0
    last = ""

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        nonlocal written, last
        for path in subshard_tars:
            for key, members in _subshard_samples(path):
                if key <= last:
                    raise SubShardsOutOfOrder(f"{path}: key {key} after {last}")
                last = key
                written += 1
                yield key, members

    write_deterministic_tar(out_tar, samples())
    return written


def finished_subshards(
    i2d_dir: str, count: int, child_done: Callable[[], bool], poll_s: float = 0.05
) -> Iterator[str]:
    """img2dataset's tars `0..count-1` in order, each once its `_stats.json` says it is closed.

    img2dataset closes a sub-shard's tar and parquet before it writes the stats. Once the call
    has ended, the tars left are handed over as they are: a sub-shard it failed shows as missing
    status rows, which `merge_status` reports.
    """
    for j in range(count):
        while True:
            ended = child_done()  # read before the listing: no stats can appear after it
            names = {n for n in os.listdir(i2d_dir) if n.endswith(("_stats.json", ".tar"))}
            stats = {int(n.split("_")[0]): n for n in names if n.endswith("_stats.json")}
            if j in stats or ended:
                break
            time.sleep(poll_s)
        tar = f"{stats[j].removesuffix('_stats.json')}.tar" if j in stats else None
        if tar is None:
            tar = next((n for n in names if n.endswith(".tar") and int(n[:-4]) == j), None)
        if tar is not None and tar in names:
            yield os.path.join(i2d_dir, tar)


def merge_status(
    i2d_dir: str,
    out_parquet: str,
    out_stats: str,
    expected_keys: list[str],
    skipped_rows: list[dict[str, Any]],
    samples: int,
) -> tuple[int, dict[str, int], dict[str, int]]:
    """The shard's status parquet and stats json from the sub-shards'; `samples` is how many the
    tar holds, checked against the successes. Raises if any expected key is missing or duplicated."""
    tables = [pq.read_table(p) for p in sorted(glob.glob(os.path.join(i2d_dir, "*.parquet")))]
    tables = [t for t in tables if t.num_rows]
    rows: list[dict[str, Any]] = []
    for t in tables:
        rows.extend(t.to_pylist())
    rows.extend(skipped_rows)
    seen = Counter(r[KEY_COL] for r in rows)
    dup = [k for k, n in seen.items() if n > 1]
    lost = sorted(set(expected_keys) - set(seen))
    if dup or lost:
        raise RuntimeError(
            f"img2dataset's status rows do not match the shard's inputs: {len(lost)} missing "
            f"(e.g. {lost[:3]}), {len(dup)} duplicated (e.g. {dup[:3]})"
        )
    for r in rows:
        r["key"] = r.pop(KEY_COL)
    rows.sort(key=lambda r: r["key"])

    failures: Counter[str] = Counter()
    for r in rows:
        if r.get("status") != "success":
            failures[failure_reason(r.get("status"), r.get("error_message"))] += 1

    # The status parquet: img2dataset's schema, one row per input, in key order.
    if tables:
        schema = tables[0].schema
        schema = schema.remove(schema.get_field_index(KEY_COL))
    else:
        # Every row was skipped before download: the same schema all the same, so that the
        # shards' parquets read as one table (types inferred from these rows would differ).
        schema = _status_schema_without_download(rows)
    names = schema.names
    table = pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=schema)
    pq.write_table(table, out_parquet, compression="zstd")
    return _finish(i2d_dir, out_stats, rows, skipped_rows, failures, samples)


def _subshard_samples(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """The successful samples of one img2dataset tar, re-keyed by KEY_COL, in key order."""
    located: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r:") as tf:
        index: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in tf.getmembers():
            if m.isfile():
                key, _, ext = os.path.basename(m.name).partition(".")
                index.setdefault(key, {})[ext] = m
        for members in index.values():
            if "json" not in members:
                continue
            out: dict[str, bytes] = {}
            new_key = ""
            for ext, m in members.items():
                data = tf.extractfile(m).read()
                if ext == "json":
                    meta = json.loads(data)
                    new_key = meta.pop(KEY_COL)
                    meta["key"] = new_key
                    data = json.dumps(meta, indent=4).encode()
                out[ext] = data
            located.append((new_key, out))
    located.sort(key=lambda x: x[0])
    return located


def _finish(
    i2d_dir: str,
    out_stats: str,
    rows: list[dict[str, Any]],
    skipped_rows: list[dict[str, Any]],
    failures: Counter[str],
    samples: int,
) -> tuple[int, dict[str, int], dict[str, int]]:
    """The shard's stats json from the sub-shards'; checks the tar against the status rows."""
    stats: dict[str, Any] = {
        "count": 0,
        "successes": 0,
        "failed_to_download": 0,
        "failed_to_resize": 0,
    }
    status_dict: Counter[str] = Counter()
    for p in sorted(glob.glob(os.path.join(i2d_dir, "*_stats.json"))):
        with open(p) as f:
            s = json.load(f)
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            stats[k] += int(s.get(k, 0))
        status_dict.update(s.get("status_dict", {}))
    stats["count"] += len(skipped_rows)
    stats["skipped_before_download"] = len(skipped_rows)
    stats["status_dict"] = dict(sorted(status_dict.items()))
    stats["failures"] = dict(sorted(failures.items()))
    with open(out_stats, "w") as f:
        json.dump({k: v for k, v in stats.items() if k not in _STATS_TIME_FIELDS}, f, indent=4)

    counts = {"inputs": len(rows), "skipped": sum(failures.values())}
    successes = sum(1 for r in rows if r.get("status") == "success")
    if samples != successes:
        raise RuntimeError(
            f"{samples} samples in the tars but {successes} successes in the status rows"
        )
    return samples, counts, dict(failures)
