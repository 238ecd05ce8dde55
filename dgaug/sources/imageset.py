"""The demo's image set written: JPEGs under images/<style>/<class>/ and their url list."""

import io
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dgaug.core.atomic import atomic_write
from dgaug.sources.captions import make_caption
from dgaug.sources.drawing import (
    MIN_IMAGE_SIZE,
    STYLE_RENDERERS,
    SUPPORTED_CLASSES,
    draw_scene,
    sample_scene,
)

DEFAULT_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
DEFAULT_STYLES: tuple[str, ...] = ("photo", "sketch", "cartoon", "painting")

URL_LIST_NAME = "urls.parquet"
JPEG_QUALITY = 90

# Records the arguments that fix every image, so a resumed run cannot silently mix images
# drawn with another seed, size or class/style list into one dataset.
_PARAMS_NAME = ".synthetic.json"
# Bump whenever the drawing code changes: files from an older version must not be reused.
_RENDER_VERSION = 1

_URL_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("label", pa.string()),
        ("domain", pa.string()),
    ]
)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Fixed quality and chroma subsampling, no EXIF: identical inputs give identical bytes.
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _check_names(kind: str, names: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise ValueError(f"{kind} must be a sequence of names, not the single string {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError(f"{kind} must not be empty")
    for name in names:
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name:
            raise ValueError(f"{kind} entry {name!r} must be a non-empty name without '/'")
        if "\\" in name or "\x00" in name:
            raise ValueError(f"{kind} entry {name!r} must not contain a backslash or NUL")
        if name not in known:
            raise ValueError(f"unknown {kind[:-1]} {name!r}; supported: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} has duplicates: {list(names)}")
    return names


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _claim_folder(root: pathlib.Path, params: dict[str, object]) -> None:
    marker = root / _PARAMS_NAME
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous != params:
            raise ValueError(
                f"{root} already holds a synthetic dataset written with {previous}, "
                f"not {params}; use an empty out_dir"
            )
        return
    atomic_write(marker, (json.dumps(params, sort_keys=True) + "\n").encode())


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    num_images: int,
    seed: int = 0,
    image_size: int = 64,
    classes: Sequence[str] = DEFAULT_CLASSES,
    styles: Sequence[str] = DEFAULT_STYLES,
) -> pathlib.Path:
    """Write images under out_dir/images/<style>/<label>/<index>.jpg and a url list
    out_dir/urls.parquet; return the url list path.

    Image i has class ``classes[i % C]`` and style ``styles[(i // C) % S]``, so every pair
    recurs evenly, and depends only on (seed, i). JPEGs already present are kept (resume); the
    url list is always rewritten. Raises ValueError on bad arguments, or when out_dir already
    holds images written with another seed, size, class list or style list.
    """
    num_images = _check_int("num_images", num_images, 1)
    seed = _check_int("seed", seed, 0)
    image_size = _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    classes = _check_names("classes", classes, SUPPORTED_CLASSES)
    styles = _check_names("styles", styles, tuple(STYLE_RENDERERS))

    root = pathlib.Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # num_images is left out on purpose: growing a dataset in place is a valid resume.
    params = {
        "version": _RENDER_VERSION,
        "seed": seed,
        "image_size": image_size,
        "classes": list(classes),
        "styles": list(styles),
    }
    _claim_folder(root, params)

    n_cls, n_sty = len(classes), len(styles)
    columns: dict[str, list[str]] = {name: [] for name in _URL_SCHEMA.names}
    for i in range(num_images):
        label, style = classes[i % n_cls], styles[(i // n_cls) % n_sty]
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(label, style, rng)
        # A separate stream for the caption keeps the image equal to render_image(..., rng).
        caption = make_caption(
            label,
            style,
            scene.color_name,
            np.random.default_rng([seed, i, 1]),
            setting=scene.setting,
        )
        path = root / "images" / style / label / f"{i:08d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, _jpeg_bytes(draw_scene(scene, rng, image_size)))
        columns["url"].append(path.as_uri())
        columns["caption"].append(caption)
        columns["label"].append(label)
        columns["domain"].append(style)

    url_list = root / URL_LIST_NAME
    table = pa.Table.from_pydict(columns, schema=_URL_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write(url_list, buf.getvalue().to_pybytes())
    return url_list
