"""Url lists read in streaming batches and cut into one small input file per shard."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import unwrap

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dgaug.core.storage import DGAUG_DIR, Storage
from dgaug.job.manifest import UrlListSource, expand_paths

log = logging.getLogger(__name__)

INPUTS_DIR = f"{DGAUG_DIR}/inputs/download"
KEY_COL = "dgaug_key"  # carried through img2dataset as an extra column, becomes the sample key
BATCH_ROWS = 65_536
CSV_BLOCK_BYTES = 16 << 20


class SourceError(Exception):
    """The source cannot be read as the manifest describes it; `problems` lists each reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


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


def _wanted_columns(src: UrlListSource) -> dict[str, str]:
    """Column in the file -> column name dgaug uses."""
    cols = {src.url_col: "url"}
    if src.caption_col:
        cols[src.caption_col] = "caption"
    if src.label_col:
        cols[src.label_col] = "label"
    if src.domain_col:
        cols[src.domain_col] = "domain"
    for c in src.save_columns:
        cols.setdefault(c, c)
    return cols


def _open(path: str):
    return fsspec.open(path, "rb").open()


PARQUET_MAGIC = b"PAR1"


class NotTextError(ValueError):
    """A tsv / csv url list that is not text (a parquet file under a text format)."""


def _file_columns(src: UrlListSource, path: str) -> list[str]:
    if src.input_format == "parquet":
        with _open(path) as f:
            return list(pq.ParquetFile(f).schema_arrow.names)
    if src.input_format == "txt":
        return [src.url_col]
    if src.column_names:
        return list(src.column_names)
    with _open(path) as f:
        line = f.readline()
    if line.startswith(PARQUET_MAGIC):
        raise NotTextError(
            f"a parquet file, not {src.input_format}: set source.input_format: parquet"
        )
    # utf-8-sig: pyarrow drops a byte-order mark, so the header check must too.
    first = line.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if src.input_format == "tsv":
        return first.split("\t")  # unquoted, as CC3M/CC12M publish it (and as _iter_file reads it)
    # csv headers may be quoted ("url","caption"), as pyarrow reads them.
    return next(csv.reader([first]), [])


def check_source(src: UrlListSource) -> list[str]:
    """Every file exists and has every column the manifest names; returns the concrete paths."""
    paths = expand_paths(src.path)
    problems = []
    if not paths:
        problems.append(f"source.path: no file matches {src.path!r}")
    for p in paths:
        try:
            cols = _file_columns(src, p)
        except FileNotFoundError:
            problems.append(f"source.path: file not found: {p}")
            continue
        except NotTextError as e:
            problems.append(f"source.path: {p}: {e}")
            continue
        except Exception as e:  # unreadable for any reason: say which file and why
            problems.append(f"source.path: cannot read {p}: {type(e).__name__}: {e}")
            continue
        for field_name, col in [
            ("url_col", src.url_col),
            ("caption_col", src.caption_col),
            ("label_col", src.label_col),
            ("domain_col", src.domain_col),
        ] + [("save_columns", c) for c in src.save_columns]:
            if col and col not in cols:
                problems.append(f"source.{field_name}: column {col!r} not in {p} (has {cols})")
    if problems:
        raise SourceError(problems)
    return paths


def _iter_file(src: UrlListSource, path: str, cols: dict[str, str]) -> Iterator[pa.Table]:
    if src.input_format == "parquet":
        with _open(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=list(cols)):
                yield pa.Table.from_batches([batch])
        return
    if src.input_format == "txt":
        with _open(path) as f:
            buf: list[str] = []
            for line in io.TextIOWrapper(f, encoding="utf-8", errors="replace"):
                buf.append(line.strip())
                if len(buf) >= BATCH_ROWS:
                    yield pa.table({src.url_col: buf})
                    buf = []
            if buf:
                yield pa.table({src.url_col: buf})
        return
    skipped = 0

    def on_invalid(row: Any) -> str:
        nonlocal skipped
        skipped += 1
        return "skip"

    read = pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, column_names=src.column_names or None)
    parse = pacsv.ParseOptions(
        delimiter="\t" if src.input_format == "tsv" else ",",
        # Captions in CC3M/CC12M contain bare quotes; tsv there is unquoted.
        quote_char=False if src.input_format == "tsv" else '"',
        invalid_row_handler=on_invalid,
    )
    conv = pacsv.ConvertOptions(
        include_columns=list(cols),
        # Read as bytes: one latin-1 byte in a caption must not fail the whole list (see _utf8).
        column_types={c: pa.binary() for c in cols},
        strings_can_be_null=False,
    )
    with _open(path) as f:
        reader = pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=conv)
        for batch in reader:
            yield _utf8(pa.Table.from_batches([batch]))
    if skipped:
        log.warning("%s: skipped %d malformed line(s)", path, skipped)


def _utf8(table: pa.Table) -> pa.Table:
    """Binary columns as UTF-8 strings; invalid bytes become U+FFFD, as in txt lists and shards.

    The cast validates and is fast; only a batch that fails it is decoded row by row.
    """
    out = []
    for column in table.columns:
        try:
            out.append(column.cast(pa.string()))
        except pa.ArrowInvalid:
            values = [
                None if v is None else v.decode("utf-8", errors="replace")
                for v in column.to_pylist()
            ]
            out.append(pa.array(values, type=pa.string()))
    return pa.table(out, names=table.column_names)


def iter_rows(src: UrlListSource, paths: list[str]) -> Iterator[pa.Table]:
    """Tables of at most BATCH_ROWS rows with dgaug's column names (url, caption, label, domain...)."""
    cols = _wanted_columns(src)
    schema = pa.schema([(n, pa.string()) for n in cols.values()])
    for path in paths:
        for t in _iter_file(src, path, cols):
            t = t.select(list(cols)).rename_columns(list(cols.values())).cast(schema)
            # csv/tsv batches are cut by bytes (CSV_BLOCK_BYTES), not rows: slice them (no copy).
            for start in range(0, t.num_rows, BATCH_ROWS):
                yield t.slice(start, BATCH_ROWS)


def file_sizes(paths: list[str]) -> list[dict[str, Any]]:
    """Path and size of each file: enough to notice a url list replaced under the same name."""
    out = []
    for p in paths:
        try:
            info = fsspec.open(p).fs.info(p.removeprefix("file://"))
            out.append({"path": p, "size": info.get("size")})
        except (FileNotFoundError, OSError):
            out.append({"path": p, "size": None})
    return out


def source_record(src: UrlListSource, paths: list[str], shard_size: int) -> dict[str, Any]:
    return {
        "source": src.model_dump(mode="json"),
        "files": file_sizes(paths),
        "shard_size": shard_size,
    }


def _fp(record: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def split_url_list(
    src: UrlListSource, shard_size: int, storage: Storage, *, dry_run: bool = False
) -> tuple[str, int]:
    """Cut the url list into `{INPUTS_DIR}/<fp>/{i:05d}.parquet` of shard_size rows each.

    Streams: at most one batch plus one shard is in memory. Done once: a `_SUCCESS.json` records the
    count, and a later call with the same source returns it. Returns (folder, number of shards).
    """
    paths = check_source(src)
    record = source_record(src, paths, shard_size)
    folder = f"{INPUTS_DIR}/{_fp(record)}"
    try:
        done = storage.read_json(f"{folder}/_SUCCESS.json")
        return folder, int(done["shards"])
    except (FileNotFoundError, ValueError, KeyError):
        pass
    pending: list[pa.Table] = []
    pending_rows = 0
    shard = 0
    rows = 0
    refused: Counter[str] = Counter()  # scheme -> rows the manifest does not let us fetch
    allowed = set(src.allowed_schemes)

    def flush(table: pa.Table) -> None:
        nonlocal shard
        keys = pa.array([sample_key(shard, r) for r in range(table.num_rows)], pa.string())
        table = table.append_column(KEY_COL, keys)
        if not dry_run:
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            storage.write_bytes(f"{folder}/{shard:05d}.parquet", buf.getvalue())
        shard += 1

    for batch in iter_rows(src, paths):
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
    if not dry_run:
        storage.write_json(
            f"{folder}/_SUCCESS.json",
            {"shards": shard, "rows": rows, "refused_schemes": dict(refused), **record},
        )
        log.info("split %d url(s) from %d file(s) into %d shard(s)", rows, len(paths), shard)
    return folder, shard


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
