"""ED-SAM's sample I/O: decode source samples into pixel batches, encode generated images as JPEG."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dgaug.core.constants import IMAGE_EXTS, MAX_ASPECT_RATIO
from dgaug.core.images import open_rgb, skip_reason
from dgaug.core.tars import read_tar_samples

COPIED_FIELDS = ("label", "domain")  # copied from the source sample's json when present


@dataclass
class SourceSample:
    """One source sample as read from the upstream shard; `skip` names why it cannot be used."""

    key: str
    caption: bytes = b""  # the txt member, unchanged
    meta: dict[str, Any] = field(default_factory=dict)
    pixels: torch.Tensor | None = None  # [3, S, S] float32 in [-1, 1]
    side: int = 0  # the source image's short side before any resize
    image_bytes: int = 0  # its encoded size in the shard
    skip: str | None = None


def load_image(data: bytes, size: int) -> tuple[torch.Tensor, int]:
    """Decode, resize the short side to `size` (bicubic), center-crop: [3, size, size] in [−1, 1],
    and the decoded image's own short side.

    Decoded by open_rgb: 16-bit and alpha images as the download stage makes them; a decompression
    bomb or a sliver (whose resized long side would be huge) raises BadImage before any pixel.
    """
    from PIL import Image

    with open_rgb(data, MAX_ASPECT_RATIO) as im:
        w, h = im.size
        side = min(w, h)
        scale = size / side
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0, side


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
            s.pixels, s.side = load_image(image, size)
            s.image_bytes = len(image)
        except Exception as e:  # PIL raises many types for bad bytes; any of them means "skip"
            s.skip = skip_reason(e)
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


def encode_jpeg(image: np.ndarray, quality: int, side: int | None = None) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes, resized to side x side first when `side` differs (Lanczos:
    the usual downscale from generation size). Pillow's encoder is deterministic for one libjpeg."""
    from PIL import Image

    im = Image.fromarray(image)
    if side is not None and im.size != (side, side):
        im = im.resize((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_json(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()
