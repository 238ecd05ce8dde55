"""Decoding shard images: 8-bit RGB from any mode img2dataset writes, and the skip reason of one refused."""

from __future__ import annotations

import io
from typing import Any


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
