"""ED-SAM's shard I/O: stream source samples from a tar, decode them ahead, encode JPEGs in threads."""

from __future__ import annotations

import io
import json
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
COPIED_FIELDS = ("label", "domain")  # copied from the source sample's json when present


@dataclass
class SourceSample:
    """One source sample as read from the upstream shard; `skip` names why it cannot be used."""

    key: str
    caption: bytes = b""  # the txt member, unchanged
    meta: dict[str, Any] = field(default_factory=dict)
    pixels: torch.Tensor | None = None  # [3, S, S] float32 in [-1, 1]
    skip: str | None = None


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


def load_image(data: bytes, size: int) -> torch.Tensor:
    """Decode, resize the short side to `size` (bicubic), center-crop: [3, size, size] in [−1, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def to_source_sample(key: str, members: dict[str, bytes], size: int) -> SourceSample:
    """Decode one sample; a missing or broken part marks it skipped with a countable reason."""
    s = SourceSample(key)
    s.caption = members.get("txt", b"")
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            meta = {}
        if isinstance(meta, dict):
            s.meta = {k: meta[k] for k in COPIED_FIELDS if k in meta}
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        s.skip = "missing_image"
    elif not s.caption.decode("utf-8", errors="replace").strip():
        s.skip = "missing_caption"
    else:
        try:
            s.pixels = load_image(image, size)
        except Exception:  # PIL raises many types for bad bytes; any of them means "skip"
            s.skip = "undecodable_image"
    return s


def decoded_chunks(url: str, size: int, chunk: int) -> Iterator[list[SourceSample]]:
    """The shard's samples, decoded, in lists holding `chunk` usable ones (skipped ones ride along)."""
    out: list[SourceSample] = []
    usable = 0
    for key, members in read_tar_samples(url):
        s = to_source_sample(key, members, size)
        out.append(s)
        usable += s.skip is None
        if usable == chunk:
            yield out
            out, usable = [], 0
    if out:
        yield out


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


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes (Pillow's encoder: deterministic for the same libjpeg)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_json(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()
