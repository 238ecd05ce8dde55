"""Url list files read in streaming batches: tsv and csv (CC3M, CC12M), parquet (LAION), txt."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dgaug.sources.errors import SourceError
from dgaug.sources.paths import expand_paths

if TYPE_CHECKING:
    from dgaug.sources.url_list import UrlListSource

log = logging.getLogger(__name__)

BATCH_ROWS = 65_536
# pyarrow's csv reader block. With 16 MB blocks the reading process grew with the list (about
# +700 MB RSS at 8M tsv rows, with pyarrow's pool peaking at 110 MB); with 1 MB blocks it stays
# flat (about +60 MB at 8M rows) and reads as fast.
CSV_BLOCK_BYTES = 1 << 20


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
