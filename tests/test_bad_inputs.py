"""A corpus of bad inputs fed to the real pipeline: each is a counted skip or a clear error.

Two module-scoped runs carry most tests:
- `download_run`: a tsv url list (one shard) against a real HTTP server on 127.0.0.1 and `file://`
  URLs: broken bytes, a decompression bomb, odd image modes, empty captions, dead URLs, beside
  good images;
- `shards_run`: existing webdataset tars with duplicate keys, dotted keys, a truncated tar and the
  same odd and broken images, through download (ingest), edsam and features on tiny-random models.
Every fault must show up by reason in the shard's marker, and every good sample of the same shard
must be committed exactly once. Source-level problems go through `dgaug run` and must exit 2 with
one clear message and no traceback.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from dgaug.core.images import BadImage, open_rgb
from dgaug.job.manifest import validate
from dgaug.job.run import run_pipeline
from dgaug.pipeline.run import RunSummary
from dgaug.sources import UrlListSource
from dgaug.stages.download.merge import failure_reason
from tests.helpers import REPO, loopback_server, write_tar

# ------------------------------------------------------------------------------------- the images


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: Iterable[bytes]) -> bytes:
    """A PNG written chunk by chunk from raw rows (filter 0), compressed as they come: a huge
    image of one colour costs a few KB here, never its decoded size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00" + row) for row in rows) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _jpeg(seed: int, w: int = 40, h: int = 40, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _pil(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


BOMB_SIDE = 20_000
# 20,000 x 20,000 1-bit grayscale, all black: 400 megapixels (1.2 GB as RGB) in about 50 KB.
BOMB = _png(BOMB_SIDE, BOMB_SIDE, 1, 0, itertools.repeat(bytes(BOMB_SIDE // 8), BOMB_SIDE))
# Odd but valid images, each one flat colour so that what a decoder made of it is easy to check.
CMYK = _pil(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")  # red
GRAY16_VALUE = 0x8080  # 32896 / 65535 * 255 = 128 on 8 bits; PIL and cv2 alone make it 255
GRAY16 = _pil(
    Image.frombytes("I;16", (40, 40), struct.pack("<H", GRAY16_VALUE) * 1600), "PNG"
)  # PIL mode I;16
RGB16 = _png(40, 40, 16, 2, [struct.pack(">HHH", 0xFFFF, 0x8080, 0x0000) * 40] * 40)  # 255,128,0
RGBA = _pil(Image.new("RGBA", (40, 40), (0, 0, 255, 128)), "PNG")  # half-transparent blue
RGBA_ON_WHITE = (127, 127, 255)  # 128/255 of blue over white
SLIVER = _png(1000, 2, 8, 0, [bytes(range(250)) * 4] * 2)  # 500:1
# Broken bytes.
_WHOLE = _jpeg(99, 120, 100)
TRUNCATED = _WHOLE[: len(_WHOLE) // 2]
HTML = b"<!doctype html><html><body>404: this is not an image</body></html>\n" * 4
EMPTY = b""


# ----------------------------------------------------------------------------------- the server

SERVED: dict[str, tuple[bytes, str]] = {
    **{f"/good/{i}.jpg": (_jpeg(i), "image/jpeg") for i in range(5)},
    "/cmyk.jpg": (CMYK, "image/jpeg"),
    "/gray16.png": (GRAY16, "image/png"),
    "/rgb16.png": (RGB16, "image/png"),
    "/rgba.png": (RGBA, "image/png"),
    "/sliver.png": (SLIVER, "image/png"),
    "/truncated.jpg": (TRUNCATED, "image/jpeg"),
    "/empty.jpg": (EMPTY, "image/jpeg"),
    "/page.jpg": (HTML, "image/jpeg"),  # an error page served as an image
    "/bomb.png": (BOMB, "image/png"),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802  (http.server's name)
        if self.path not in SERVED:
            self.send_error(404)
            return
        body, ctype = SERVED[self.path]
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    with loopback_server(_Handler) as url:
        yield url


def _closed_port() -> int:
    """A loopback port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marker(out: Path, stage: str, shard: int) -> dict[str, Any]:
    folder = {"download": "real"}.get(stage, stage)
    return json.loads((out / folder / "_state" / f"{shard:05d}.json").read_text())


def _tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order, members grouped by key as webdataset groups them."""
    with tarfile.open(path) as tf:
        members = [(*m.name.split(".", 1), tf.extractfile(m).read()) for m in tf.getmembers()]
    return [
        (k, {ext: data for _, ext, data in group})
        for k, group in itertools.groupby(members, lambda m: m[0])
    ]


def _write_manifest(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------- download: the corpus


@dataclass(frozen=True)
class Row:
    name: str
    where: str  # a server path, or "refused" / "file-good" / "file-missing"
    caption: str
    reason: str | None  # the failure reason counted, None for a committed sample


ROWS = [
    Row("good0", "/good/0.jpg", "a good photo", None),
    Row("truncated", "/truncated.jpg", "half a jpeg", "undecodable_image"),
    Row("good1", "/good/1.jpg", "another good photo", None),
    Row("empty_file", "/empty.jpg", "a file of zero bytes", "empty_image"),
    Row("html", "/page.jpg", "an html page posing as a jpeg", "undecodable_image"),
    Row("bomb", "/bomb.png", "twenty thousand pixels square", "image_too_large"),
    Row("cmyk", "/cmyk.jpg", "a cmyk jpeg", None),
    Row("gray16", "/gray16.png", "a 16-bit grayscale png", None),
    Row("rgb16", "/rgb16.png", "a 16-bit colour png", None),
    Row("rgba", "/rgba.png", "a png with alpha", None),
    # center_crop resizes the short side first: 2 -> 32 px would make the long side 16,000.
    Row("sliver", "/sliver.png", "a 1000 x 2 sliver", "filtered_size"),
    Row("no_caption", "/good/2.jpg", "", "empty_caption"),
    Row("blank_caption", "/good/3.jpg", "  ", "empty_caption"),
    Row("refused", "refused", "nobody listens there", "connection"),
    Row("not_found", "/missing.jpg", "a 404", "http_404"),
    Row("file_good", "file-good", "a local file", None),
    Row("file_missing", "file-missing", "a local file that is not there", "file_not_found"),
    Row("good4", "/good/4.jpg", "the last good photo", None),
]
IMAGE_SIZE = 32


@dataclass
class DownloadRun:
    out: Path
    urls: dict[str, str]  # row name -> url
    summary: RunSummary


@pytest.fixture(scope="module")
def download_run(server: str, tmp_path_factory: pytest.TempPathFactory) -> DownloadRun:
    root = tmp_path_factory.mktemp("bad-download")
    local = root / "local.jpg"
    local.write_bytes(_jpeg(7))
    special = {
        "refused": f"http://127.0.0.1:{_closed_port()}/image.jpg",
        "file-good": local.as_uri(),
        "file-missing": (root / "nowhere.jpg").as_uri(),
    }
    urls = {r.name: special.get(r.where, f"{server}{r.where}") for r in ROWS}
    tsv = root / "urls.tsv"
    tsv.write_text(
        "url\tcaption\n" + "".join(f"{urls[r.name]}\t{r.caption}\n" for r in ROWS),
        encoding="utf-8",
    )
    source = {"kind": "url_list", "path": str(tsv), "input_format": "tsv"}
    if "allowed_schemes" in UrlListSource.model_fields:  # file:// is opt-in where it exists
        source["allowed_schemes"] = ["http", "https", "file"]
    data = {
        "output": str(root / "out"),
        "shard_size": len(ROWS),  # one shard: the good samples share it with every fault
        "source": source,
        "executor": {"kind": "local", "max_attempts": 1},
        "stages": {
            "download": {
                "image_size": IMAGE_SIZE,
                "resize_mode": "center_crop",  # the mode whose short-side resize a sliver abuses
                "threads": 4,
                "timeout": 5,
            }
        },
    }
    summary = run_pipeline(validate(data))
    return DownloadRun(root / "out", urls, summary)


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_download_every_fault_is_a_counted_skip(download_run: DownloadRun) -> None:
    s = download_run.summary.stages["download"]
    assert download_run.summary.ok, s.errors
    assert (s.planned, s.done, s.failed) == (1, 1, 0)
    expected = Counter(r.reason for r in ROWS if r.reason)
    marker = _marker(download_run.out, "download", 0)
    assert marker["status"] == "done"
    assert marker["failures"] == dict(expected)
    assert marker["counts"]["inputs"] == len(ROWS)
    assert marker["samples"] + sum(marker["failures"].values()) == len(ROWS)
    assert s.failures == dict(expected)


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_download_status_rows_name_each_fault(download_run: DownloadRun) -> None:
    rows = pq.read_table(download_run.out / "real" / "00000.parquet").to_pylist()
    assert len(rows) == len(ROWS) == len({r["key"] for r in rows})
    by_url = {r["url"]: r for r in rows}
    for row in ROWS:
        status = by_url[download_run.urls[row.name]]
        if row.reason is None:
            assert status["status"] == "success", (row, status)
        else:
            got = failure_reason(status["status"], status["error_message"])
            assert got == row.reason, (row, status["error_message"])
    bomb = by_url[download_run.urls["bomb"]]
    assert "decompression bomb" in bomb["error_message"]


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_download_keeps_every_good_sample_once(download_run: DownloadRun) -> None:
    samples = _tar_samples(download_run.out / "real" / "00000.tar")
    keys = [k for k, _ in samples]
    assert len(keys) == len(set(keys)), "a sample was written twice"
    urls = [json.loads(files["json"])["url"] for _, files in samples]
    good = [download_run.urls[r.name] for r in ROWS if r.reason is None]
    assert sorted(urls) == sorted(good), "a good sample was lost (or a bad one kept)"
    for _, files in samples:
        assert set(files) == {"jpg", "txt", "json"}
        with Image.open(io.BytesIO(files["jpg"])) as im:
            assert im.size == (IMAGE_SIZE, IMAGE_SIZE)
    sizes = json.loads((download_run.out / "real" / "sizes.json").read_text())
    assert sizes == {"00000.tar": len(good)}


def _mean_rgb(jpg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpg)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_download_odd_images_are_converted_faithfully(download_run: DownloadRun) -> None:
    """CMYK, 16-bit and alpha images come out as 8-bit RGB of the colour they show (the square
    40 px sources fill the 32 px output, so there is nothing else to average in)."""
    by_url = {
        json.loads(f["json"])["url"]: f["jpg"]
        for _, f in _tar_samples(download_run.out / "real" / "00000.tar")
    }

    def mean(name: str) -> np.ndarray:
        return _mean_rgb(by_url[download_run.urls[name]])

    r, g, b = mean("cmyk")
    assert r > 200 and g < 80 and b < 80, (r, g, b)
    # 16-bit: scaled to 8 bits (OpenCV's JPEG writer alone saturates it to white).
    np.testing.assert_allclose(mean("gray16"), [128, 128, 128], atol=3)
    np.testing.assert_allclose(mean("rgb16"), [255, 128, 0], atol=4)
    np.testing.assert_allclose(mean("rgba"), RGBA_ON_WHITE, atol=4)


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_bomb_and_alpha_decode_in_bounded_memory(tmp_path: Path) -> None:
    """img2dataset's resizer, set up as the launcher sets it up for every call, in a fresh
    process whose peak memory is read around each call. Unguarded, OpenCV decodes the 400 MP bomb
    (about 1.5 GB) and img2dataset mattes a 9 MP RGBA image in float64 (about 0.7 GB)."""
    (tmp_path / "bomb.png").write_bytes(BOMB)
    rgba9 = _png(3000, 3000, 8, 6, itertools.repeat(bytes([0, 0, 255, 128]) * 3000, 3000))
    (tmp_path / "rgba9.png").write_bytes(rgba9)
    (tmp_path / "small.jpg").write_bytes(_jpeg(0))
    code = """
import io, json, resource, sys
from dgaug.stages.download.launcher import prepare_img2dataset
prepare_img2dataset()
from img2dataset.resizer import Resizer
r = Resizer(image_size=32, resize_mode="border", resize_only_if_bigger=False,
            encode_quality=95, encode_format="jpg")
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # MB
r(io.BytesIO(open(sys.argv[1] + "/small.jpg", "rb").read()))  # warm up OpenCV and albumentations
out = {"base": peak()}
for name in ("bomb", "rgba9"):
    res = r(io.BytesIO(open(f"{sys.argv[1]}/{name}.png", "rb").read()))
    out[name] = {"error": res[5], "size": res[1:3], "peak": peak()}
print(json.dumps(out))
"""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)  # the launcher's own limit, not one set outside
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failure_reason("failed_to_resize", got["bomb"]["error"]) == "image_too_large"
    assert got["bomb"]["peak"] - got["base"] < 100, got
    assert got["rgba9"]["error"] is None and got["rgba9"]["size"] == [32, 32]
    assert got["rgba9"]["peak"] - got["base"] < 300, got


def test_matte_on_white_is_img2datasets_own() -> None:
    from dgaug.stages.download.launcher import _matte_on_white

    rng = np.random.default_rng(0)
    bgra = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    alpha = bgra[:, :, 3, np.newaxis]
    theirs = np.rint((alpha / 255 * bgra[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8)
    assert np.array_equal(_matte_on_white(bgra), theirs)


# ---------------------------------------------------------------- url lists: source-level errors

runner = CliRunner()


def _cli_run(manifest: Path) -> Any:
    from dgaug.cli.app import app

    return runner.invoke(app, ["run", str(manifest)])


def _assert_clear_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_url_list_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    """The field-by-field report is tested in test_url_lists.py; here, what `dgaug run` does."""
    tsv = tmp_path / "urls.tsv"
    tsv.write_text("url\ttext\nhttp://127.0.0.1:9/a.jpg\ta caption\n", encoding="utf-8")
    m = _write_manifest(
        tmp_path / "m.yaml",
        {
            "output": str(tmp_path / "out"),
            "source": {"kind": "url_list", "path": str(tsv), "input_format": "tsv"},
        },
    )
    r = _cli_run(m)
    _assert_clear_error(r, "source.caption_col", "'caption'", str(tsv))
    assert not (tmp_path / "out" / "real").exists()


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_non_utf8_caption_bytes_in_a_url_list(server: str, tmp_path: Path, fmt: str) -> None:
    """A caption with latin-1 bytes must not cost the run nor its neighbours: the row is kept
    with U+FFFD in place of the bad bytes (as txt lists and shards captions are read), or skipped
    and counted."""
    sep = b"\t" if fmt == "tsv" else b","
    lines = [
        (f"{server}/good/0.jpg".encode(), b"plain"),
        (f"{server}/good/1.jpg".encode(), b"caf\xe9 cr\xe8me"),
        (f"{server}/good/2.jpg".encode(), b"also plain"),
    ]
    url_list = tmp_path / f"urls.{fmt}"
    url_list.write_bytes(
        b"url" + sep + b"caption\n" + b"".join(u + sep + c + b"\n" for u, c in lines)
    )
    out = tmp_path / "out"
    m = _write_manifest(
        tmp_path / "m.yaml",
        {
            "output": str(out),
            "source": {"kind": "url_list", "path": str(url_list), "input_format": fmt},
            "executor": {"max_attempts": 1},
            "stages": {"download": {"image_size": 16, "threads": 2, "timeout": 5}},
        },
    )
    r = _cli_run(m)
    assert r.exit_code == 0, (r.output, r.exception)
    marker = _marker(out, "download", 0)
    captions = [f["txt"].decode() for _, f in _tar_samples(out / "real" / "00000.tar")]
    assert {"plain", "also plain"} <= set(captions)
    if marker["samples"] == 3:
        assert "caf\ufffd cr\ufffdme" in captions
    else:
        assert marker["samples"] == 2 and sum(marker["failures"].values()) == 1


# ------------------------------------------------------------------- existing shards: the corpus


def _sample(key: str, image: bytes, caption: bytes, ext: str = "jpg") -> list[tuple[str, bytes]]:
    meta = json.dumps({"label": key.split("/")[-1], "domain": "photo"}).encode()
    return [(f"{key}.{ext}", image), (f"{key}.txt", caption), (f"{key}.json", meta)]


# What shard 0's source samples become: at ingest (None: taken in) and in edsam and features.
# (source key, ingest reason, decode reason downstream)
SHARD0 = [
    ("s0", None, None),
    ("dup", None, None),  # written twice in a row: the second is a duplicate
    ("dup", "duplicate_key", None),
    ("s1", None, None),
    ("x", "dotted_key", None),  # x.y.z.jpg: key `x`, extension `y.z.jpg`, as webdataset reads it
    ("cmyk", None, None),
    ("gray16", None, None),
    ("rgba", None, None),
    ("latin1", None, None),  # a caption of latin-1 bytes
    ("no_caption", "empty_caption", None),
    ("empty", "empty_image", None),
    ("truncated", None, "undecodable_image"),
    ("html", None, "undecodable_image"),
    ("bomb", None, "image_too_large"),
    ("sliver", None, "extreme_aspect_ratio"),
    ("s0", "duplicate_key", None),  # the first key met again, further on
    ("dir1/a", None, None),  # the same base name in two folders: two samples, as webdataset
    ("dir2/a", None, None),
]
SHARD1_KEPT = ["t0", "t1"]  # t2 is cut by the truncation, t3 is gone
EDSAM = {
    "model": "tiny-random",
    "device": "cpu",
    "cpu_threads": 1,
    "samples_per_image": 2,
    "steps": 2,
    "image_size": 16,
    "source_batch": 4,
    "batch_size": 4,
}
FEATURES = {"model": "tiny-random", "device": "cpu", "batch_size": 4, "cpu_threads": 1}


def _shard0_members() -> list[tuple[str, bytes]]:
    m: list[tuple[str, bytes]] = []
    m += _sample("s0", _jpeg(10), b"the first sample")
    m += _sample("dup", _jpeg(11), b"written twice")
    m += _sample("dup", _jpeg(12), b"written twice, again")
    m += _sample("s1", _jpeg(13), b"a plain sample")
    m += [("x.y.z.jpg", _jpeg(14)), ("x.y.z.txt", b"a dotted name")]
    m += _sample("cmyk", CMYK, b"a cmyk jpeg")
    m += _sample("gray16", GRAY16, b"a 16-bit png", "png")
    m += _sample("rgba", RGBA, b"a png with alpha", "png")
    m += _sample("latin1", _jpeg(15), b"caf\xe9 cr\xe8me")
    m += _sample("no_caption", _jpeg(16), b"   ")
    m += _sample("empty", EMPTY, b"a zero-byte image")
    m += _sample("truncated", TRUNCATED, b"half a jpeg")
    m += _sample("html", HTML, b"an html page")
    m += _sample("bomb", BOMB, b"a decompression bomb", "png")
    m += _sample("sliver", SLIVER, b"a 1000 x 2 sliver", "png")
    m += _sample("s0", _jpeg(17), b"the first key again")
    m += _sample("dir1/a", _jpeg(18), b"a in dir1")
    m += _sample("dir2/a", _jpeg(19), b"a in dir2")
    return m


@dataclass
class ShardsRun:
    src: Path
    out: Path
    summary: RunSummary


@pytest.fixture(scope="module")
def shards_run(tmp_path_factory: pytest.TempPathFactory) -> ShardsRun:
    root = tmp_path_factory.mktemp("bad-shards")
    src = root / "src"
    src.mkdir()
    write_tar(src / "00000.tar", _shard0_members())
    whole = src / "whole.tar"
    members = write_tar(whole, [m for i in range(4) for m in _sample(f"t{i}", _jpeg(20 + i), b"t")])
    cut = next(m for m in members if m.name == "t2.jpg")
    (src / "00001.tar").write_bytes(whole.read_bytes()[: cut.offset_data + cut.size // 2])
    whole.unlink()
    data = {
        "output": str(root / "out"),
        "source": {"kind": "shards", "path": f"{src}/{{00000..00001}}.tar"},
        "executor": {"kind": "local", "max_attempts": 1},
        "stages": {"edsam": EDSAM, "features": FEATURES},
    }
    summary = run_pipeline(validate(data))
    return ShardsRun(src, root / "out", summary)


def _status(run: ShardsRun, shard: int) -> list[dict[str, Any]]:
    return pq.read_table(run.out / "real" / f"{shard:05d}.parquet").to_pylist()


def _taken(shard: int) -> list[str]:
    """Source keys of the samples ingest takes in, in order."""
    return [k for k, why, _ in SHARD0 if why is None] if shard == 0 else SHARD1_KEPT


def _decodable(shard: int) -> list[str]:
    return (
        [k for k, why, bad in SHARD0 if why is None and bad is None] if shard == 0 else SHARD1_KEPT
    )


def test_shards_run_completes_every_stage(shards_run: ShardsRun) -> None:
    s = shards_run.summary
    assert s.ok, {n: st.errors for n, st in s.stages.items()}
    for name in ("download", "edsam", "features"):
        st = s.stages[name]
        assert (st.planned, st.done, st.failed) == (2, 2, 0), name


def test_ingest_counts_duplicate_dotted_truncated(shards_run: ShardsRun) -> None:
    m0 = _marker(shards_run.out, "download", 0)
    assert m0["failures"] == dict(Counter(why for _, why, _ in SHARD0 if why))
    assert m0["samples"] == len(_taken(0))
    assert m0["samples"] + sum(m0["failures"].values()) == m0["counts"]["inputs"] == len(SHARD0)
    status = _status(shards_run, 0)
    assert [(r["source_key"], r["error_message"]) for r in status] == [
        (k, why) for k, why, _ in SHARD0
    ]
    m1 = _marker(shards_run.out, "download", 1)
    assert m1["failures"] == {"truncated_tar": 1}
    assert m1["samples"] == len(SHARD1_KEPT)
    assert [(r["source_key"], r["status"]) for r in _status(shards_run, 1)] == [
        ("t0", "success"),
        ("t1", "success"),
        ("t2", "skipped"),
    ]


def test_ingest_keeps_every_good_sample_once(shards_run: ShardsRun) -> None:
    for shard in (0, 1):
        samples = _tar_samples(shards_run.out / "real" / f"{shard:05d}.tar")
        keys = [k for k, _ in samples]
        assert len(keys) == len(set(keys)) and all(k.isdigit() for k in keys)
        source_keys = [json.loads(f["json"])["source_key"] for _, f in samples]
        assert source_keys == _taken(shard)
    members = dict(_shard0_members()[:3])
    real0 = {
        json.loads(f["json"])["source_key"]: f
        for _, f in _tar_samples(shards_run.out / "real" / "00000.tar")
    }
    # The first of a duplicated key is the one kept, bytes as they were.
    assert real0["s0"]["jpg"] == members["s0.jpg"]
    assert real0["dup"]["txt"] == b"written twice"
    assert real0["latin1"]["txt"] == "caf\ufffd cr\ufffdme".encode()
    assert real0["dir1/a"]["txt"] == b"a in dir1" and real0["dir2/a"]["txt"] == b"a in dir2"


def test_edsam_skips_or_converts_odd_images(shards_run: ShardsRun) -> None:
    sources_by_shard = {}
    for shard in (0, 1):
        marker = _marker(shards_run.out, "edsam", shard)
        want = Counter(bad for k, why, bad in SHARD0 if why is None and bad) if shard == 0 else {}
        assert marker["failures"] == dict(want)
        counts = dict(marker["counts"])
        assert 0 <= counts.pop("upscaled_sources") <= counts["sources"]  # odd sizes among them
        assert counts == {
            "sources": len(_decodable(shard)),
            "skipped_sources": sum(want.values()),
        }
        samples = _tar_samples(shards_run.out / "edsam" / f"{shard:05d}.tar")
        assert len({k for k, _ in samples}) == len(samples) == marker["samples"]
        real = {
            k: json.loads(f["json"])["source_key"]
            for k, f in _tar_samples(shards_run.out / "real" / f"{shard:05d}.tar")
        }
        made = Counter(real[json.loads(f["json"])["source_key"]] for _, f in samples)
        # Every decodable source, CMYK, 16-bit and alpha included, has its M samples.
        assert made == {k: EDSAM["samples_per_image"] for k in _decodable(shard)}
        sources_by_shard[shard] = made
    assert set(sources_by_shard[0]) >= {"cmyk", "gray16", "rgba", "latin1"}


def test_features_skip_or_convert_odd_images(shards_run: ShardsRun) -> None:
    for shard in (0, 1):
        marker = _marker(shards_run.out, "features", shard)
        want = Counter(bad for k, why, bad in SHARD0 if why is None and bad) if shard == 0 else {}
        assert marker["failures"] == dict(want)
        t = pq.read_table(shards_run.out / "features" / f"{shard:05d}.parquet")
        keys = t.column("key").to_pylist()
        assert len(keys) == len(set(keys)), "a row was written twice"
        real = {
            k: json.loads(f["json"])["source_key"]
            for k, f in _tar_samples(shards_run.out / "real" / f"{shard:05d}.tar")
        }
        rows = t.to_pylist()
        got_real = [real[r["key"]] for r in rows if r["origin"] == "real"]
        assert got_real == _decodable(shard)
        n_edsam = sum(r["origin"] == "edsam" for r in rows)
        assert n_edsam == EDSAM["samples_per_image"] * len(_decodable(shard))
        assert marker["counts"] == {"edsam": n_edsam, "real": len(got_real)}
        emb = np.array([r["image_embedding"] for r in rows], dtype=np.float32)
        assert np.isfinite(emb).all()


def test_missing_listed_shard_is_a_clear_error(shards_run: ShardsRun, tmp_path: Path) -> None:
    """A brace pattern names files: one not there stops the run before any work, with exit 2."""
    out = tmp_path / "out"
    m = _write_manifest(
        tmp_path / "m.yaml",
        {
            "output": str(out),
            "source": {"kind": "shards", "path": f"{shards_run.src}/{{00000..00002}}.tar"},
        },
    )
    r = _cli_run(m)
    _assert_clear_error(r, "source.path", "1 of 3 shard(s) not found", "00002.tar")
    assert not (out / "real").exists()


# --------------------------------------------------------------------- decoding, as stages see it


def test_open_rgb_converts_odd_modes_and_refuses_bombs() -> None:
    def rgb(data: bytes) -> np.ndarray:
        return np.asarray(open_rgb(data), dtype=np.float64).reshape(-1, 3).mean(0)

    np.testing.assert_allclose(rgb(GRAY16), [128, 128, 128], atol=0.5)
    np.testing.assert_allclose(rgb(RGB16), [255, 128, 0], atol=0.5)
    np.testing.assert_allclose(rgb(RGBA), RGBA_ON_WHITE, atol=1)
    r, g, b = rgb(CMYK)
    assert r > 200 and g < 80 and b < 80
    # A plain JPEG decodes to exactly what PIL's convert("RGB") gives (bytes unchanged).
    good = _jpeg(3)
    with Image.open(io.BytesIO(good)) as im:
        assert np.array_equal(np.asarray(open_rgb(good)), np.asarray(im.convert("RGB")))
    with pytest.raises(BadImage) as exc:
        open_rgb(BOMB)
    assert exc.value.reason == "image_too_large"
    with pytest.raises(BadImage) as exc:
        open_rgb(SLIVER, max_aspect_ratio=100)
    assert exc.value.reason == "extreme_aspect_ratio"
    assert open_rgb(SLIVER).size == (1000, 2)  # without a limit, it is just an image
