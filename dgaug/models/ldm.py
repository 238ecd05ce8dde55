"""Latent diffusion models (hub id, local folder or tiny-random) behind encode / denoise / decode."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dgaug.core.constants import TINY, TOY_LDM
from dgaug.models import ldm_sdxl
from dgaug.models.errors import ModelError
from dgaug.models.ldm_load import (
    SDXL_SUBFOLDERS,
    SMALL_UNET_BYTES,
    SUBFOLDERS,
    from_pretrained_parts,
    local_folder,
    unet_bytes,
    vae_dtype,
)
from dgaug.models.ldm_presets import (
    ddim_scheduler,
    sd15_shaped_random_components,
    tiny_random_components,
)
from dgaug.models.runtime import resolve_device
from dgaug.models.toy import toy_path

# The random-weight parts are part of this module's interface (benchmarks and tests build models
# from them); they live with the configs they are built from.
__all__ = [
    "SDXL_SUBFOLDERS",
    "SUBFOLDERS",
    "LatentDiffusion",
    "from_components",
    "load_ldm",
    "sd15_shaped_random_components",
    "tiny_random_components",
]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LatentDiffusion:
    """An LDM's parts with the few operations a sampler needs; the recipe lives in the stage."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    model_id: str
    tiny: bool
    device: torch.device
    dtype: torch.dtype
    # A cheap decoder (AutoencoderTiny, TAESD's format) used instead of the VAE's decoder.
    tiny_decoder: Any = None
    tiny_decoder_id: str | None = None
    # SDXL: the second text encoder and tokenizer; whether its unconditional row is all zeros
    # (the checkpoint's force_zeros_for_empty_prompt, true for SDXL base and Turbo).
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = True
    _xl_pipe: Any = None

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def pooled_dim(self) -> int:
        return int(self.text_encoder_2.config.projection_dim) if self.sdxl else 0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        # The scheduler's own values (float32 math) widened, so our DDIM steps match diffusers'.
        return self.scheduler.alphas_cumprod.detach().to("cpu", torch.float64).clone()

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _latent_affine(self) -> tuple[float, float]:
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None)
        return float(cfg.scaling_factor), float(shift) if shift is not None else 0.0

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,H,W] in [-1,1] -> scaled latents z0 [B,C,H/f,W/f], float32 on device."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B,3,H,W], got {tuple(pixels.shape)}")
        f = self.vae_scale_factor
        if pixels.shape[-1] % f or pixels.shape[-2] % f:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of {f}")
        x = pixels.to(self.device, self.vae.dtype)
        # The posterior mean, not a sample: the same image always gives the same z0.
        mean = self.vae.encode(x).latent_dist.mean
        scale, shift = self._latent_affine()
        return ((mean.float() - shift) * scale).contiguous()

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> text-encoder hidden states [B, L, D] in self.dtype (L = 77 for CLIP).

        SDXL: [B, L + 1, D], its pooled embedding packed as the last row (ldm_sdxl.pack)."""
        if self.sdxl:
            if self._xl_pipe is None:
                self._xl_pipe = ldm_sdxl.xl_pipeline(self)
            return ldm_sdxl.encode_prompts(self._xl_pipe, list(captions), self.device).to(
                self.dtype
            )
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        # SD conditions on all 77 positions without an attention mask; so do we.
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)

    @torch.no_grad()
    def encode_unconditional(self) -> torch.Tensor:
        """The unconditional row of classifier-free guidance, [1, L, D]: the empty caption's
        embedding, or zeros where SDXL's force_zeros_for_empty_prompt says so (diffusers' SDXL
        pipeline without a negative prompt)."""
        empty = self.encode_text([""])
        return torch.zeros_like(empty) if self.sdxl and self.force_zeros_for_empty_prompt else empty

    def _cond_kwargs(self, cond: torch.Tensor, z: torch.Tensor) -> dict[str, Any]:
        """The UNet's text inputs for rows `cond` and latents z: hidden states, and for SDXL the
        pooled embedding and size ids as added conditioning."""
        if not self.sdxl:
            return {"encoder_hidden_states": cond}
        hw = (int(z.shape[-2]), int(z.shape[-1]))
        return ldm_sdxl.unet_kwargs(cond, self.pooled_dim, hw, self.vae_scale_factor)

    def predict_noise(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor | int,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """ε_θ(z_t, t, cond), with classifier-free guidance when uncond is given; float32.

        Runs in the caller's grad mode, so a caller may backpropagate to z_t (weights are frozen).
        """
        z = z_t.to(self.device, self.dtype)
        b = z.shape[0]
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        cond = _batch(cond.to(self.device, self.dtype), b)
        proj = getattr(self.unet.config, "time_cond_proj_dim", None)
        if proj:
            # An LCM-distilled UNet takes the guidance scale as an embedding, in one row.
            w = guidance_embedding(torch.full((b,), guidance - 1.0), proj)
            w = w.to(self.device, self.dtype)
            out = self.unet(z, t, timestep_cond=w, **self._cond_kwargs(cond, z)).sample.float()
        elif uncond is None or guidance == 1.0:
            out = self.unet(z, t, **self._cond_kwargs(cond, z)).sample.float()
        else:
            uncond = _batch(uncond.to(self.device, self.dtype), b)
            # One forward over [uncond; cond]: one launch per layer instead of two.
            zz = torch.cat([z, z])
            both = self.unet(
                zz, torch.cat([t, t]), **self._cond_kwargs(torch.cat([uncond, cond]), zz)
            ).sample.float()
            out_u, out_c = both.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        if self.scheduler.config.prediction_type == "v_prediction":
            # v = √ᾱ·ε − √(1−ᾱ)·x0 (SD-2 768 px models): ε = √ᾱ·v + √(1−ᾱ)·z_t. Affine in the
            # output, so converting after guidance equals guiding the converted ε.
            ac = self.scheduler.alphas_cumprod.to(self.device)[t.long()].view(b, 1, 1, 1)
            out = ac.sqrt() * out + (1 - ac).sqrt() * z_t.to(self.device).float()
        return out

    def decode(self, z: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """Scaled latents -> pixels [B,3,H,W] float32 in [-1,1]; grad=True keeps the graph."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if self.tiny_decoder is not None:
                # TAESD decodes the UNet's (scaled) latents directly: its scaling factor is 1.
                dec = self.tiny_decoder
                x = dec.decode(z.to(self.device, next(dec.parameters()).dtype)).sample
                return x.float().clamp(-1.0, 1.0)
            scale, shift = self._latent_affine()
            x = self.vae.decode((z.to(self.device).float() / scale + shift).to(self.vae.dtype))
            return x.sample.float().clamp(-1.0, 1.0)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales w ([B]) as LCM-distilled UNets take it
    (`timestep_cond`; the LCM paper's w-conditioning, scaled by 1000). Written out because
    diffusers keeps it as a method of its LCM pipeline, which dgaug does not build."""
    half = dim // 2
    # In this order, in float32: the angles reach thousands of radians, where a rounding
    # difference would move the sines.
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def _batch(x: torch.Tensor, b: int) -> torch.Tensor:
    # A single (e.g. empty-caption) embedding serves the whole batch.
    if x.shape[0] == b:
        return x
    if x.shape[0] == 1:
        return x.expand(b, *x.shape[1:])
    raise ValueError(f"conditioning batch {x.shape[0]} does not match latent batch {b}")


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _check_supported(
    model_id: str,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler: DDIMScheduler,
    text_encoder: CLIPTextModel | None = None,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
) -> None:
    # Caught here, in one line, rather than as a shape error deep in the first UNet call.
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ModelError(
            f"{model_id} predicts {kind!r}; only epsilon and v_prediction models are supported"
        )
    cfg = unet.config
    if cfg.in_channels != vae.config.latent_channels:
        raise ModelError(
            f"{model_id}'s UNet takes {cfg.in_channels} channels, its VAE gives "
            f"{vae.config.latent_channels} (an inpainting model?); use a text-to-image model"
        )
    if ldm_sdxl.is_sdxl(cfg):
        ldm_sdxl.check_sdxl(model_id, unet, text_encoder, text_encoder_2)
    elif cfg.addition_embed_type is not None or cfg.class_embed_type is not None:
        raise ModelError(
            f"{model_id}'s UNet needs extra conditioning ({cfg.addition_embed_type or 'class'} "
            "embeddings) dgaug does not build; use an SD-1.x/2.x or SDXL model"
        )


def move_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    module.to(device)
    # Cast only when needed: diffusers warns on every dtype cast through .to(), even a no-op one.
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def from_components(
    components: dict[str, Any],
    *,
    model_id: str,
    tiny: bool,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    compile: bool = False,
) -> LatentDiffusion:
    """Wrap already-built parts (e.g. sd15_shaped_random_components()) as a LatentDiffusion."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else _resolve_dtype(dtype, dev)
    vae: AutoencoderKL = components["vae"]
    unet: UNet2DConditionModel = components["unet"]
    text_encoder: CLIPTextModel = components["text_encoder"]
    text_encoder_2 = components.get("text_encoder_2")
    scheduler = components["scheduler"]
    if not isinstance(scheduler, DDIMScheduler):
        scheduler = ddim_scheduler(scheduler.config)
    _check_supported(model_id, unet, vae, scheduler, text_encoder, text_encoder_2)
    encoders = [m for m in (text_encoder, text_encoder_2) if m is not None]
    # Frozen: a caller that backpropagates to z_t must not build gradients for the weights.
    for m in (vae, unet, *encoders):
        m.requires_grad_(False).eval()
    move_module(vae, dev, vae_dtype(dt, bool(getattr(vae.config, "force_upcast", True))))
    move_module(unet, dev, dt)
    for m in encoders:
        move_module(m, dev, dt)
    # PyTorch's fused scaled-dot-product attention (flash / memory-efficient kernels on CUDA).
    # set_default_attn_processor() would pick the unfused AttnProcessor, so set it explicitly.
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    if dev.type == "cuda":
        # cuDNN's convolutions are faster in NHWC on tensor cores; inputs need not be converted.
        unet.to(memory_format=torch.channels_last)
    ldm = LatentDiffusion(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=components["tokenizer"],
        scheduler=scheduler,
        model_id=model_id,
        tiny=tiny,
        device=dev,
        dtype=dt,
        text_encoder_2=text_encoder_2,
        tokenizer_2=components.get("tokenizer_2"),
        force_zeros_for_empty_prompt=bool(components.get("force_zeros_for_empty_prompt", True)),
    )
    if compile:
        compile_ldm(ldm)
    return ldm


def compile_ldm(ldm: LatentDiffusion) -> None:
    """torch.compile the UNet and the VAE's decoder, in place (module.compile), so the parts keep
    their classes and configs. No CUDA graphs: batch shapes vary at the end of a shard and graphs
    would pin memory per shape."""
    mode = "max-autotune-no-cudagraphs" if ldm.device.type == "cuda" else None
    ldm.unet.compile(mode=mode)
    ldm.vae.decoder.compile(mode=mode)


def load_ldm(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    allow_large_on_cpu: bool = False,
    seed: int = 0,
    config: str | None = None,
) -> LatentDiffusion:
    """Load "tiny-random", "toy-ldm" (the shipped toy model), a hub id, a local diffusers folder,
    or a single-file .safetensors checkpoint (`config`: a local diffusers folder of its
    architecture); ModelError in one line if not."""
    dev = resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    if spec == TINY:
        parts = tiny_random_components(seed)
        return from_components(
            parts, model_id=spec, tiny=True, device=dev, dtype=dt, compile=compile
        )
    from dgaug.models import ldm_single_file as single

    if single.is_single_file(spec):
        path, _ = single.check_single_file(spec, config)
        if dev.type == "cpu" and not allow_large_on_cpu and path.stat().st_size > SMALL_UNET_BYTES:
            raise ModelError(
                f"{spec} is a full-size model; on CPU it would take hours per shard. "
                "Use a GPU, or set allow_cpu: true to run it anyway"
            )
        log.info("loading single-file %s on %s as %s", spec, dev, dt)
        parts = single.single_file_components(spec, config, dt)
        return from_components(
            parts, model_id=spec, tiny=False, device=dev, dtype=dt, compile=compile
        )
    toy = spec == TOY_LDM
    local = toy_path(spec) if toy else local_folder(spec)
    # A model of a few MB (the toy LDM, or another small folder) runs in seconds per shard on a
    # CPU, as the demo does; a full-size one would take hours.
    # No weights to measure (an unknown layout) counts as full size.
    small = toy or (local is not None and 0 < unet_bytes(local) <= SMALL_UNET_BYTES)
    if dev.type == "cpu" and not allow_large_on_cpu and not small:
        raise ModelError(
            f"{spec} is a full-size model; on CPU it would take hours per shard. "
            "Use a GPU, or set allow_cpu: true to run it anyway"
        )
    log.info("loading %s on %s as %s", spec, dev, dt)
    parts = from_pretrained_parts(spec, dt, local)
    return from_components(parts, model_id=spec, tiny=False, device=dev, dtype=dt, compile=compile)
