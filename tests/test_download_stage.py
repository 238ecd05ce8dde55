"""The download stage end to end against a real HTTP server on 127.0.0.1: img2dataset does the fetching.

One module-scoped run (three shards: 8, 8 and 3 url rows, the last all skipped before download)
feeds most tests; the module runs the pipeline three times in all (first run, a no-op rerun, and
a second run into the same path for byte-identity).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dgaug.job.manifest import validate
from dgaug.job.run import run_pipeline
from dgaug.pipeline.run import RunSummary
from dgaug.stages.download.merge import failure_reason
from dgaug.stages.download.urls import sample_key
from tests.helpers import loopback_server

SHARD_SIZE = 8
IMAGE_SIZE = 32


# ------------------------------------------------------------------------------------ the server


def _jpeg(i: int, w: int = 48, h: int = 40) -> bytes:
    im = Image.new("RGB", (w, h))
    im.putdata(
        [
            ((x * 5 + i * 40) % 256, (y * 6) % 256, (i * 70) % 256)
            for y in range(h)
            for x in range(w)
        ]
    )
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


GOOD = {f"/img/{i}.jpg": _jpeg(i, 48 + 4 * i, 40) for i in range(10)}
_BIG = _jpeg(99, 200, 160)
CORRUPT = b"<html>this is not an image</html>\n" * 8  # served as image/jpeg
TRUNCATED = _BIG[: len(_BIG) // 2]  # a whole response holding half a JPEG


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802  (http.server's name)
        if self.path in GOOD or self.path in ("/corrupt.jpg", "/truncated.jpg"):
            body = GOOD.get(self.path) or (CORRUPT if self.path == "/corrupt.jpg" else TRUNCATED)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/cut.jpg":
            # The connection drops half-way through the body: the client sees IncompleteRead.
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(_BIG)))
            self.end_headers()
            self.wfile.write(_BIG[: len(_BIG) // 2])
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    with loopback_server(_Handler) as url:
        yield url


# ---------------------------------------------------------------------------------- the url list

# (path on the server or "" for no url, caption, label, expected status, expected failure reason)
ROWS = [
    # shard 0
    ("/img/0.jpg", "a red square", "cat", "success", None),
    ("/img/1.jpg", "", "dog", "skipped", "empty_caption"),
    ("/missing/a.jpg", "gone", "cat", "failed_to_download", "http_404"),
    ("/img/2.jpg", 'a "quoted", comma\'d caption — ünïcode', "dog", "success", None),
    ("/corrupt.jpg", "text posing as a jpeg", "cat", "failed_to_resize", "undecodable_image"),
    ("/img/3.jpg", "three", "bird", "success", None),
    ("", "no url at all", "bird", "skipped", "missing_url"),
    ("/img/4.jpg", "four", "cat", "success", None),
    # shard 1
    ("/truncated.jpg", "half a jpeg", "dog", "failed_to_resize", "undecodable_image"),
    ("/img/5.jpg", "five", "dog", "success", None),
    ("/cut.jpg", "transfer cut short", "cat", "failed_to_download", "truncated_download"),
    ("/missing/b.jpg", "gone too", "bird", "failed_to_download", "http_404"),
    ("/img/6.jpg", "   ", "cat", "skipped", "empty_caption"),
    ("/img/7.jpg", None, "dog", "skipped", "empty_caption"),
    ("/img/8.jpg", "eight", "bird", "success", None),
    ("/img/9.jpg", "nine", "cat", "success", None),
    # shard 2, short and all skipped: img2dataset never runs for it
    ("", "", "cat", "skipped", "missing_url"),
    ("/img/0.jpg", "", "dog", "skipped", "empty_caption"),
    ("/img/1.jpg", None, None, "skipped", "empty_caption"),
]
NUM_SHARDS = -(-len(ROWS) // SHARD_SIZE)


@dataclass
class Run:
    root: Path  # the tmp folder of the module
    out: Path
    data: dict  # the manifest, as a dict
    inputs: list[dict]  # the url list rows
    summary: RunSummary


def _manifest(url_list: Path, out: Path) -> dict:
    return {
        "output": str(out),
        "shard_size": SHARD_SIZE,
        "source": {
            "kind": "url_list",
            "path": str(url_list),
            "input_format": "parquet",
            "label_col": "label",
        },
        "executor": {"kind": "local", "max_attempts": 1},
        "stages": {"download": {"image_size": IMAGE_SIZE, "threads": 4, "timeout": 5}},
    }


@pytest.fixture(scope="module")
def run(server, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("download")
    inputs = [
        {"url": f"{server}{path}" if path else "", "caption": caption, "label": label}
        for path, caption, label, _, _ in ROWS
    ]
    url_list = root / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(inputs), url_list)
    data = _manifest(url_list, root / "out")
    summary = run_pipeline(validate(data))
    return Run(root, root / "out", data, inputs, summary)


# ---------------------------------------------------------------------------------------- helpers


def _tar_members(path: Path) -> list[tuple[str, str, bytes]]:
    """(key, extension, bytes) in tar order, key up to the first dot as webdataset splits it."""
    out = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            out.append((key, ext, tf.extractfile(m).read()))
    return out


def _samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    members = _tar_members(path)
    return [
        (k, {ext: data for _, ext, data in g})
        for k, g in itertools.groupby(members, lambda x: x[0])
    ]


def _files(folder: Path, exts=(".tar", ".parquet", ".json")) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(exts)
    }


def _shard_rows(shard: int) -> list[tuple]:
    return ROWS[shard * SHARD_SIZE : (shard + 1) * SHARD_SIZE]


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(
    "status, error, reason",
    [
        ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
        ("failed_to_download", "HTTP Error 502: Bad Gateway", "http_5xx"),
        ("failed_to_resize", "Image decoding error", "undecodable_image"),
        (
            "failed_to_download",
            "IncompleteRead(300 bytes read, 700 more expected)",
            "truncated_download",
        ),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection"),
        (
            "failed_to_download",
            "<urlopen error [Errno 2] No such file or directory: '/x.jpg'>",
            "file_not_found",
        ),
        ("failed_to_download", "unknown url type: 'not a url'", "bad_url"),
        ("failed_to_download", "The read operation timed out", "timeout"),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "opted_out"),
        ("failed_to_resize", "image too small", "filtered_size"),
        ("skipped", "missing url", "missing_url"),
        ("skipped", "empty caption", "empty_caption"),
        ("failed_to_download", "hash mismatch", "hash_mismatch"),
        ("failed_to_download", None, "other"),
    ],
)
def test_failure_reason(status, error, reason):
    assert failure_reason(status, error) == reason


def test_every_shard_committed(run):
    s = run.summary.stages["download"]
    assert run.summary.ok, s.errors
    assert (s.planned, s.done, s.skipped, s.failed) == (NUM_SHARDS, NUM_SHARDS, 0, 0)
    assert s.samples == sum(1 for r in ROWS if r[3] == "success")
    state = run.out / "real" / "_state"
    assert sorted(os.listdir(state)) == [f"{i:05d}.json" for i in range(NUM_SHARDS)]
    for i in range(NUM_SHARDS):
        marker = json.loads((state / f"{i:05d}.json").read_text())
        assert marker["status"] == "done"
        for name in (f"{i:05d}.tar", f"{i:05d}.parquet", f"{i:05d}_stats.json"):
            assert marker["outputs"][name]["bytes"] == (run.out / "real" / name).stat().st_size
    # Nothing left behind in the scratch folder.
    tmp = run.out / "_dgaug" / "tmp"
    assert not tmp.exists() or not os.listdir(tmp)


def test_tar_layout_keys_and_members(run):
    for shard in range(NUM_SHARDS):
        tar = run.out / "real" / f"{shard:05d}.tar"
        members = _tar_members(tar)
        keys = [k for k, _, _ in members]
        assert all(k.isdigit() for k in keys), keys  # no dots: webdataset keys end at the first
        # Members of a sample are adjacent: each key forms one run, and runs are in key order.
        runs = [k for k, _ in itertools.groupby(keys)]
        assert runs == sorted(set(keys))

        rows = _shard_rows(shard)
        expected = {
            sample_key(shard, i): (run.inputs[shard * SHARD_SIZE + i], row)
            for i, row in enumerate(rows)
            if row[3] == "success"
        }
        assert runs == sorted(expected)
        for key, files in _samples(tar):
            assert set(files) == {"jpg", "txt", "json"}
            inp, _ = expected[key]
            meta = json.loads(files["json"])
            assert meta["key"] == key
            assert "dgaug_key" not in meta
            assert meta["label"] == inp["label"]
            assert meta["url"] == inp["url"]
            assert meta["status"] == "success"
            assert files["txt"].decode("utf-8") == inp["caption"]
            with Image.open(io.BytesIO(files["jpg"])) as im:
                assert im.format == "JPEG"
                assert im.size == (IMAGE_SIZE, IMAGE_SIZE)  # resize_mode border pads to a square


def test_status_parquet_one_row_per_input(run):
    for shard in range(NUM_SHARDS):
        table = pq.read_table(run.out / "real" / f"{shard:05d}.parquet")
        rows = table.to_pylist()
        expected = _shard_rows(shard)
        assert len(rows) == len(expected)
        assert [r["key"] for r in rows] == [sample_key(shard, i) for i in range(len(expected))]
        assert "dgaug_key" not in table.column_names
        for r, exp, inp in zip(rows, expected, run.inputs[shard * SHARD_SIZE :], strict=False):
            assert r["status"] == exp[3], (r, exp)
            assert r["url"] == inp["url"]
            assert r["caption"] == inp["caption"]
            assert r["label"] == inp["label"]
            if exp[3] == "success":
                assert r["error_message"] is None
                assert (r["width"], r["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
            else:
                assert failure_reason(r["status"], r["error_message"]) == exp[4]


def test_status_parquets_share_one_schema(run):
    real = run.out / "real"
    schemas = [pq.read_schema(real / f"{i:05d}.parquet") for i in range(NUM_SHARDS)]
    # The last shard never reached img2dataset; its status rows look the same all the same.
    assert all(s == schemas[0] for s in schemas), schemas
    assert schemas[0].names[:3] == ["label", "caption", "url"]
    table = pq.read_table([str(real / f"{i:05d}.parquet") for i in range(NUM_SHARDS)])
    assert table.num_rows == len(ROWS)


def test_marker_failures_by_reason(run):
    total: Counter[str] = Counter()
    for shard in range(NUM_SHARDS):
        marker = json.loads((run.out / "real" / "_state" / f"{shard:05d}.json").read_text())
        rows = _shard_rows(shard)
        expected = Counter(r[4] for r in rows if r[3] != "success")
        assert marker["failures"] == dict(expected)
        assert marker["samples"] == sum(1 for r in rows if r[3] == "success")
        assert marker["samples"] + sum(marker["failures"].values()) == len(rows)
        assert marker["counts"]["inputs"] == len(rows)
        total += expected
        stats = json.loads((run.out / "real" / f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == len(rows)
        assert stats["successes"] == marker["samples"]
        assert stats["failures"] == marker["failures"]
        assert not {"start_time", "end_time", "duration"} & set(stats)
    assert run.summary.stages["download"].failures == dict(total)
    assert total["http_404"] == 2 and total["undecodable_image"] == 2


def test_sizes_json_matches_the_tars(run):
    import webdataset as wds

    real = run.out / "real"
    sizes = json.loads((real / "sizes.json").read_text())
    tars = [f"{i:05d}.tar" for i in range(NUM_SHARDS)]
    assert sorted(sizes) == tars
    for name in tars:
        samples = list(wds.WebDataset(str(real / name), shardshuffle=False))
        assert sizes[name] == len(samples) == len(_samples(real / name))
        for s in samples:
            assert {"jpg", "txt", "json"} <= set(s)
            assert json.loads(s["json"])["key"] == s["__key__"]
    # All shards at once, as open_clip reads them.
    urls = str(real / f"{{00000..{NUM_SHARDS - 1:05d}}}.tar")
    assert sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)) == sum(sizes.values())


def test_second_run_does_nothing(run):
    real = run.out / "real"
    before = _files(real)
    markers = _files(real / "_state")
    mtimes = {p.name: p.stat().st_mtime_ns for p in real.iterdir() if p.is_file()}

    summary = run_pipeline(validate(run.data))

    s = summary.stages["download"]
    assert summary.ok
    assert (s.planned, s.skipped, s.done, s.samples) == (NUM_SHARDS, NUM_SHARDS, 0, 0)
    assert _files(real) == before
    assert _files(real / "_state") == markers
    shard_files = {n for n in mtimes if n != "sizes.json"}
    assert {n: real.joinpath(n).stat().st_mtime_ns for n in shard_files} == {
        n: mtimes[n] for n in shard_files
    }


def test_same_manifest_gives_identical_bytes(run):
    """The downloader's threads finish in any order; the merged shards must not show it."""
    first = run.root / "out.first"
    shutil.move(run.out, first)
    try:
        summary = run_pipeline(validate(run.data))
        assert summary.ok
        assert summary.stages["download"].done == NUM_SHARDS
        a, b = _files(first / "real"), _files(run.out / "real")
        assert sorted(a) == sorted(b)
        assert [n for n in a if n.endswith((".tar", ".parquet"))] == [
            f"{i:05d}{ext}" for i in range(NUM_SHARDS) for ext in (".parquet", ".tar")
        ]
        for name in a:
            assert a[name] == b[name], f"{name} differs between two runs"
        # The markers agree on everything but timings and host details.
        for i in range(NUM_SHARDS):
            ma = json.loads((first / "real" / "_state" / f"{i:05d}.json").read_text())
            mb = json.loads((run.out / "real" / "_state" / f"{i:05d}.json").read_text())
            for k in ("samples", "counts", "failures", "outputs", "fingerprint"):
                assert ma[k] == mb[k], k
    finally:
        # Leave the first run in place for any test that comes after.
        shutil.rmtree(run.out, ignore_errors=True)
        shutil.move(first, run.out)


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_runs_from_python_c_and_leaves_no_helper_process(tmp_path: Path) -> None:
    """img2dataset's per-shard children come from dgaug's launcher process, which needs no main
    module (multiprocessing's forkserver re-imports `__main__`, which `python -c` and notebooks
    lack) and exits with the worker."""
    import subprocess
    import sys

    from tests.helpers import REPO, tiny_manifest_dict

    code = (
        "import json, sys\n"
        "from dgaug.job.manifest import validate\n"
        "from dgaug.job.run import run_pipeline\n"
        "from dgaug.stages.download.launcher import launcher\n"
        "s = run_pipeline(validate(json.loads(sys.argv[1])))\n"
        "print(launcher()._proc.pid, s.ok, s.stages['download'].samples)\n"
    )
    d = tiny_manifest_dict(tmp_path / "out")
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(d)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    pid, ok, samples = r.stdout.split()
    assert (ok, samples) == ("True", "24")
    # The launcher saw EOF (or its PDEATHSIG) when the worker exited.
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")


def test_streamed_merge_matches_the_whole_merge(run, tmp_path, monkeypatch):
    """The tar written sub-shard by sub-shard while img2dataset runs holds the bytes of the
    merge of all sub-shards at once (the stage's way before merging overlapped the download),
    whatever the number of sub-shards; the committed shards (two sub-shards each) agree too."""
    from dgaug.core.storage import Storage
    from dgaug.job.run import plan_stages
    from dgaug.pipeline.run import stage_context
    from dgaug.stages.download import merge
    from dgaug.stages.download import stage as download_stage

    m = validate({**run.data, "output": str(tmp_path / "out")})
    plans = plan_stages(m, Storage(m.output), dry_run=False)
    stage = plans["download"].stage
    ctx = stage_context({"download": stage}, m, Storage(m.output))
    stage.setup(ctx)
    monkeypatch.setattr(download_stage, "SUB_SHARD_ROWS", 1)  # one sub-shard per valid row

    def shard(task, folder: Path) -> dict[str, bytes]:
        folder.mkdir()
        stage.process(task.in_dir(str(folder)), ctx)
        return _files(folder), len(list((folder / "img2dataset").glob("*.tar")))

    def out_of_order(*args, **kwargs):
        raise merge.SubShardsOutOfOrder("test: take the whole merge")

    for task in plans["download"].tasks[:2]:  # shards 0 and 1 reach img2dataset
        streamed, subshards = shard(task, tmp_path / f"streamed{task.shard_id}")
        assert subshards == 6  # six rows of each shard pass the pre-download checks
        with monkeypatch.context() as patch:
            patch.setattr(download_stage, "stream_tar", out_of_order)
            whole, _ = shard(task, tmp_path / f"whole{task.shard_id}")
        names = [f"{task.shard_id:05d}{ext}" for ext in (".tar", ".parquet", "_stats.json")]
        committed = _files(run.out / "real")
        for name in names:
            assert streamed[name] == whole[name] == committed[name], name
