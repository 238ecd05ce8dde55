"""ED-SAM throughput: dgaug's batched sampler against a per-image StableDiffusionImg2ImgPipeline loop.

Both run in the same process on the same modules (same weights, device, dtype, attention kernels),
at the same resolution, steps, guidance and samples per image; a counting pass first checks that
they do the same UNet and VAE work. Reported per system: samples/s, peak memory, and, with the
UNet/VAE FLOPs counted for this configuration, the fraction of the FLOP-bound rate that the
device's measured dense matmul rate allows (bf16 on a GPU, float32 on a CPU).

    python bench/edsam.py                              # CPU: tiny-random models, 64 px
    python bench/edsam.py --device cuda --model sd15   # GPU: SD-1.5-shaped random weights, 512 px
    python bench/edsam.py --device cuda --model sdxl   # GPU: SDXL-shaped, 1024 px (no img2img)
    python bench/edsam.py --recipe fast-xl --model tiny-xl --image-size 64   # CPU smoke of SDXL
    bash bench/edsam_gpu.sh                            # the whole GPU measurement in one call

Random weights: the time of a forward pass does not depend on the values of the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
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

# METHODS.md section 3, batch 1 at 512 px, SD-1.5 shapes: a cross-check of the counted FLOPs.
METHODS_TFLOP_512 = {"unet": 0.80, "vae_encode": 1.12, "vae_decode": 2.51}
PACKAGES = ("dgaug", "torch", "diffusers", "transformers", "numpy")


# -- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory of the block in GiB: allocated on a GPU, resident set (sampled) on a CPU."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        sync(device)
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        return
    peak = [_rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_bytes())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak_gib"] = max(peak[0], _rss_bytes()) / 2**30


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's dense matmul rate, TFLOP/s: the ceiling a FLOP-bound sampler can reach."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, best = (20 if device.type == "cuda" else 5), float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of fn() as PyTorch's counter sees them; attention through the math kernel so its
    matmuls are counted on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


class WorkCounter:
    """Counts UNet calls and rows and VAE encodes and decodes (rows), through forward hooks."""

    def __init__(self, unet: torch.nn.Module, vae: Any):
        self.counts = {"unet_calls": 0, "unet_rows": 0, "vae_encode_rows": 0, "vae_decode_rows": 0}
        self._handles = [unet.register_forward_pre_hook(self._unet)]
        self._vae = vae
        self._encode, self._decode = vae.encode, vae.decode

        def encode(x, *a, **k):
            self.counts["vae_encode_rows"] += x.shape[0]
            return self._encode(x, *a, **k)

        def decode(z, *a, **k):
            self.counts["vae_decode_rows"] += z.shape[0]
            return self._decode(z, *a, **k)

        vae.encode, vae.decode = encode, decode

    def _unet(self, module: Any, args: tuple) -> None:
        self.counts["unet_calls"] += 1
        self.counts["unet_rows"] += args[0].shape[0]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        del self._vae.encode, self._vae.decode  # back to the class's methods


# -- the two systems
def source_images(n: int, size: int, seed: int = 0) -> list[Any]:
    """n RGB images with structure at several scales (content does not change the timing)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        noise = rng.integers(-20, 21, (size, size, 3))
        out.append(Image.fromarray(np.clip(np.asarray(im) + noise, 0, 255).astype(np.uint8)))
    return out


def to_pixels(images: list[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


CAPTIONS = [
    "a photo of a red bicycle leaning on a wall",
    "a sketch of a lighthouse on a rocky coast",
    "a painting of two dogs running in a field",
    "a cartoon of a cat sitting on a stack of books",
]


def edsam_config(ldm: Any, args: argparse.Namespace, batch: int) -> Any:
    """The stage's config for this run's settings."""
    from dgaug.stages.edsam.config import EdsamConfig

    return EdsamConfig(
        model=ldm.model_id,
        samples_per_image=args.samples,
        start=args.start,
        sampler=args.sampler,
        decoder=args.decoder,
        tiny_decoder="taesd-random" if args.decoder == "tiny" else None,
        steps=args.steps,
        guidance=args.guidance,
        image_size=args.image_size,
        batch_size=batch,
        source_batch=args.source_batch,
    )


def dgaug_run(ldm: Any, args: argparse.Namespace, batch: int, images: list[Any]) -> int:
    """dgaug's sampler as the stage calls it: source_batch images at a time, M samples each."""
    from dgaug.stages.edsam.sampler import EdsamSampler

    sampler = EdsamSampler(ldm, edsam_config(ldm, args, batch), seed=0)
    made = 0
    for i in range(0, len(images), args.source_batch):
        part = images[i : i + args.source_batch]
        caps = [CAPTIONS[(i + k) % len(CAPTIONS)] for k in range(len(part))]
        keys = [f"{i + k:010d}" for k in range(len(part))]
        made += len(sampler.generate(to_pixels(part), caps, keys))
    sync(ldm.device)
    return made


def bytes_per_sample(ldm: Any, args: argparse.Namespace, images: list[Any]) -> dict[str, Any]:
    """The JPEG bytes of a sample as the stage writes it (output size, quality) beside those of
    its source written the same way at its own size."""
    from dgaug.stages.edsam.io import encode_jpeg
    from dgaug.stages.edsam.sampler import EdsamSampler

    cfg = edsam_config(ldm, args, args.batch_sizes[0])
    made = EdsamSampler(ldm, cfg, seed=0).generate(
        to_pixels(images), CAPTIONS[: len(images)], [f"{k:010d}" for k in range(len(images))]
    )
    side = args.output_size or args.image_size
    sample = [len(encode_jpeg(g.image, args.jpeg_quality, side)) for g in made]
    source = [len(encode_jpeg(np.asarray(im.convert("RGB")), args.jpeg_quality)) for im in images]
    return {
        "side": side,
        "bytes_per_sample": sum(sample) / len(sample),
        "source_bytes_per_image": sum(source) / len(source),
    }


def img2img_pipeline(ldm: Any) -> Any:
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(
        vae=ldm.vae,
        unet=ldm.unet,
        text_encoder=ldm.text_encoder,
        tokenizer=ldm.tokenizer,
        scheduler=ldm.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img_schedule(start_step: int, steps: int) -> tuple[int, float]:
    """(num_inference_steps, strength) that make img2img take exactly `steps` denoising steps,
    starting near `start_step` as dgaug does."""
    total = max(steps, round(steps * 1000 / (start_step + 1)))
    return total, min(1.0, (steps + 0.5) / total)  # the pipeline takes int(total * strength)


def img2img_run(pipe: Any, ldm: Any, args: argparse.Namespace, images: list[Any]) -> int:
    """The usual augmentation loop (DA-Fusion, ALIA): one pipeline call per image and sample."""
    from dgaug.stages.edsam.transport import half_alpha_bar_step

    total, strength = img2img_schedule(half_alpha_bar_step(ldm.alphas_cumprod), args.steps)
    made = 0
    for i, im in enumerate(images):
        for j in range(args.samples):
            out = pipe(
                CAPTIONS[i % len(CAPTIONS)],
                image=im,
                strength=strength,
                num_inference_steps=total,
                guidance_scale=args.guidance,
                generator=torch.Generator(ldm.device).manual_seed(1000 * i + j),
                output_type="np",
            ).images
            made += len(out)
    sync(ldm.device)
    return made


# -- the benchmark
def build_ldm(args: argparse.Namespace) -> Any:
    from dgaug.models.ldm import (
        from_components,
        sd15_shaped_random_components,
        tiny_random_components,
    )
    from dgaug.models.ldm_presets import (
        sd21_shaped_random_components,
        sdxl_shaped_random_components,
        tiny_sdxl_random_components,
    )

    make = {
        "sd15": sd15_shaped_random_components,
        "sd21": sd21_shaped_random_components,
        "sdxl": sdxl_shaped_random_components,
        "tiny": tiny_random_components,
        "tiny-xl": tiny_sdxl_random_components,
    }[args.model]
    ldm = from_components(
        make(0),
        model_id=f"{args.model}-random",
        tiny=args.model in TINY_MODELS,
        device=args.device,
        dtype=args.dtype,
    )
    if args.decoder == "tiny":
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        # TAESD's architecture (AutoencoderTiny's defaults) with random weights; the tiny model's
        # 2x VAE gets the same blocks with one upsampling.
        blocks = (
            {}
            if args.model not in TINY_MODELS
            else {
                "encoder_block_out_channels": (64, 64),
                "decoder_block_out_channels": (64, 64),
                "num_encoder_blocks": (1, 3),
                "num_decoder_blocks": (3, 1),
            }
        )
        dec = AutoencoderTiny(latent_channels=ldm.latent_channels, **blocks).eval()
        ldm.tiny_decoder = dec.requires_grad_(False).to(ldm.device, ldm.dtype)
        ldm.tiny_decoder_id = "taesd-random"
    return ldm


def flops_per_sample(ldm: Any, args: argparse.Namespace) -> dict[str, float]:
    """UNet, encode and decode FLOPs at batch 1 for this configuration, and per ED-SAM sample."""
    f, s = ldm.vae_scale_factor, args.image_size
    x = torch.zeros(1, 3, s, s, device=ldm.device, dtype=ldm.vae.dtype)
    z = torch.zeros(1, ldm.latent_channels, s // f, s // f, device=ldm.device, dtype=ldm.dtype)
    c = ldm.encode_text(["a photo"])
    t = torch.tensor([500], device=ldm.device)
    # One unguided row through the LDM's own call: SDXL's added conditioning included.
    unet = count_flops(lambda: ldm.predict_noise(z, t, c))
    enc = count_flops(lambda: ldm.vae.encode(x))
    dec = count_flops(lambda: ldm.decode(z))  # the tiny decoder when attached
    rows = 2 if args.guidance != 1.0 else 1
    per_sample = args.steps * rows * unet + dec + enc / args.samples
    if args.start == "inverted":
        per_sample += args.steps * unet / args.samples  # one unguided inversion per source
    return {"unet": unet, "vae_encode": enc, "vae_decode": dec, "per_sample": per_sample}


def measure(name: str, fn: Callable[[], int], device: torch.device, repeats: int) -> dict:
    """Best of `repeats` timed calls (after the caller's warm-up), with the peak memory."""
    best, peak, made = float("inf"), {}, 0
    for _ in range(repeats):
        with peak_memory(device) as mem:
            t0 = time.perf_counter()
            made = fn()
            dt = time.perf_counter() - t0
        best = min(best, dt)
        peak = {k: max(v, peak.get(k, 0.0)) for k, v in mem.items()}
    print(f"  {name}: {made} samples in {best:.2f} s", flush=True)
    return {"system": name, "samples": made, "seconds": best, "samples_per_s": made / best, **peak}


TINY_MODELS = ("tiny", "tiny-xl")

# The README's recipes (SD-1.5 / SD-Turbo / SDXL shapes with random weights: the work, not the
# pixels). paper-xl is the paper recipe on SDXL at its native 1024 px; fast-xl the fast recipe on
# SDXL-Turbo's shapes at 512 px (the size Turbo was distilled at). A flag given with --recipe
# overrides the recipe's value.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"model": "sd15", "start": "inverted", "sampler": "ddim", "steps": 20,
              "guidance": 5.0, "decoder": "vae"},
    "balanced": {"model": "sd15", "start": "inverted", "sampler": "dpmpp_2m", "steps": 10,
                 "guidance": 3.0, "decoder": "vae"},
    "fast": {"model": "sd21", "start": "inverted", "sampler": "ddim", "steps": 2,
             "guidance": 1.0, "decoder": "tiny"},
    "paper-xl": {"model": "sdxl", "image_size": 1024, "start": "inverted", "sampler": "ddim",
                 "steps": 20, "guidance": 5.0, "decoder": "vae"},
    "fast-xl": {"model": "sdxl", "image_size": 512, "start": "inverted", "sampler": "ddim",
                "steps": 2, "guidance": 1.0, "decoder": "tiny"},
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--model",
        choices=["tiny", "tiny-xl", "sd15", "sd21", "sdxl"],
        help="default: sd15 on cuda, tiny on cpu; sd21: SD-2.1-base / SD-Turbo shapes; sdxl: "
        "SDXL / SDXL-Turbo shapes; tiny-xl: a tiny SDXL (CPU smoke)",
    )
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        help="the README's recipes: sets model, start, sampler, steps, guidance and decoder",
    )
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpmpp_2m", "euler", "lcm"])
    p.add_argument("--decoder", default="vae", choices=["vae", "tiny"], help="tiny: TAESD's shapes")
    p.add_argument("--no-baseline", action="store_true", help="skip diffusers' img2img loop")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--image-size", type=int, help="default: 1024 for sdxl, 512 for sd15/sd21, 64 for tiny"
    )
    p.add_argument("--images", type=int, default=8, help="source images per timed run")
    p.add_argument("--samples", type=int, default=10, help="M, samples per source image")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument(
        "--batch-sizes", default="8", help="dgaug batch_size values, comma-separated; 8 is default"
    )
    p.add_argument("--source-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per system; best is kept")
    p.add_argument("--baseline-images", type=int, help="images for the img2img loop (default all)")
    p.add_argument("--compile", action="store_true", help="also time dgaug with torch.compile")
    p.add_argument(
        "--output-size", type=int, help="side of the written samples (default: the image size)"
    )
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument(
        "--start",
        default="latent",
        choices=["latent", "inverted"],
        help="latent (default here): the same work as diffusers' img2img, the comparison; "
        "inverted (the stage's default) adds one unguided inversion pass per source image",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="JSON result (default bench/results/edsam-DEVICE.json)")
    recipe = p.parse_known_args(argv)[0].recipe
    if recipe:  # the recipe's values as defaults: a flag given beside it wins
        p.set_defaults(**RECIPES[recipe])
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.model = args.model or ("sd15" if args.device == "cuda" else "tiny")
    default_size = {"sdxl": 1024, "sd15": 512, "sd21": 512}
    args.image_size = args.image_size or default_size.get(args.model, 64)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe_machine(PACKAGES)
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    print(
        f"machine: {machine_line(machine)}{', ' + machine.get('gpu', '') if 'gpu' in machine else ''}"
    )
    torch.manual_seed(0)
    ldm = build_ldm(args)
    device = ldm.device
    print(
        f"model {ldm.model_id} on {device} ({ldm.dtype}), {args.image_size} px, M={args.samples}, "
        f"{args.steps} steps, guidance {args.guidance}, {args.images} source images",
        flush=True,
    )
    rate_dtype = ldm.dtype if device.type == "cuda" else torch.float32
    tflops = matmul_tflops(device, rate_dtype)
    flops = flops_per_sample(ldm, args)
    bound = tflops * 1e12 / flops["per_sample"]  # samples/s if every FLOP ran at the matmul rate
    print(
        f"matmul rate {tflops:.1f} TFLOP/s ({rate_dtype}); per sample {flops['per_sample'] / 1e12:.3f}"
        f" TFLOP -> FLOP-bound rate {bound:.2f} samples/s",
        flush=True,
    )

    images = source_images(args.images, args.image_size)
    base_images = images[: args.baseline_images or args.images]
    # diffusers' img2img loop is the like-for-like baseline of the latent start, DDIM, VAE decode.
    # SDXL has no like-for-like loop here (its img2img pipeline adds its own conditioning).
    baseline = (
        not args.no_baseline and args.sampler == "ddim" and args.decoder == "vae" and not ldm.sdxl
    )
    pipe = img2img_pipeline(ldm) if baseline else None

    # The same work: count UNet rows and VAE rows of one source image through both systems.
    work = {}
    systems = [("dgaug", lambda: dgaug_run(ldm, args, args.batch_sizes[0], images[:1]))]
    if baseline:
        systems.append(("img2img", lambda: img2img_run(pipe, ldm, args, images[:1])))
    for name, fn in systems:
        wc = WorkCounter(ldm.unet, ldm.vae)
        try:
            fn()  # also the warm-up of each system
        finally:
            wc.close()
        work[name] = wc.counts
    print(f"work per source image: {work}", flush=True)

    results = []
    for b in args.batch_sizes:
        dgaug_run(ldm, args, b, images[: max(1, math.ceil(b / args.samples))])  # warm this shape
        results.append(
            {
                **measure(
                    f"dgaug batch {b}",
                    lambda b=b: dgaug_run(ldm, args, b, images),
                    device,
                    args.repeats,
                ),
                "batch_size": b,
            }
        )
    base = None
    if baseline:
        base = measure(
            "img2img loop", lambda: img2img_run(pipe, ldm, args, base_images), device, args.repeats
        )
        results.append({**base, "batch_size": 1})
    if args.compile:
        from dgaug.models.ldm import compile_ldm

        compile_ldm(ldm)
        b = args.batch_sizes[0]
        dgaug_run(ldm, args, b, images)  # compile every shape the timed run meets
        results.append(
            {
                **measure(
                    f"dgaug batch {b}, compiled",
                    lambda: dgaug_run(ldm, args, b, images),
                    device,
                    args.repeats,
                ),
                "batch_size": b,
            }
        )

    for r in results:
        r["vs_img2img"] = r["samples_per_s"] / base["samples_per_s"] if base else None
        r["fraction_of_flop_bound"] = r["samples_per_s"] / bound
    headers = ["system", "samples/s", "× img2img loop", "of FLOP-bound", "peak GiB"]
    rows = [
        [
            r["system"],
            round(r["samples_per_s"], 3),
            "–" if r["vs_img2img"] is None else f"{r['vs_img2img']:.2f}×",
            f"{100 * r['fraction_of_flop_bound']:.1f}%",
            round(r.get("peak_gib", float("nan")), 2),
        ]
        for r in results
    ]
    print()
    print(format_table(headers, rows))
    ref = ""
    if args.model == "sd15" and args.image_size == 512:
        ref = ", METHODS.md: " + ", ".join(f"{k} {v}" for k, v in METHODS_TFLOP_512.items())
    print(
        "\ncounted TFLOP at batch 1: "
        + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in flops.items())
        + ref
    )
    written = bytes_per_sample(ldm, args, images[:2])
    print(
        f"bytes per sample as written ({written['side']} px, q{args.jpeg_quality}): "
        f"{written['bytes_per_sample']:.0f}; per source image at its size: "
        f"{written['source_bytes_per_image']:.0f}"
        + (" (random weights: noise, an upper bound)" if args.model != "toy" else "")
    )
    out = args.out or RESULTS_DIR / f"edsam-{device.type}-{args.model}.json"
    write_json(
        out,
        {
            "machine": machine,
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "device": str(device),
            "dtype": str(ldm.dtype),
            "matmul_tflops": tflops,
            "flops": flops,
            "flop_bound_samples_per_s": bound,
            "work_per_source_image": work,
            "results": results,
            "written": written,
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
