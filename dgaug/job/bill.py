"""The bill before a run: FLOPs and bytes per sample of each stage, and the GPU-hours they imply."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgaug.models.flops import clip_flops, ldm_flops, tiny_decoder_flops

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H100 SXM bf16 dense figure, without sparsity
ASSUMED_UTILISATION = 0.5  # of that peak, where no measured rate is given
# JPEG q95 bytes per pixel of a photograph (bench/download_size.py: 76 KB for 512 x 600 px).
JPEG_Q95_BYTES_PER_PIXEL = 0.25
HALF_ALPHA_BAR_STEP = 354  # SD's schedule (transport.half_alpha_bar_step); latent start


@dataclass
class StageBill:
    """One stage's cost: samples it makes, FLOPs and bytes per sample, totals."""

    stage: str
    samples: int
    flops_per_sample: float | None  # None: the model's shapes are not known offline
    bytes_per_sample: float | None
    gpu: bool  # runs on a GPU in a real job (download and ldfs do not)
    notes: list[str] = field(default_factory=list)

    @property
    def total_flops(self) -> float | None:
        return None if self.flops_per_sample is None else self.flops_per_sample * self.samples

    @property
    def total_bytes(self) -> float | None:
        return None if self.bytes_per_sample is None else self.bytes_per_sample * self.samples


@dataclass
class Bill:
    stages: list[StageBill]
    rate_flops_per_s: float  # per GPU
    rate_source: str
    measured_edsam_rate: float | None = None  # samples/s per GPU from a bench JSON

    def gpu_hours(self, s: StageBill) -> float | None:
        if not s.gpu or s.total_flops is None:
            return None
        if s.stage == "edsam" and self.measured_edsam_rate:
            return s.samples / self.measured_edsam_rate / 3600
        return s.total_flops / self.rate_flops_per_s / 3600


def _jpeg_bytes(side: int) -> float:
    return JPEG_Q95_BYTES_PER_PIXEL * side * side


def _steps_run(start: str, steps: int) -> int:
    start_step = 999 if start == "inverted" else HALF_ALPHA_BAR_STEP
    return max(1, min(steps, start_step))


def edsam_flops(cfg: Any) -> tuple[float | None, list[str]]:
    """FLOPs per ED-SAM sample: the guided denoising steps and the decode, plus each source's
    encode, caption and (inverted) inversion shared by its M samples, plus worst's scoring."""
    # A single-file checkpoint's shapes are those of its config folder.
    parts = ldm_flops(cfg.model_config_dir or cfg.model, cfg.image_size)
    if parts is None:
        return None, [f"{cfg.model}: shapes unknown offline (no local config)"]
    m = cfg.samples_per_image
    steps = _steps_run(cfg.start, cfg.steps)
    rows = 1 if cfg.guidance == 1.0 or parts.get("guidance_embedded") else 2
    unet = parts["unet_row"]
    flops = steps * rows * unet
    notes = [f"{steps} steps x {rows} UNet rows"]
    if cfg.start == "inverted":
        flops += steps * unet / m  # one unguided inversion per source image
    flops += (parts["vae_encode"] + parts["text_encode"]) / m
    if cfg.decoder == "tiny":
        channels, scale = int(parts["latent_channels"]), int(parts["scale_factor"])
        flops += tiny_decoder_flops(channels, scale, cfg.image_size)
        notes.append("tiny decoder")
    else:
        flops += parts["vae_decode"]
    if cfg.objective == "worst":
        scale = (cfg.score_size / cfg.image_size) ** 2
        clip = clip_flops(cfg.reference_clip)
        per_candidate = unet + parts["vae_decode"] * scale + (clip["image"] if clip else 0.0)
        flops += cfg.candidates * per_candidate * (1 + 3 * cfg.refine_steps)
        notes.append(f"worst: {cfg.candidates} candidates scored")
    return flops, notes


def build_bill(
    manifest: Any, download_shards: int, plans: Collection[str], rates: str | None = None
) -> Bill:
    """The bill of the planned stages (`plans`: their names) for `download_shards` real shards
    (pairs: shards x shard_size, or the source's num_images when it has one)."""
    st = manifest.stages
    pairs = download_shards * manifest.shard_size
    num = getattr(manifest.source, "num_images", None)
    if isinstance(num, int):
        pairs = min(pairs, num)
    bills = [
        StageBill(
            "download",
            pairs,
            0.0,
            _jpeg_bytes(st.download.image_size),
            gpu=False,
            notes=["CPU and network"],
        )
    ]
    m = 0
    if "edsam" in plans:
        cfg = st.edsam
        m = cfg.samples_per_image
        flops, notes = edsam_flops(cfg)
        side = cfg.output_size or st.download.image_size
        bills.append(StageBill("edsam", pairs * m, flops, _jpeg_bytes(side), True, notes))
    if "features" in plans:
        cfg = st.features
        rows = pairs * (1 + (m if "edsam" in plans and cfg.include_edsam else 0))
        clip = clip_flops(cfg.model)
        per = None if clip is None else clip["image"] + clip["text"] * pairs / max(rows, 1)
        width = 2 if cfg.dtype == "float16" else 4
        dim = _embed_dim(cfg.model)
        nbytes = None if dim is None else 2 * dim * width + 100  # + key, caption, scores
        bills.append(StageBill("features", rows, per, nbytes, True))
    if "ldfs" in plans:
        bills.append(
            StageBill("ldfs", pairs, None, None, gpu=False, notes=["a small MLP: CPU minutes"])
        )
    rate = ASSUMED_UTILISATION * H100_BF16_DENSE_TFLOPS * 1e12
    source = f"assumed {ASSUMED_UTILISATION:.0%} of an H100's bf16 dense peak"
    measured = None
    if rates:
        measured = _measured_rate(rates)
        if measured is not None:
            source += f"; ED-SAM measured: {measured:.3g} samples/s per GPU ({rates})"
    return Bill(bills, rate, source, measured)


def _embed_dim(spec: str) -> int | None:
    from dgaug.models.flops import clip_arch

    if spec.startswith(("hf-hub:", "local-dir:")):
        return None
    arch = clip_arch(spec)
    if isinstance(arch, dict):
        return int(arch["embed_dim"])
    import open_clip

    cfg = open_clip.get_model_config(arch)
    return None if cfg is None else int(cfg["embed_dim"])


def _measured_rate(path: str) -> float | None:
    """The best dgaug row's samples/s of a bench/edsam.py JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    rows = [r for r in data.get("results", []) if str(r.get("system", "")).startswith("dgaug")]
    return max((float(r["samples_per_s"]) for r in rows), default=None)
