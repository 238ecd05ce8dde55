"""Url lists cut into one small input file per shard, and which of their URLs may be fetched."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import unwrap

import pyarrow as pa
import pyarrow.parquet as pq

from dgaug.core.atomic import atomic_path
from dgaug.core.hashing import record_hash
from dgaug.core.storage import DGAUG_DIR, Storage
from dgaug.sources.errors import SourceError
from dgaug.sources.paths import expand_paths, file_digest, file_sizes, file_stamps
from dgaug.sources.url_list import UrlListSource

log = logging.getLogger(__name__)

INPUTS_DIR = f"{DGAUG_DIR}/inputs/download"
KEY_COL = "dgaug_key"  # carried through img2dataset as an extra column, becomes the sample key


# -- which URLs may be fetched

SCHEME_NOT_ALLOWED = "scheme_not_allowed"
_URLLIB_TYPE = re.compile(r"([^/:]+):", re.DOTALL)  # urllib.request's own scheme pattern


def url_scheme(url: str) -> str | None:
    """The scheme urllib would fetch `url` with, lowercased; None if it has none.

    Read as urllib reads it (surrounding `<URL:...>` dropped), so `URL:file:///x` is `file`.
    """
    m = _URLLIB_TYPE.match(unwrap(url))
    return m.group(1).lower() if m else None


def pre_download_skip(row: dict[str, Any], has_caption: bool, allowed: Any) -> str | None:
    """Why a url-list row is skipped before any fetch (its status row's error_message), or None.

    `allowed`: the schemes the manifest lets img2dataset fetch; any other is never requested.
    """
    url = (row.get("url") or "").strip()
    if not url:
        return "missing url"
    scheme = url_scheme(url)
    if scheme is None:
        return "bad url"
    if scheme not in allowed:
        return SCHEME_NOT_ALLOWED
    if has_caption and not (row.get("caption") or "").strip():
        return "empty caption"
    return None


def sample_key(shard_id: int, row: int) -> str:
    """Digits only: no dots (webdataset splits at the first dot), unique across the dataset."""
    return f"{shard_id:05d}{row:05d}"


def source_record(src: UrlListSource, paths: list[str], shard_size: int) -> dict[str, Any]:
    return {
        "source": src.model_dump(mode="json"),
        "files": file_sizes(paths),
        "shard_size": shard_size,
    }


def split_url_list(
    src: UrlListSource, shard_size: int, storage: Storage, *, dry_run: bool = False
) -> tuple[str, int]:
    """Cut the url list into `{INPUTS_DIR}/<fp>/{i:05d}.parquet` of shard_size rows each.

    Streams: at most one read block, one batch and one shard are in memory, whatever the list's
    size. Done once: a `_SUCCESS.json` records the count and each file's size and change stamp,
    and a later call whose files show the same stamps returns it without opening them (`dgaug
    plan`, a resume). Returns (folder, number of shards). Raises SourceError if a file was
    rewritten with new bytes under the same name and size after it was split.
    """
    paths = expand_paths(src.path)
    record = source_record(src, paths, shard_size)
    folder = f"{INPUTS_DIR}/{record_hash(record, 16)}"
    stamps = file_stamps(paths)
    reused = _reuse_split(storage, folder, stamps, dry_run=dry_run)
    if reused is None and dry_run:
        reused = _counted_before(folder, stamps)
    if reused is not None:
        return folder, reused
    paths = src.checked_paths()
    pending: list[pa.Table] = []
    pending_rows = 0
    shard = 0
    rows = 0
    refused: Counter[str] = Counter()  # scheme -> rows the manifest does not let us fetch
    allowed = set(src.allowed_schemes)

    def flush(table: pa.Table) -> None:
        nonlocal shard
        # One chunk: the parquet bytes then depend on the rows alone, not on where the reader's
        # blocks happened to end (a table of several chunks is written differently).
        table = table.combine_chunks()
        keys = pa.array([sample_key(shard, r) for r in range(table.num_rows)], pa.string())
        table = table.append_column(KEY_COL, keys)
        if not dry_run:
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            storage.write_bytes(f"{folder}/{shard:05d}.parquet", buf.getvalue())
        shard += 1

    for batch in src.rows(paths):
        rows += batch.num_rows
        refused.update(_refused_schemes(batch.column("url"), allowed))
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= shard_size:
            merged = pa.concat_tables(pending)
            flush(merged.slice(0, shard_size))
            rest = merged.slice(shard_size)
            pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if pending_rows:
        flush(pa.concat_tables(pending))
    if refused:
        # Said once here; each row is skipped before download and counted in its shard's marker.
        log.warning(
            "%d url(s) have a scheme that source.allowed_schemes %s does not list (%s): they are "
            "skipped as %s; list a scheme there to fetch it",
            sum(refused.values()),
            sorted(allowed),
            ", ".join(f"{k}: {n}" for k, n in refused.most_common(5)),
            SCHEME_NOT_ALLOWED,
        )
    if dry_run:
        _remember_count(folder, stamps, shard)
    else:
        storage.write_json(
            f"{folder}/_SUCCESS.json",
            {
                "shards": shard,
                "rows": rows,
                "refused_schemes": dict(refused),
                **record,
                "stamps": stamps,
                "digests": {p: file_digest(p) for p in paths},
            },
        )
        log.info("split %d url(s) from %d file(s) into %d shard(s)", rows, len(paths), shard)
    return folder, shard


def _count_file(folder: str) -> Path:
    """Where a dry run keeps the shard count of a list it read (it writes nothing in the output):
    $DGAUG_CACHE_DIR (or $XDG_CACHE_HOME/dgaug, ~/.cache/dgaug) / splits / <fp>.json."""
    root = os.environ.get("DGAUG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dgaug"
    )
    return Path(root) / "splits" / f"{folder.rsplit('/', 1)[-1]}.json"


def _counted_before(folder: str, stamps: list[dict[str, Any]]) -> int | None:
    """The count an earlier dry run found for these very files (same stamps), else None."""
    try:
        data = json.loads(_count_file(folder).read_text())
        return int(data["shards"]) if data.get("stamps") == stamps else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember_count(folder: str, stamps: list[dict[str, Any]], shards: int) -> None:
    if any(s["stamp"] is None for s in stamps):
        return  # a file without a change stamp: nothing would tell that it changed
    path = _count_file(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps({"shards": shards, "stamps": stamps}))
    except OSError as e:  # a read-only home: the next plan reads the list again
        log.debug("cannot keep the url list's count in %s: %s", path, e)


def _reuse_split(
    storage: Storage, folder: str, stamps: list[dict[str, Any]], *, dry_run: bool
) -> int | None:
    """The shard count of a finished split of these files, or None if there is none.

    Same stamps: reused without opening a file. A stamp changed under the same size (the folder
    is named by sizes): a local file is read once to compare its sha256 with the one recorded;
    the same bytes (a copy, a touch) keep the split, new bytes raise SourceError, since the
    committed download shards came from the old list. A split recorded before stamps were kept
    is trusted, as it was then.
    """
    try:
        done = storage.read_json(f"{folder}/_SUCCESS.json")
        shards = int(done["shards"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    old = {s["path"]: s for s in done.get("stamps", [])}
    if not old or all(old.get(s["path"]) == s for s in stamps):
        if not old and not dry_run:
            storage.write_json(f"{folder}/_SUCCESS.json", {**done, "stamps": stamps})
        return shards
    digests = done.get("digests", {})
    changed = []
    for s in stamps:
        if old.get(s["path"]) == s:
            continue
        digest = digests.get(s["path"])
        if digest is None or file_digest(s["path"]) != digest:
            changed.append(s["path"])
    if changed:
        raise SourceError(
            [
                f"source.path: {p} was rewritten (same size, new content) after it was split "
                f"into {storage.url(folder)}; the shards of this output came from the old list: "
                "set a new `output` folder to download the new one"
                for p in changed
            ]
        )
    if not dry_run:  # the same bytes under a new stamp (copied, touched): remember the stamp
        storage.write_json(f"{folder}/_SUCCESS.json", {**done, "stamps": stamps})
    return shards


def _refused_schemes(urls: pa.ChunkedArray | pa.Array, allowed: set[str]) -> Counter[str]:
    """Scheme -> count of the urls whose scheme is not in `allowed` (missing urls not counted)."""
    import pyarrow.compute as pc

    # Fast path: rows that plainly start with an allowed scheme need no Python.
    plain = "|".join(re.escape(a) for a in sorted(allowed)) or "(?!)"
    ok = pc.match_substring_regex(urls, rf"^(?i:{plain}):", ignore_case=False)
    rest = pc.filter(urls, pc.invert(pc.fill_null(ok, False)))
    out: Counter[str] = Counter()
    for url in rest.to_pylist():
        if url and url.strip():
            scheme = url_scheme(url.strip())
            if scheme not in allowed:
                out[scheme or "(none)"] += 1
    return out
