"""Tests for the procedural class x style image-caption data used by the offline demo."""

import collections
import io
import pathlib
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dgaug.sources.captions import make_caption
from dgaug.sources.drawing import render_image
from dgaug.sources.imageset import (
    DEFAULT_CLASSES,
    DEFAULT_STYLES,
    JPEG_QUALITY,
    write_synthetic_dataset,
)

PAIRS = len(DEFAULT_CLASSES) * len(DEFAULT_STYLES)

# Words that tell each style apart in a caption; every caption must use one of its style's.
STYLE_WORDS = {
    "photo": ("photo", "snapshot"),
    "sketch": ("sketch", "drawing"),
    "cartoon": ("cartoon",),
    "painting": ("painting",),
}


def _path(url: str) -> pathlib.Path:
    parsed = urlparse(url)
    assert parsed.scheme == "file" and parsed.netloc == ""
    return pathlib.Path(url2pathname(parsed.path))


def _rows(url_list: pathlib.Path) -> list[dict]:
    return pq.read_table(url_list).to_pylist()


def _pixels(row: dict) -> np.ndarray:
    with Image.open(_path(row["url"])) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def test_url_list_lists_existing_jpegs_of_requested_size(tmp_path):
    url_list = write_synthetic_dataset(tmp_path / "data", num_images=2 * PAIRS, image_size=40)

    assert url_list == (tmp_path / "data" / "urls.parquet").resolve()
    table = pq.read_table(url_list)
    assert table.column_names == ["url", "caption", "label", "domain"]
    assert all(field.type == pa.string() for field in table.schema)
    assert table.num_rows == 2 * PAIRS
    # No pandas index or metadata: the file is plain Arrow, as pq.write_table writes it.
    assert b"pandas" not in (table.schema.metadata or {})

    images_root = (tmp_path / "data" / "images").resolve()
    for i, row in enumerate(table.to_pylist()):
        assert row["url"].startswith("file:///")
        path = _path(row["url"])
        assert path.is_absolute() and path.is_file()
        # Rows are in index order and the folders name the style and class.
        assert path.relative_to(images_root).parts == (row["domain"], row["label"], path.name)
        assert int(path.stem) == i and path.suffix == ".jpg"
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (40, 40)


def test_every_class_style_pair_appears_evenly_with_matching_captions(tmp_path):
    rows = _rows(write_synthetic_dataset(tmp_path, num_images=3 * PAIRS, seed=5))

    counts = collections.Counter((r["label"], r["domain"]) for r in rows)
    assert set(counts) == {(c, s) for c in DEFAULT_CLASSES for s in DEFAULT_STYLES}
    assert set(counts.values()) == {3}
    for i, row in enumerate(rows):
        assert row["label"] == DEFAULT_CLASSES[i % len(DEFAULT_CLASSES)]
        assert row["domain"] == DEFAULT_STYLES[(i // len(DEFAULT_CLASSES)) % len(DEFAULT_STYLES)]
        caption = row["caption"]
        assert caption.strip() == caption and caption
        assert row["label"] in caption.split()
        assert any(word in caption for word in STYLE_WORDS[row["domain"]]), caption
    # Captions vary: templates, colours and settings are drawn per image.
    assert len({r["caption"] for r in rows}) > len(rows) // 2


def test_subset_of_classes_and_styles(tmp_path):
    rows = _rows(
        write_synthetic_dataset(
            tmp_path, num_images=7, classes=("heart", "star", "hexagon"), styles=("sketch", "photo")
        )
    )
    assert [r["label"] for r in rows] == ["heart", "star", "hexagon"] * 2 + ["heart"]
    assert [r["domain"] for r in rows] == ["sketch"] * 3 + ["photo"] * 3 + ["sketch"]


def test_same_arguments_give_identical_files(tmp_path):
    args = {"num_images": PAIRS + 5, "seed": 11, "image_size": 48}
    rows_a = _rows(write_synthetic_dataset(tmp_path / "a", **args))
    rows_b = _rows(write_synthetic_dataset(tmp_path / "b", **args))

    for a, b in zip(rows_a, rows_b, strict=True):
        assert _path(a["url"]).read_bytes() == _path(b["url"]).read_bytes()
        assert (a["caption"], a["label"], a["domain"]) == (b["caption"], b["label"], b["domain"])

    # Rewriting in place gives a byte-identical url list too (no timestamps or pandas metadata).
    first = (tmp_path / "a" / "urls.parquet").read_bytes()
    write_synthetic_dataset(tmp_path / "a", **args)
    assert (tmp_path / "a" / "urls.parquet").read_bytes() == first

    rows_c = _rows(write_synthetic_dataset(tmp_path / "c", **{**args, "seed": 12}))
    assert _path(rows_c[0]["url"]).read_bytes() != _path(rows_a[0]["url"]).read_bytes()


def test_image_depends_only_on_seed_and_index(tmp_path):
    # Image i of a small run equals image i of a larger run, and equals render_image's output.
    small = _rows(write_synthetic_dataset(tmp_path / "small", num_images=6, seed=3))
    large = _rows(write_synthetic_dataset(tmp_path / "large", num_images=30, seed=3))
    for i, row in enumerate(small):
        assert _path(row["url"]).read_bytes() == _path(large[i]["url"]).read_bytes()
        assert row["caption"] == large[i]["caption"]

    row = large[27]
    direct = render_image(row["label"], row["domain"], np.random.default_rng([3, 27]), 64)
    assert direct.mode == "RGB" and direct.size == (64, 64)
    # Encoded as the writer does (fixed quality, 4:4:4 chroma), it is the very same file.
    buf = io.BytesIO()
    direct.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    assert buf.getvalue() == _path(row["url"]).read_bytes()


def test_resume_keeps_files_and_restores_missing_ones(tmp_path):
    rows = _rows(write_synthetic_dataset(tmp_path, num_images=10, seed=2))
    paths = [_path(r["url"]) for r in rows]
    original = paths[4].read_bytes()
    paths[4].unlink()
    kept_mtime = paths[0].stat().st_mtime_ns

    assert _rows(write_synthetic_dataset(tmp_path, num_images=12, seed=2))[:10] == rows
    assert paths[4].read_bytes() == original
    assert paths[0].stat().st_mtime_ns == kept_mtime  # skipped, not rewritten
    assert not list(tmp_path.rglob("*.tmp"))

    # Reusing the folder with other image-defining arguments would mix two datasets.
    with pytest.raises(ValueError, match="already holds"):
        write_synthetic_dataset(tmp_path, num_images=10, seed=3)
    with pytest.raises(ValueError, match="already holds"):
        write_synthetic_dataset(tmp_path, num_images=10, seed=2, image_size=32)


# ---------------------------------------------------------------- the styles are real domains


def _noise(a: np.ndarray) -> float:
    """Median absolute difference from the 4-neighbour mean: sensor noise, ignoring edges."""
    mid = a[1:-1, 1:-1]
    nbrs = (a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:]) / 4
    return float(np.median(np.abs(mid - nbrs)))


def _chroma(a: np.ndarray) -> float:
    return float((a.max(axis=2) - a.min(axis=2)).mean())


def _colours_covering(a: np.ndarray, share: float = 0.9) -> int:
    """How many colours (16 levels a channel) it takes to cover `share` of the pixels."""
    q = (a // 16).astype(np.int64)
    counts = np.sort(np.bincount((q[..., 0] * 256 + q[..., 1] * 16 + q[..., 2]).ravel()))[::-1]
    return int(np.searchsorted(np.cumsum(counts), share * counts.sum()) + 1)


def _sharpest_step(a: np.ndarray) -> float:
    return float(np.percentile(np.abs(np.diff(a.mean(axis=2), axis=1)), 99))


@pytest.fixture(scope="module")
def by_style(tmp_path_factory) -> dict[str, list[np.ndarray]]:
    out = tmp_path_factory.mktemp("styles")
    images: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for row in _rows(write_synthetic_dataset(out, num_images=4 * PAIRS, seed=1)):
        images[row["domain"]].append(_pixels(row))
    return images


def test_sketch_is_graphite_on_white_paper(by_style):
    for a in by_style["sketch"]:
        assert (a.min(axis=2) > 200).mean() > 0.8  # mostly bare paper: no fill
        assert _chroma(a) < 25  # grey pencil, no colour
        assert (a.min(axis=2) < 150).any()  # but a dark line is there


def test_cartoon_is_flat_saturated_colour_with_black_outline(by_style):
    for a in by_style["cartoon"]:
        assert (a.max(axis=2) < 60).mean() > 0.02  # thick black ink line
        assert _colours_covering(a) <= 24  # a few flat colours
        assert _chroma(a) > 50  # saturated background and fill
        assert (a.min(axis=2) > 200).mean() < 0.05  # not on white paper


def test_photo_has_sensor_noise_and_the_others_do_not(by_style):
    photo = [_noise(a) for a in by_style["photo"]]
    others = [_noise(a) for s in ("sketch", "cartoon", "painting") for a in by_style[s]]
    assert min(photo) > 3.0
    assert max(others) < min(photo)
    assert min(_colours_covering(a) for a in by_style["photo"]) > 8  # gradients, shading


def test_painting_is_soft_and_muted(by_style):
    for a in by_style["painting"]:
        assert (a.max(axis=2) < 60).mean() < 0.005  # no ink outline
        assert _sharpest_step(a) < 50  # blurred edges
        assert _noise(a) < 2.5  # smooth strokes, no grain
        assert _colours_covering(a) > 8  # stroke texture, not flat fills
    # Muted palette: less colourful than the cartoon of the same shapes.
    paint = np.mean([_chroma(a) for a in by_style["painting"]])
    assert paint < np.mean([_chroma(a) for a in by_style["cartoon"]]) - 10
    assert min(_sharpest_step(a) for a in by_style["cartoon"]) > 70


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_images": 0},
        {"num_images": -3},
        {"num_images": 2.5},
        {"num_images": True},
        {"num_images": 4, "image_size": 15},
        {"num_images": 4, "image_size": 0},
        {"num_images": 4, "seed": -1},
        {"num_images": 4, "classes": ()},
        {"num_images": 4, "styles": []},
        {"num_images": 4, "classes": "circle"},
        {"num_images": 4, "classes": ("circle", "a/b")},
        {"num_images": 4, "styles": ("photo", "../sketch")},
        {"num_images": 4, "classes": ("circle", "")},
        {"num_images": 4, "classes": ("circle", "circle")},
        {"num_images": 4, "classes": ("circle", "dodecahedron")},
        {"num_images": 4, "styles": ("photo", "anime")},
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "urls.parquet").exists()


def test_render_image_and_make_caption_reject_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        render_image("circle", "photo", rng, 8)
    with pytest.raises(ValueError):
        render_image("blob", "photo", rng, 64)
    with pytest.raises(ValueError):
        render_image("circle", "anime", rng, 64)
    caption = make_caption("star", "painting", "orange", rng)
    assert "orange star" in caption and "painting" in caption
    # Sketches are graphite only, so their captions do not claim a colour.
    assert "red" not in make_caption("star", "sketch", "red", rng)
