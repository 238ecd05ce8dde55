"""ED-SAM's sample I/O: decode source samples into pixel batches, encode generated images as JPEG."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where a source is decoded: planning needs no torch
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


def content_box(
    width: int, height: int, original: tuple[int, int] | None
) -> tuple[int, int, int, int] | None:
    """Where the picture is in an image img2dataset letterboxed with resize_mode `border`: the
    original (w, h) scaled to fit the square and centred (LongestMaxSize, then PadIfNeeded).
    None when there are no bands to remove (a square original, or sizes that do not fit)."""
    if original is None or width != height:
        return None
    ow, oh = original
    if ow <= 0 or oh <= 0 or ow == oh:
        return None
    scale = width / max(ow, oh)
    cw, ch = max(1, round(ow * scale)), max(1, round(oh * scale))
    left, top = (width - cw) // 2, (height - ch) // 2
    # One pixel in from a padded edge: a rounding difference must not leave a white line.
    inset_x, inset_y = (1, 0) if cw < width else (0, 1)
    box = (left + inset_x, top + inset_y, left + cw - inset_x, top + ch - inset_y)
    return box if box[2] > box[0] and box[3] > box[1] else None


def load_image(
    data: bytes, size: int, original: tuple[int, int] | None = None
) -> tuple[torch.Tensor, int]:
    """Decode, cut a letterboxed image back to its picture (`original`: the (w, h) before
    img2dataset's `border` resize; None: no bands), resize the short side to `size` (bicubic),
    center-crop: [3, size, size] in [−1, 1], and the picture's own short side.

    Decoded by open_rgb: 16-bit and alpha images as the download stage makes them; a decompression
    bomb or a sliver (whose resized long side would be huge) raises BadImage before any pixel.
    """
    from PIL import Image

    with open_rgb(data, MAX_ASPECT_RATIO) as im:
        box = content_box(*im.size, original)
        if box is not None:
            im = im.crop(box)
        w, h = im.size
        side = min(w, h)
        scale = size / side
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    import torch

    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0, side


def _original_size(meta: dict[str, Any]) -> tuple[int, int] | None:
    w, h = meta.get("original_width"), meta.get("original_height")
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (w, h))
    return (w, h) if ok else None


def to_source_sample(
    key: str, members: dict[str, bytes], size: int, letterboxed: bool = False
) -> SourceSample:
    """Decode one sample; a missing or broken part marks it skipped with a countable reason.
    `letterboxed`: the shard was resized with img2dataset's `border` mode, so the json's
    original_width/height say where the picture is."""
    s = SourceSample(key)
    s.caption = members.get("txt", b"")
    original = None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            meta = {}
        if isinstance(meta, dict):
            s.meta = {k: meta[k] for k in COPIED_FIELDS if k in meta}
            original = _original_size(meta) if letterboxed else None
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        s.skip = "missing_image"
    elif not s.caption.decode("utf-8", errors="replace").strip():
        s.skip = "missing_caption"
    else:
        try:
            s.pixels, s.side = load_image(image, size, original)
            s.image_bytes = len(image)
        except Exception as e:  # PIL raises many types for bad bytes; any of them means "skip"
            s.skip = skip_reason(e)
    return s


def decoded_chunks(
    url: str, size: int, chunk: int, letterboxed: bool = False
) -> Iterator[list[SourceSample]]:
    """The shard's samples, decoded, in lists holding `chunk` usable ones (skipped ones ride along)."""
    out: list[SourceSample] = []
    usable = 0
    for key, members in read_tar_samples(url):
        s = to_source_sample(key, members, size, letterboxed)
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
