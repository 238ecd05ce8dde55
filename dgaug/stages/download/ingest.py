"""Existing webdataset shards taken in as dgaug shards: re-keyed, checked, written reproducibly."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dgaug.core.constants import IMAGE_EXTS
from dgaug.core.tars import write_deterministic_tar
from dgaug.pipeline.stage import ShardResult
from dgaug.stages.download.urls import sample_key


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile why its member list ended.

    tarfile ends the list silently at any bad header after the first: a zero block (the proper
    end), but also a file cut at or inside a header. Only the first is a whole archive.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_.dgaug_end = e  # type: ignore[attr-defined]
            raise


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset splits a member name: the folder stays in the key, and the
    key ends at the first dot of the base name (`d/a.b.jpg` -> `d/a`, `b.jpg`)."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _iter_samples(
    fileobj: Any,
) -> tuple[list[tuple[str, dict[str, bytes]]], str | None, str | None]:
    """Group adjacent members by key (up to the first dot, as webdataset does); stop at damage.

    A member whose extension the sample already has starts a new sample with the same key
    (`a.jpg a.txt a.jpg a.txt` is two samples `a`): nothing is overwritten, and ingest_tar counts
    the second as a duplicate key.
    At damage, the sample being read is dropped: the one the cut member belongs to, or the last
    one when the cut fell on a header (its later members may be gone).
    Returns (samples, damage or None, source key of the dropped sample or None).
    """
    samples: list[tuple[str, dict[str, bytes]]] = []
    error = None
    reading: str | None = None  # key of the member being read when the damage struck
    joins = False  # whether that member belongs to the last sample (else it starts one)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndRecordingTarInfo) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
                joins = bool(samples) and samples[-1][0] == key and ext not in samples[-1][1]
                reading = key
                data = tf.extractfile(m).read()
                reading = None
                if joins:
                    samples[-1][1][ext] = data
                else:
                    samples.append((key, {ext: data}))
            end = getattr(tf, "dgaug_end", None)
            if end is not None and not isinstance(end, tarfile.EOFHeaderError):
                error = f"no end-of-archive block ({type(end).__name__}: {end})"
    except (tarfile.TarError, EOFError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
    lost = reading
    if error and samples and (reading is None or joins):
        lost = samples.pop()[0]
    return samples, error, lost if error else None


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
