"""Parts attached to a loaded LDM: LoRA weights fused into its UNet, a cheap (TAESD) decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dgaug.core.constants import TINY
from dgaug.models.errors import ModelError, brief
from dgaug.models.ldm import LatentDiffusion, move_module


def _tiny_random_decoder(latent_channels: int, scale_factor: int, seed: int) -> Any:
    from diffusers import AutoencoderTiny

    ups = max(0, int(scale_factor).bit_length() - 1)  # log2 of the LDM's scale factor
    torch.manual_seed(seed)
    return AutoencoderTiny(
        latent_channels=latent_channels,
        encoder_block_out_channels=(8,) * (ups + 1),
        decoder_block_out_channels=(8,) * (ups + 1),
        num_encoder_blocks=(1,) * (ups + 1),
        num_decoder_blocks=(1,) * (ups + 1),
    )


def attach_tiny_decoder(ldm: LatentDiffusion, spec: str, seed: int = 0) -> LatentDiffusion:
    """Decode with an AutoencoderTiny (TAESD-format weights in a local diffusers folder, or
    "tiny-random") instead of the VAE's decoder; ModelError in one line if it cannot serve."""
    from diffusers import AutoencoderTiny

    if spec == TINY:
        dec = _tiny_random_decoder(ldm.latent_channels, ldm.vae_scale_factor, seed)
    else:
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(
                f"tiny_decoder {spec!r} is not a folder with an AutoencoderTiny config.json "
                "(e.g. madebyollin/taesd saved with save_pretrained)"
            )
        try:
            dec = AutoencoderTiny.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # any loader failure becomes one actionable line
            raise ModelError(f"cannot load tiny_decoder {spec!r}: {brief(exc)}") from exc
    cfg = dec.config
    scale = cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1)
    if cfg.latent_channels != ldm.latent_channels or scale != ldm.vae_scale_factor:
        raise ModelError(
            f"tiny_decoder {spec!r} decodes {cfg.latent_channels}-channel latents {scale}x up; "
            f"{ldm.model_id}'s are {ldm.latent_channels}-channel, {ldm.vae_scale_factor}x "
            "(TAESD for SD-1.x/2.x, TAESDXL for SDXL)"
        )
    dec.requires_grad_(False).eval()
    move_module(dec, ldm.device, ldm.dtype)
    ldm.tiny_decoder, ldm.tiny_decoder_id = dec, spec
    return ldm


def attach_lora(ldm: LatentDiffusion, spec: str) -> LatentDiffusion:
    """Fuse LoRA weights (e.g. LCM-LoRA) into the UNet: a local .safetensors file, or a folder
    holding pytorch_lora_weights.safetensors; diffusers reads its own and kohya-style keys.
    ModelError in one line if they cannot be used."""
    from diffusers import StableDiffusionPipeline

    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"lora {spec!r} does not exist: give a .safetensors file or its folder")
    where, kw = (path.parent, {"weight_name": path.name}) if path.is_file() else (path, {})
    try:
        # The loader mixin's public classmethods: they convert the formats in use to diffusers'.
        state, alphas = StableDiffusionPipeline.lora_state_dict(
            str(where), local_files_only=True, **kw
        )
        unet_keys = {k: v for k, v in state.items() if k.startswith("unet.")}
        if not unet_keys:
            raise ValueError("no UNet weights in it (text-encoder LoRAs are not used)")
        StableDiffusionPipeline.load_lora_into_unet(
            unet_keys, alphas, ldm.unet, adapter_name="lora"
        )
        # Fused into the weights, then the adapter layers dropped: sampling costs what it did.
        ldm.unet.fuse_lora(lora_scale=1.0)
        ldm.unet.unload_lora()
    except ModelError:
        raise
    except Exception as exc:  # any loader failure becomes one actionable line
        raise ModelError(f"cannot use lora {spec!r} with {ldm.model_id}: {brief(exc)}") from exc
    ldm.unet.requires_grad_(False).eval()
    return ldm
