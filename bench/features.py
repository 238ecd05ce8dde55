"""Features-stage throughput against a clip-retrieval-style loop (one batch at a time, no overlap).

Both embed the same webdataset shard (JPEGs + captions) with the same model, batch size, device
and precision, in the same process, and end with the same Parquet file:
- **dgaug**: `FeaturesStage.process` on the shard: images decoded and preprocessed by
  `decode_threads` threads a batch ahead of the model, each distinct caption encoded once;
- **loop**: read a batch, decode and preprocess it in the calling thread, encode images and
  captions, next batch (what `clip inference` does per batch, without its DataLoader workers).

    python bench/features.py                                # CPU, tiny-random CLIP
    python bench/features.py --model ViT-B-16:random --device cuda
    python bench/features.py --model ViT-L-14:random --device cuda --images 8192

`ARCH:random` builds the architecture with random weights: the timing needs the shapes only.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import (  # noqa: E402
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine_line,
    write_json,
)

PACKAGES = ("dgaug", "torch", "open_clip_torch", "pyarrow", "pillow", "numpy")
CAPTIONS = ["a photo of a dog", "a sketch of a house", "a painting of a boat", "a red bicycle"]


def make_shard(path: Path, n: int, size: int, seed: int = 0) -> None:
    """n JPEGs (size px, smooth content plus noise, about what a resized photo costs to decode)."""
    from PIL import Image

    from dgaug.stages.download.merge import write_deterministic_tar

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        arr = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)).astype(np.int16)
        arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        caption = f"{CAPTIONS[i % len(CAPTIONS)]}, number {i}"
        samples.append((f"{i:010d}", {"jpg": buf.getvalue(), "txt": caption.encode()}))
    write_deterministic_tar(str(path), samples)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_dgaug(stage: Any, ctx: Any, shard: Path, tmp: Path) -> int:
    from dgaug.pipeline.stage import ShardTask

    out = tmp / "dgaug"
    out.mkdir(exist_ok=True)
    task = ShardTask(
        "features", 0, inputs=(str(shard),), outputs=("00000.parquet",), tmp_dir=str(out)
    )
    result = stage.process(task, ctx)
    return result.samples


def run_loop(clip: Any, shard: Path, batch: int, dtype: str, tmp: Path) -> int:
    """clip-retrieval's shape: per batch, decode, preprocess, embed; then write the table."""
    from PIL import Image

    from dgaug.core.tars import read_tar_samples
    from dgaug.stages.features.stage import _table

    columns: dict[str, list[Any]] = {
        n: [] for n in ("key", "origin", "source_key", "sample_index", "caption", "label", "domain")
    }
    images, texts = [], []

    def flush(keys: list[str], jpgs: list[bytes], caps: list[str]) -> None:
        pixels = [clip.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpgs]
        images.append(clip.encode_preprocessed(torch.stack(pixels)).cpu())
        texts.append(clip.encode_text(caps, batch_size=batch).cpu())
        for k, c in zip(keys, caps, strict=True):
            for name, v in zip(columns, (k, "real", k, None, c, None, None), strict=True):
                columns[name].append(v)

    keys, jpgs, caps = [], [], []
    for key, members in read_tar_samples(str(shard)):
        keys.append(key)
        jpgs.append(members["jpg"])
        caps.append(members["txt"].decode())
        if len(keys) == batch:
            flush(keys, jpgs, caps)
            keys, jpgs, caps = [], [], []
    if keys:
        flush(keys, jpgs, caps)
    import pyarrow.parquet as pq

    table = _table(columns, images, torch.cat(texts), dtype, clip)
    pq.write_table(table, tmp / "loop.parquet", compression="zstd")
    return table.num_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-random", help="tiny-random, ARCH:random, ARCH:TAG")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=256, help="side of the stored JPEGs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--decode-threads", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from dgaug.core.storage import Storage
    from dgaug.job.manifest import validate
    from dgaug.pipeline.stage import StageContext
    from dgaug.stages.features.stage import FeaturesStage

    machine = describe_machine(PACKAGES)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    print(f"machine: {machine_line(machine)}{', ' + machine['gpu'] if 'gpu' in machine else ''}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shard = tmp / "00000.tar"
        make_shard(shard, args.images, args.image_size)
        m = validate(
            {
                "output": str(tmp / "out"),
                "source": {"kind": "synthetic"},
                "stages": {
                    "features": {
                        "model": args.model,
                        "device": device,
                        "batch_size": args.batch_size,
                        "decode_threads": args.decode_threads,
                    }
                },
            }
        )
        stage = FeaturesStage(m)
        ctx = StageContext(m, Storage(m.output))
        stage.setup(ctx)
        clip = stage._clip
        dev = clip.device
        print(
            f"{clip.model_id} on {dev} ({clip.dtype}), {args.images} JPEGs of {args.image_size} px "
            f"-> {clip.image_size} px, batch {args.batch_size}, {args.decode_threads} decode threads",
            flush=True,
        )
        systems = {
            "dgaug features stage": lambda: run_dgaug(stage, ctx, shard, tmp),
            "one batch at a time": lambda: run_loop(
                clip, shard, args.batch_size, m.stages.features.dtype, tmp
            ),
        }
        for fn in systems.values():  # warm-up: kernels, allocator, page cache
            fn()
        results = []
        for name, fn in systems.items():
            best, n = float("inf"), 0
            for _ in range(args.repeats):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                sync(dev)
                t0 = time.perf_counter()
                n = fn()
                sync(dev)
                best = min(best, time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
            results.append({"system": name, "images": n, "seconds": best, "peak_gib": peak})
            print(f"  {name}: {n} images in {best:.2f} s", flush=True)
    base = results[1]["images"] / results[1]["seconds"]
    for r in results:
        r["images_per_s"] = r["images"] / r["seconds"]
        r["vs_loop"] = r["images_per_s"] / base
    print()
    print(
        format_table(
            ["system", "images/s", "× loop"],
            [[r["system"], round(r["images_per_s"], 1), f"{r['vs_loop']:.2f}×"] for r in results],
        )
    )
    slug = args.model.replace(":", "-").replace("/", "_")
    out = args.out or RESULTS_DIR / f"features-{dev.type}-{slug}.json"
    write_json(
        out, {"machine": machine, "args": vars(args) | {"out": str(out)}, "results": results}
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
