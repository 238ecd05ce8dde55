"""Url lists (tsv, csv, parquet, txt) read in batches and cut into one input parquet per shard."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgaug.core.storage import Storage
from dgaug.sources import SourceError, UrlListSource, tabular
from dgaug.sources.tabular import check_source, iter_rows
from dgaug.stages.download import urls
from dgaug.stages.download.urls import KEY_COL, sample_key, split_url_list


def _src(path, **kw) -> UrlListSource:
    return UrlListSource(kind="url_list", path=str(path), **kw)


def _read(src: UrlListSource) -> list[dict]:
    rows: list[dict] = []
    for t in iter_rows(src, check_source(src)):
        rows.extend(t.to_pylist())
    return rows


def _rows(n: int) -> list[dict]:
    return [{"url": f"http://example.com/{i}.jpg", "caption": f"caption {i}"} for i in range(n)]


def _write_tsv(path, rows: list[dict], header: bool = True) -> None:
    lines = ["url\tcaption"] if header else []
    lines += [f"{r['url']}\t{r['caption']}" for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_parquet(path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def _mtimes(folder: str) -> dict[str, int]:
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in sorted(os.listdir(folder))}


# --------------------------------------------------------------------------------------- formats


def test_tsv_with_header_keeps_bare_quotes(tmp_path):
    p = tmp_path / "cc3m.tsv"
    p.write_text(
        "url\tcaption\tlabel\n"
        'http://a/1.jpg\ta 5" screen and a "quoted\tx\n'
        "http://a/2.jpg\tplain\ty\n"
        "http://a/3.jpg\t\tz\n",
        encoding="utf-8",
    )
    rows = _read(_src(p, input_format="tsv", label_col="label"))
    assert rows == [
        {"url": "http://a/1.jpg", "caption": 'a 5" screen and a "quoted', "label": "x"},
        {"url": "http://a/2.jpg", "caption": "plain", "label": "y"},
        # An empty caption is an empty string (the stage skips it), never a missing row.
        {"url": "http://a/3.jpg", "caption": "", "label": "z"},
    ]


def test_tsv_without_header_uses_column_names(tmp_path):
    p = tmp_path / "cc12m.tsv"
    # CC12M's layout: no header, url first. The first line is data, not a header.
    p.write_text("http://a/1.jpg\tfirst\nhttp://a/2.jpg\tsecond\n", encoding="utf-8")
    src = _src(p, input_format="tsv", column_names=["image_url", "text"], url_col="image_url")
    src = src.model_copy(update={"caption_col": "text"})
    assert _read(src) == [
        {"url": "http://a/1.jpg", "caption": "first"},
        {"url": "http://a/2.jpg", "caption": "second"},
    ]


def test_tsv_header_with_byte_order_mark(tmp_path):
    p = tmp_path / "bom.tsv"
    p.write_bytes("\ufeffurl\tcaption\nhttp://a/1.jpg\tx\n".encode())
    assert _read(_src(p, input_format="tsv")) == [{"url": "http://a/1.jpg", "caption": "x"}]


def test_csv_with_quoted_commas_and_quoted_header(tmp_path):
    p = tmp_path / "list.csv"
    p.write_text(
        '"url","caption","extra"\n'
        '"http://a/1.jpg","red, green, and ""blue""","e1"\n'
        "http://a/2.jpg,plain,e2\n",
        encoding="utf-8",
    )
    rows = _read(_src(p, input_format="csv", save_columns=["extra"]))
    assert rows == [
        {"url": "http://a/1.jpg", "caption": 'red, green, and "blue"', "extra": "e1"},
        {"url": "http://a/2.jpg", "caption": "plain", "extra": "e2"},
    ]


def test_parquet_laion_columns_renamed_and_cast_to_string(tmp_path):
    p = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": ["http://a/1.jpg", "http://a/2.jpg"],
                "TEXT": ["one", None],
                "cls": [3, 4],
                "unused": [1.0, 2.0],
            }
        ),
        p,
    )
    src = _src(p, input_format="parquet", url_col="URL", caption_col="TEXT", label_col="cls")
    batches = list(iter_rows(src, check_source(src)))
    assert all(
        t.schema == pa.schema([(n, pa.string()) for n in ("url", "caption", "label")])
        for t in batches
    )
    assert [r for t in batches for r in t.to_pylist()] == [
        {"url": "http://a/1.jpg", "caption": "one", "label": "3"},
        {"url": "http://a/2.jpg", "caption": None, "label": "4"},
    ]


def test_txt_one_url_per_line(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_text("http://a/1.jpg\n  http://a/2.jpg  \n\nhttp://a/3.jpg\n", encoding="utf-8")
    rows = _read(_src(p, input_format="txt", caption_col=None))
    # The blank line stays a row (with an empty url): the stage counts it as skipped.
    assert rows == [
        {"url": "http://a/1.jpg"},
        {"url": "http://a/2.jpg"},
        {"url": ""},
        {"url": "http://a/3.jpg"},
    ]


def test_glob_reads_files_in_sorted_order(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    rows = _rows(9)
    # Written out of order; read in name order.
    for name, chunk in [
        ("part-2.tsv", rows[6:]),
        ("part-0.tsv", rows[:3]),
        ("part-1.tsv", rows[3:6]),
    ]:
        _write_tsv(d / name, chunk)
    src = _src(d / "part-*.tsv", input_format="tsv")
    assert check_source(src) == [str(d / f"part-{i}.tsv") for i in range(3)]
    assert _read(src) == rows


# -------------------------------------------------------------------------------- batches, split


@pytest.mark.parametrize("fmt", ["parquet", "tsv", "csv"])
def test_iter_rows_yields_at_most_batch_rows(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(tabular, "BATCH_ROWS", 7)
    rows = _rows(23)
    p = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        _write_parquet(p, rows)
    elif fmt == "tsv":
        _write_tsv(p, rows)
    else:
        p.write_text("url,caption\n" + "".join(f"{r['url']},{r['caption']}\n" for r in rows))
    src = _src(p, input_format=fmt)
    sizes = [t.num_rows for t in iter_rows(src, check_source(src))]
    assert max(sizes) <= 7
    assert sum(sizes) == 23


@pytest.mark.parametrize("fmt", ["parquet", "tsv"])
def test_split_across_batch_boundaries(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(tabular, "BATCH_ROWS", 7)
    rows = _rows(23)
    p = tmp_path / f"list.{fmt}"
    _write_parquet(p, rows) if fmt == "parquet" else _write_tsv(p, rows)
    storage = Storage(str(tmp_path / "out"))

    folder, n = split_url_list(_src(p, input_format=fmt), 5, storage)

    assert n == 5
    assert folder.startswith(urls.INPUTS_DIR + "/")
    got: list[dict] = []
    for shard in range(n):
        t = pq.read_table(storage.path(f"{folder}/{shard:05d}.parquet"))
        assert t.num_rows == (5 if shard < 4 else 3)
        assert t.column("dgaug_key").to_pylist() == [
            sample_key(shard, r) for r in range(t.num_rows)
        ]
        got.extend(t.drop_columns([KEY_COL]).to_pylist())
    assert got == rows
    assert sorted(storage.list(folder)) == [f"{i:05d}.parquet" for i in range(5)] + [
        "_SUCCESS.json"
    ]
    done = storage.read_json(f"{folder}/_SUCCESS.json")
    assert (done["shards"], done["rows"]) == (5, 23)


def test_split_exact_multiple_has_no_empty_tail_shard(tmp_path):
    p = tmp_path / "list.parquet"
    _write_parquet(p, _rows(10))
    storage = Storage(str(tmp_path / "out"))
    folder, n = split_url_list(_src(p, input_format="parquet"), 5, storage)
    assert n == 2
    assert [x for x in storage.list(folder) if x.endswith(".parquet")] == [
        "00000.parquet",
        "00001.parquet",
    ]


def test_split_is_done_once(tmp_path, monkeypatch):
    p = tmp_path / "list.parquet"
    _write_parquet(p, _rows(12))
    src = _src(p, input_format="parquet")
    storage = Storage(str(tmp_path / "out"))
    folder, n = split_url_list(src, 5, storage)
    before = _mtimes(storage.path(folder))

    def no_reading(*a, **kw):
        raise AssertionError("the url list was read again")

    monkeypatch.setattr(tabular, "iter_rows", no_reading)
    assert split_url_list(src, 5, storage) == (folder, n) == (folder, 3)
    assert _mtimes(storage.path(folder)) == before

    # Another shard size is another split, in another folder.
    monkeypatch.undo()
    folder2, n2 = split_url_list(src, 4, storage)
    assert folder2 != folder and n2 == 3


def test_split_dry_run_writes_nothing(tmp_path):
    p = tmp_path / "list.tsv"
    _write_tsv(p, _rows(11))
    out = tmp_path / "out"
    _, n = split_url_list(_src(p, input_format="tsv"), 5, Storage(str(out)), dry_run=True)
    assert n == 3
    assert not out.exists() or not any(out.rglob("*"))


def _write(p, fmt: str, rows: list[dict]) -> None:
    if fmt == "parquet":
        _write_parquet(p, rows)
    elif fmt == "tsv":
        _write_tsv(p, rows)
    elif fmt == "csv":
        p.write_text("url,caption\n" + "".join(f'{r["url"]},"{r["caption"]}"\n' for r in rows))
    else:
        p.write_text("".join(f"{r['url']}\n" for r in rows))


@pytest.mark.parametrize("fmt", ["tsv", "csv", "parquet", "txt"])
def test_split_shards_are_the_rows_written_whole(tmp_path, monkeypatch, fmt):
    """Each shard input holds the bytes of its rows written as one table (what the split wrote
    before it streamed with small read blocks: checked against that version on lists of each
    format), however the reader's batches fall."""
    monkeypatch.setattr(tabular, "BATCH_ROWS", 7)  # batches that straddle shards
    rows = _rows(23)
    p = tmp_path / f"list.{fmt}"
    _write(p, fmt, rows)
    src = _src(p, input_format=fmt)
    storage = Storage(str(tmp_path / "out"))
    folder, n = split_url_list(src, 5, storage)
    cols = ["url"] if fmt == "txt" else ["url", "caption"]
    for shard in range(n):
        part = [{c: r[c] for c in cols} for r in rows[shard * 5 : shard * 5 + 5]]
        table = pa.Table.from_pylist(part, schema=pa.schema([(c, pa.string()) for c in cols]))
        keys = [sample_key(shard, i) for i in range(table.num_rows)]
        buf = pa.BufferOutputStream()
        pq.write_table(table.append_column(KEY_COL, pa.array(keys)), buf, compression="zstd")
        written = open(storage.path(f"{folder}/{shard:05d}.parquet"), "rb").read()
        assert written == buf.getvalue().to_pybytes(), shard


def _replace_keeping_size_and_mtime(p, data: bytes) -> None:
    st = os.stat(p)
    assert len(data) == st.st_size
    p.write_bytes(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_a_finished_split_is_reused_without_opening_the_list(tmp_path, monkeypatch, fmt):
    p = tmp_path / f"list.{fmt}"
    _write(p, fmt, _rows(12))
    src = _src(p, input_format=fmt)
    storage = Storage(str(tmp_path / "out"))
    folder, n = split_url_list(src, 5, storage)
    # The list is replaced by bytes that no reader accepts, its size and mtime kept: a plan (a
    # dry run) or a resume that opened it would fail; both take the recorded split.
    _replace_keeping_size_and_mtime(p, b"\0" * p.stat().st_size)
    assert split_url_list(src, 5, storage, dry_run=True) == (folder, n) == (folder, 3)
    assert split_url_list(src, 5, storage) == (folder, 3)


def test_a_second_dry_run_takes_the_count_of_the_first(tmp_path, monkeypatch):
    """`dgaug plan` before any run writes nothing in the output; it keeps the count in the user's
    cache, keyed by the files' stamps, so the next plan does not read the list again."""
    monkeypatch.setenv("DGAUG_CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "list.tsv"
    _write_tsv(p, _rows(12))
    src = _src(p, input_format="tsv")
    storage = Storage(str(tmp_path / "out"))
    folder, n = split_url_list(src, 5, storage, dry_run=True)
    _replace_keeping_size_and_mtime(p, b"\0" * p.stat().st_size)
    assert split_url_list(src, 5, storage, dry_run=True) == (folder, n) == (folder, 3)
    assert not (tmp_path / "out").exists()
    # A new stamp: the list is read again (and these bytes are no tsv with a url column).
    os.utime(p, ns=(0, p.stat().st_mtime_ns + 10**9))
    with pytest.raises(SourceError):
        split_url_list(src, 5, storage, dry_run=True)


def test_a_list_rewritten_under_the_same_size_is_noticed(tmp_path):
    p = tmp_path / "list.tsv"
    rows = _rows(12)
    _write_tsv(p, rows)
    src = _src(p, input_format="tsv")
    storage = Storage(str(tmp_path / "out"))
    folder, _ = split_url_list(src, 5, storage)

    # Touched (same bytes, new mtime): read once to compare, then reused.
    os.utime(p, ns=(0, p.stat().st_mtime_ns + 10**9))
    assert split_url_list(src, 5, storage) == (folder, 3)
    stamps = storage.read_json(f"{folder}/_SUCCESS.json")["stamps"]
    assert stamps[0]["stamp"] == p.stat().st_mtime_ns

    # Rewritten with other rows of the same size: a source error, in a plan and in a run.
    rows[3] = {"url": "http://example.com/X.jpg", "caption": "caption X"}
    _write_tsv(p, rows)
    os.utime(p, ns=(0, p.stat().st_mtime_ns + 2 * 10**9))
    for dry_run in (True, False):
        with pytest.raises(SourceError) as e:
            split_url_list(src, 5, storage, dry_run=dry_run)
        assert e.value.problems[0].startswith(f"source.path: {p} was rewritten")

    # Another size is another list: split again, into another folder.
    rows.append({"url": "http://example.com/new.jpg", "caption": "new"})
    _write_tsv(p, rows)
    folder2, n2 = split_url_list(src, 5, storage)
    assert folder2 != folder and n2 == 3


# ----------------------------------------------------------------------------------------- errors


def test_missing_columns_are_all_reported_with_their_field(tmp_path):
    p = tmp_path / "list.tsv"
    _write_tsv(p, _rows(2))
    src = _src(
        p,
        input_format="tsv",
        url_col="URL",
        caption_col="x",
        label_col="cls",
        save_columns=["caption", "nope"],
    )
    with pytest.raises(SourceError) as exc:
        check_source(src)
    problems = exc.value.problems
    assert len(problems) == 4
    assert problems[0].startswith(f"source.url_col: column 'URL' not in {p}")
    assert problems[1].startswith(f"source.caption_col: column 'x' not in {p}")
    assert problems[2].startswith(f"source.label_col: column 'cls' not in {p}")
    assert problems[3].startswith(f"source.save_columns: column 'nope' not in {p}")
    assert "['url', 'caption']" in problems[0]  # says what the file has


def test_missing_parquet_column(tmp_path):
    p = tmp_path / "list.parquet"
    _write_parquet(p, _rows(2))
    with pytest.raises(SourceError) as exc:
        split_url_list(
            _src(p, input_format="parquet", caption_col="TEXT"), 5, Storage(str(tmp_path / "out"))
        )
    assert [x.split(":")[0] for x in exc.value.problems] == ["source.caption_col"]
    assert not (tmp_path / "out").exists()


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(SourceError) as exc:
        check_source(_src(tmp_path / "nope.tsv"))
    assert exc.value.problems == [f"source.path: file not found: {tmp_path / 'nope.tsv'}"]

    with pytest.raises(SourceError) as exc:
        check_source(_src(tmp_path / "*.parquet", input_format="parquet"))
    assert exc.value.problems[0].startswith("source.path: no file matches")

    # One good file and one missing: the missing one is named.
    good = tmp_path / "good.tsv"
    _write_tsv(good, _rows(1))
    src = UrlListSource(kind="url_list", path=[str(good), str(tmp_path / "gone.tsv")])
    with pytest.raises(SourceError, match="gone.tsv"):
        check_source(src)


def test_unreadable_parquet_is_a_source_error(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError) as exc:
        check_source(_src(p, input_format="parquet"))
    assert exc.value.problems[0].startswith(f"source.path: cannot read {p}")


def test_a_parquet_list_read_as_tsv_says_so(tmp_path):
    p = tmp_path / "list.parquet"
    _write_parquet(p, _rows(2))
    with pytest.raises(SourceError) as exc:
        check_source(_src(p, input_format="tsv"))
    assert exc.value.problems == [
        f"source.path: {p}: a parquet file, not tsv: set source.input_format: parquet"
    ]
