"""What the download's image_size and resize_mode cost and give the edsam stage: bytes per image
(img2dataset's own Resizer, JPEG q95), resize+encode time, and the upscale edsam then applies.

Inputs are real photographs shipped with matplotlib (no dataset reaches this machine), each also
enlarged 2x to stand for a larger web image. Decides the shipped manifests' download settings.

    python bench/download_size.py
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS_DIR, describe_machine, format_table, write_json  # noqa: E402

SETTINGS = [(256, "border"), (256, "keep_ratio"), (384, "keep_ratio"), (448, "keep_ratio"),
            (512, "keep_ratio"), (512, "center_crop")]  # fmt: skip
EDSAM_SIZE = 512  # SD-1.5's generation size
REPEATS = 20


def _photos() -> dict[str, bytes]:
    import matplotlib
    from PIL import Image

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    out = {}
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        im = Image.open(folder / name).convert("RGB")
        for scale in (1, 2):
            big = im.resize((im.width * scale, im.height * scale), Image.LANCZOS)
            buf = io.BytesIO()
            big.save(buf, format="JPEG", quality=95)
            out[f"{name.split('.')[0]} {big.width}x{big.height}"] = buf.getvalue()
    return out


def main() -> None:
    from img2dataset.resizer import Resizer

    photos = _photos()
    rows = []
    for size, mode in SETTINGS:
        resizer = Resizer(size, mode, resize_only_if_bigger=False)
        sizes, times, upscale = [], [], []
        for data in photos.values():
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                img, w, h, ow, oh, err = resizer(io.BytesIO(data))
                times.append(time.perf_counter() - t0)
            assert err is None, err
            sizes.append(len(img))
            # edsam's crop: border cuts back to the picture (short side min(w,h)*size/max(ow,oh))
            short = min(ow, oh) * size / max(ow, oh) if mode == "border" else min(w, h)
            upscale.append(EDSAM_SIZE / short)
        rows.append(
            {
                "image_size": size,
                "resize_mode": mode,
                "kb_per_image": round(float(np.mean(sizes)) / 1024, 1),
                "ms_per_image": round(1000 * float(np.median(times)), 2),
                "edsam_upscale_to_512": round(float(np.max(upscale)), 2),
            }
        )
    base = rows[0]["kb_per_image"]
    for r in rows:
        r["bytes_vs_256_border"] = round(r["kb_per_image"] / base, 2)
    print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
    write_json(
        RESULTS_DIR / "download_size.json",
        {"machine": describe_machine(), "photos": list(photos), "rows": rows},
    )


if __name__ == "__main__":
    main()
