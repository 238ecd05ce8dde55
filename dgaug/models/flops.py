"""FLOPs of the models a job runs, counted by PyTorch on meta tensors (no weights) and cached."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgaug.core.atomic import atomic_path
from dgaug.core.constants import TINY, TOY_LDM

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # 4: SDXL's second text encoder and added conditioning counted


def cache_file() -> Path:
    """$DGAUG_CACHE_DIR (or $XDG_CACHE_HOME/dgaug, ~/.cache/dgaug) / flops.json."""
    root = os.environ.get("DGAUG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dgaug"
    )
    return Path(root) / "flops.json"


def _load_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if data.get("version") == CACHE_VERSION else {}


def _save_cache(entries: dict[str, Any]) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}))
    except OSError as e:  # a read-only home only costs the next plan a recount
        log.info("cannot write the FLOP cache %s: %s", path, e)


def cached(key: str, count: Callable[[], dict[str, float] | None]) -> dict[str, float] | None:
    """count() once per key (an architecture and its shapes); later calls read the cache. A
    None (nothing to count offline) is not cached: the next call tries again."""
    entries = _load_cache()
    if key in entries:
        return entries[key]
    value = count()
    if value is not None:
        entries[key] = value
        _save_cache(entries)
    return value


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of fn() as PyTorch's counter sees them; attention through the math kernel so its
    matmuls are counted."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


# ------------------------------------------------------------------------------- the LDM's parts


def ldm_configs(spec: str) -> dict[str, Any] | None:
    """The UNet, VAE and text-encoder configs of an LDM spec without its weights; None when they
    are not available offline (a hub id not in the local cache)."""
    from dgaug.models import ldm_presets as presets
    from dgaug.models.toy import toy_path

    if spec == TINY:
        return {
            "unet": presets.TINY_UNET_CONFIG,
            "vae": presets.TINY_VAE_CONFIG,
            "text": presets.TINY_TEXT_CONFIG,
        }
    if spec == SD15:
        return {
            "unet": presets.SD15_UNET_CONFIG,
            "vae": presets.SD15_VAE_CONFIG,
            "text": presets.SD15_TEXT_CONFIG,
        }
    if spec in SD21_SHAPED:
        return {
            "unet": presets.SD21_UNET_CONFIG,
            "vae": presets.SD15_VAE_CONFIG,
            "text": presets.SD21_TEXT_CONFIG,
        }
    if spec in SDXL_SHAPED:
        return {
            "unet": presets.SDXL_UNET_CONFIG,
            "vae": presets.SDXL_VAE_CONFIG,
            "text": presets.SD15_TEXT_CONFIG,
            "text_2": presets.SDXL_TEXT_2_CONFIG,
        }
    folder = toy_path(spec) if spec == TOY_LDM else Path(spec).expanduser()
    try:
        if folder.is_dir():
            read = {
                k: json.loads((folder / sub / "config.json").read_text())
                for k, sub in _CONFIG_FILES
                if k != "text_2" or (folder / sub).is_dir()
            }
        else:
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextConfig

            read = {
                "unet": dict(
                    UNet2DConditionModel.load_config(spec, subfolder="unet", local_files_only=True)
                ),
                "vae": dict(
                    AutoencoderKL.load_config(spec, subfolder="vae", local_files_only=True)
                ),
                "text": CLIPTextConfig.from_pretrained(
                    spec, subfolder="text_encoder", local_files_only=True
                ).to_dict(),
            }
            if read["unet"].get("addition_embed_type") == "text_time":
                read["text_2"] = CLIPTextConfig.from_pretrained(
                    spec, subfolder="text_encoder_2", local_files_only=True
                ).to_dict()
    except Exception as e:  # not offline, or not a diffusers layout: the bill says "unknown"
        log.info("no offline config for %s: %s", spec, e)
        return None
    return {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in read.items()}


# Architectures fixed by their name: the cache key needs no config (and no torch import).
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21_SHAPED = ("stabilityai/sd-turbo", "stabilityai/stable-diffusion-2-1-base")
SDXL_SHAPED = ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/sdxl-turbo")
_NAMED_LDMS = (TINY, TOY_LDM, SD15, *SD21_SHAPED, *SDXL_SHAPED)
# A diffusers folder's config files: (key, subfolder); text_2 only in SDXL's.
_CONFIG_FILES = (
    ("unet", "unet"),
    ("vae", "vae"),
    ("text", "text_encoder"),
    ("text_2", "text_encoder_2"),
)


def _ldm_key(spec: str, image_size: int) -> str | None:
    if spec in _NAMED_LDMS:
        return json.dumps(["ldm", spec, image_size])
    folder = Path(spec).expanduser()
    if folder.is_dir():
        try:
            texts = [
                (folder / s / "config.json").read_text()
                for k, s in _CONFIG_FILES
                if k != "text_2" or (folder / s).is_dir()
            ]
        except OSError:
            return None
        return json.dumps(["ldm-config", texts, image_size])
    return json.dumps(["ldm-hub", spec, image_size])


def ldm_flops(spec: str, image_size: int) -> dict[str, float] | None:
    """FLOPs of one UNet row, one VAE encode, one VAE decode and one caption encode at batch 1
    and `image_size` (and the VAE's scale factor and latent channels); None when the model's
    configs are not available offline."""

    def count() -> dict[str, float] | None:
        configs = ldm_configs(spec)
        return None if configs is None else _count_ldm(configs, image_size)

    key = _ldm_key(spec, image_size)
    return count() if key is None else cached(key, count)


def _count_ldm(configs: dict[str, Any], image_size: int) -> dict[str, float]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"]).eval()
        vae = AutoencoderKL.from_config(configs["vae"]).eval()
        texts = [CLIPTextModel(CLIPTextConfig(**configs["text"])).eval()]
        if "text_2" in configs:
            texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_2"])).eval())
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        side = image_size // f
        x = torch.zeros(1, 3, image_size, image_size)
        z = torch.zeros(1, vae.config.latent_channels, side, side)
        length = texts[0].config.max_position_embeddings
        ids = torch.zeros(1, length, dtype=torch.long)
        cond: dict[str, Any] = {
            "encoder_hidden_states": torch.zeros(1, length, unet.config.cross_attention_dim)
        }
        if unet.config.get("addition_embed_type") == "text_time":
            # SDXL's added conditioning: the pooled text and its six size ids.
            pooled = texts[-1].config.projection_dim
            cond["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(1, pooled),
                "time_ids": torch.zeros(1, 6),
            }
        t = torch.tensor([500])
        return {
            "unet_row": count_flops(lambda: unet(z, t, **cond)),
            "vae_encode": count_flops(lambda: vae.encode(x)),
            "vae_decode": count_flops(lambda: vae.decode(z)),
            "text_encode": sum(count_flops(lambda m=m: m(ids)) for m in texts),
            "scale_factor": float(f),
            # LCM-distilled UNets take the guidance scale as an embedding: one row, never two.
            "guidance_embedded": float(bool(unet.config.get("time_cond_proj_dim"))),
            "latent_channels": float(vae.config.latent_channels),
        }


def tiny_decoder_flops(latent_channels: int, scale_factor: int, image_size: int) -> float:
    """One decode by TAESD's architecture (AutoencoderTiny's defaults) at `image_size`."""
    key = json.dumps(["taesd", latent_channels, scale_factor, image_size])

    def count() -> dict[str, float]:
        import torch
        from diffusers import AutoencoderTiny

        with torch.device("meta"):
            dec = AutoencoderTiny(latent_channels=latent_channels).eval()
            side = image_size // scale_factor
            z = torch.zeros(1, latent_channels, side, side)
            return {"decode": count_flops(lambda: dec.decode(z))}

    return cached(key, count)["decode"]


def clip_flops(spec: str) -> dict[str, float] | None:
    """FLOPs of one image and one caption through an open_clip model named by `spec` (its
    architecture: ARCH:TAG, ARCH:/path, toy-clip, tiny-random); None when unknown offline."""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return None
    key = json.dumps(["clip", spec.split(":", 1)[0]])
    return cached(key, lambda: _count_clip(clip_arch(spec)))


def clip_arch(spec: str) -> str | dict[str, Any]:
    """An open_clip architecture: its name, or the config dict of dgaug's own models."""
    if spec == TINY:
        from dgaug.models.clip_tiny import TINY_CONFIG

        return TINY_CONFIG
    if spec == "toy-clip":
        from dgaug.models.toy import toy_path

        return json.loads((toy_path(spec) / "open_clip_config.json").read_text())["model_cfg"]
    return spec.split(":", 1)[0]


def _count_clip(arch: str | dict[str, Any]) -> dict[str, float]:
    import open_clip
    import torch

    with torch.device("meta"):
        if isinstance(arch, dict):
            from open_clip.model import CLIP

            model = CLIP(**arch).eval()
        else:
            model = open_clip.create_model(arch, pretrained=None, device="meta").eval()
        size = model.visual.image_size
        side = size[0] if isinstance(size, tuple | list) else size
        image = torch.zeros(1, 3, side, side)
        ctx = getattr(model, "context_length", 77)
        text = torch.zeros(1, ctx, dtype=torch.long)
        return {
            "image": count_flops(lambda: model.encode_image(image)),
            "text": count_flops(lambda: model.encode_text(text)),
        }
