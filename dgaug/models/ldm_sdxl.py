"""SDXL's conditioning: two text encoders' prompt embeddings, the pooled embedding and size ids."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from dgaug.models.errors import ModelError

# SDXL's size conditioning has six numbers: original (h, w), crop top-left (y, x), target (h, w).
# The SDXL refiner has five (an aesthetic score instead of the target size); it is refused.
TIME_IDS = 6


def is_sdxl(unet_config: Any) -> bool:
    """Whether a UNet takes SDXL's added conditioning (pooled text and size ids)."""
    return getattr(unet_config, "addition_embed_type", None) == "text_time"


def check_sdxl(model_id: str, unet: Any, text_encoder: Any, text_encoder_2: Any) -> None:
    """One line, at load time, for an SDXL folder dgaug cannot condition (a shape error in the
    first UNet call otherwise)."""
    if text_encoder_2 is None or text_encoder is None:
        raise ModelError(
            f"{model_id}'s UNet is SDXL's (added text and size conditioning) but the model has "
            "not both text encoders (text_encoder/, text_encoder_2/ and their tokenizers); an "
            "SDXL refiner (one encoder) is not supported: use an SDXL base or Turbo model"
        )
    cfg = unet.config
    want = TIME_IDS * int(cfg.addition_time_embed_dim) + int(text_encoder_2.config.projection_dim)
    if cfg.projection_class_embeddings_input_dim != want:
        raise ModelError(
            f"{model_id}'s UNet takes {cfg.projection_class_embeddings_input_dim} added-condition "
            f"features, SDXL's {TIME_IDS} size ids and pooled text give {want} (an SDXL refiner, "
            "with aesthetic-score conditioning?); use an SDXL base or Turbo model"
        )
    hidden = int(text_encoder.config.hidden_size) + int(text_encoder_2.config.hidden_size)
    if cfg.cross_attention_dim != hidden:
        raise ModelError(
            f"{model_id}'s UNet attends to {cfg.cross_attention_dim}-wide text, its two text "
            f"encoders give {hidden}"
        )


def pooled_rows(pooled_dim: int, hidden_dim: int) -> int:
    """Rows of a hidden-state-wide tensor that hold a pooled embedding (1 for every real SDXL)."""
    return math.ceil(pooled_dim / hidden_dim)


def pack(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[B, L, D] hidden states and [B, P] pooled embeddings as one [B, L + r, D] tensor, the
    pooled one zero-padded into the last r rows.

    Why one tensor: the sampler batches, indexes, repeats and concatenates a caption's
    conditioning as a tensor, for every family; SDXL's extra piece rides along as rows."""
    b, _, d = hidden.shape
    r = pooled_rows(pooled.shape[-1], d)
    rows = torch.nn.functional.pad(pooled, (0, r * d - pooled.shape[-1])).reshape(b, r, d)
    return torch.cat([hidden, rows.to(hidden.dtype)], dim=1)


def unpack(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack: (hidden states [B, L, D], pooled [B, P])."""
    b, _, d = cond.shape
    r = pooled_rows(pooled_dim, d)
    return cond[:, :-r], cond[:, -r:].reshape(b, r * d)[:, :pooled_dim]


def time_ids(height: int, width: int, rows: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's size conditioning for a generated square of height x width pixels: original size =
    target size = the generation size, crop (0, 0) (as diffusers' pipeline does by default).

    Written out rather than through the pipeline's private _get_add_time_ids: it is one row;
    the widths it checks are checked once at load time (check_sdxl)."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
    return ids.expand(rows, TIME_IDS)


def unet_kwargs(
    cond: torch.Tensor, pooled_dim: int, latent_hw: tuple[int, int], scale_factor: int
) -> dict[str, Any]:
    """The SDXL UNet's conditioning inputs for packed rows `cond`, at latents of `latent_hw`."""
    hidden, pooled = unpack(cond, pooled_dim)
    h, w = (s * scale_factor for s in latent_hw)
    ids = time_ids(h, w, cond.shape[0], cond.device, cond.dtype)
    return {
        "encoder_hidden_states": hidden,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids},
    }


def xl_pipeline(ldm: Any) -> Any:
    """A StableDiffusionXLPipeline over a loaded SDXL model's parts (no copies), for its
    encode_prompt."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=ldm.vae,
        text_encoder=ldm.text_encoder,
        text_encoder_2=ldm.text_encoder_2,
        tokenizer=ldm.tokenizer,
        tokenizer_2=ldm.tokenizer_2,
        unet=ldm.unet,
        scheduler=ldm.scheduler,
        add_watermarker=False,
    )


def encode_prompts(pipe: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    """Captions -> packed SDXL conditioning through the pipeline's encode_prompt: the
    penultimate hidden states of both encoders concatenated, the pooled projection of the
    second."""
    # The pipeline warns once per long caption that CLIP truncates it; SD's path truncates
    # silently, and web captions are often long.
    quiet = logging.getLogger(type(pipe).__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        hidden, _, pooled, _ = pipe.encode_prompt(
            captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    finally:
        quiet.setLevel(level)
    return pack(hidden, pooled)
