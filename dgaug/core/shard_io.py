"""Shard I/O shared by stages: stream a webdataset tar's samples, decode its images, prefetch."""

from __future__ import annotations

import io
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the members open_clip's loader takes as the image


def read_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a webdataset tar, streamed (local path or fsspec URL).

    The key is the member name up to its first dot, as webdataset reads it; a sample's members are
    adjacent in dgaug's shards, and a key met again later would be a malformed shard.
    """
    import fsspec

    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            name = m.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            data = tf.extractfile(m).read()
            if k != key:
                if key is not None:
                    yield key, members
                if k in seen:
                    raise RuntimeError(f"{url}: members of sample {k!r} are not adjacent")
                seen.add(k)
                key, members = k, {}
            members[ext.lower()] = data
        if key is not None:
            yield key, members


# Images more elongated than this are skipped by the stages that decode shard images: open_clip's
# transform resizes the short side first, so a 1 x 200,000 sliver would become 32 x 6,400,000 (and
# 224 x 44,800,000, 30 GB) before its center crop. At 100:1 a 1024 px side stays under 320 MB.
MAX_ASPECT_RATIO = 100


class BadImage(ValueError):
    """An image a stage refuses before decoding it; `reason` is the countable skip reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def open_rgb(data: bytes, max_aspect_ratio: float | None = None) -> Any:
    """Image bytes as an 8-bit RGB PIL image; 16-bit and alpha as img2dataset treats them.

    Plain `Image.convert("RGB")` is kept for every mode it handles faithfully (RGB, L, CMYK, P...),
    so those decode to the same pixels as before. Two it does not:
    - 16-bit grayscale (PIL modes I;16*, and I for 16-bit TIFF/PNG) is clipped at 255: a white
      image. Scaled to 8 bits here (x * 255 / 65535, rounded).
    - alpha is dropped, leaving whatever colour the transparent pixels hide (often black).
      Composited on white here, as img2dataset's resizer does.
    PIL refuses images over 2 * Image.MAX_IMAGE_PIXELS at the header (before decoding): raised as
    BadImage("image_too_large"); so is an aspect ratio over `max_aspect_ratio`
    ("extreme_aspect_ratio"). Other undecodable bytes raise PIL's own errors.
    """
    import numpy as np
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("image_too_large", str(e)) from None
    with im:
        w, h = im.size
        if max_aspect_ratio is not None and max(w, h) > max_aspect_ratio * max(min(w, h), 1):
            raise BadImage("extreme_aspect_ratio", f"{w}x{h} is over {max_aspect_ratio}:1")
        if im.mode in _SIXTEEN_BIT_GRAY:
            wide = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
            gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
            return Image.fromarray(gray).convert("RGB")
        if im.has_transparency_data:
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")


_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def skip_reason(error: BaseException) -> str:
    """The countable reason for an image that open_rgb (or what follows it) could not use."""
    return error.reason if isinstance(error, BadImage) else "undecodable_image"


_END = object()


def prefetch(items: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Iterate `items` in a background thread, `depth` items ahead (decoding overlaps the model).

    An exception in the thread is raised here; stopping early stops the thread.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    t = threading.Thread(target=work, name="edsam-prefetch", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        t.join(timeout=5)


def embedding_column(matrix: Any, dtype: str) -> Any:
    """A [N, D] float matrix (numpy or CPU tensor) as a Parquet-ready fixed-size-list column of
    `dtype` ("float16" or "float32"): one list of D numbers per row."""
    import numpy as np
    import pyarrow as pa

    arr = np.asarray(matrix, dtype=np.float16 if dtype == "float16" else np.float32)
    flat = pa.array(arr.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
