"""The LDM architectures written out (SD's schedule, SD-1.5, tiny) and parts with random weights."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dgaug.models.tokenizer import clip_tokenizer

# SD's noise schedule (SD-1.x/2.x scheduler_config.json, as a DDIM config).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# SD-1.5's unet/config.json, written out so benchmarks need no download. "attention_head_dim" 8 is
# really the number of heads (a naming slip diffusers keeps for SD-1.x checkpoints).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

# SD-1.5's vae/config.json.
SD15_VAE_CONFIG: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

# SD-1.5's text_encoder/config.json: the text tower of OpenAI CLIP ViT-L/14.
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# SD-2.1-base's shapes (the architecture SD-Turbo distils, 512 px, epsilon prediction): the UNet
# of SD-1.5 with per-block head widths, linear projections and 1024-wide cross-attention, and the
# text tower of OpenCLIP ViT-H/14 (23 of its 24 layers, as SD-2 uses the penultimate one).
SD21_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SD21_TEXT_CONFIG: dict[str, Any] = {
    **SD15_TEXT_CONFIG,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 512,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
}

# SDXL 1.0 base's shapes (SDXL-Turbo distils the same architecture; 1024 px native, 512 for
# Turbo): a 3-level UNet with 1/2/10 transformer layers per block, 2048-wide cross-attention (the
# two encoders' hidden states side by side), and added conditioning: 6 size ids embedded 256-wide
# each plus the 1280-wide pooled text (6 x 256 + 1280 = 2816). The VAE is SD's architecture with
# SDXL's latent scale. Text: OpenAI CLIP ViT-L/14's tower and OpenCLIP ViT-bigG/14's (with its
# projection), both with every layer (SDXL takes their penultimate hidden states).
SDXL_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 128,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
SDXL_TEXT_2_CONFIG: dict[str, Any] = {
    **SD15_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}

# Small enough that a 64 px image goes through encode, a guided UNet step and decode on CPU in
# well under a second, shaped like SD (cross-attention in the UNet, a KL VAE, a CLIP text tower).
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 32,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,  # the real CLIP vocabulary, so any caption tokenizes as it would in SD
    "hidden_size": 32,
    "intermediate_size": 37,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}


# SDXL at tiny size: SDXL's block layout and added conditioning (6 ids x 8 + 32 pooled = 80),
# two 32-wide text encoders whose hidden states make the 64-wide cross-attention.
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": 64,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
}
TINY_SDXL_TEXT_2_CONFIG: dict[str, Any] = {**TINY_TEXT_CONFIG, "hidden_act": "gelu"}


def ddim_scheduler(config: Any) -> DDIMScheduler:
    """A DDIM scheduler with `config`'s noise schedule."""
    # Always DDIM, whatever the checkpoint shipped (SD-1.5 ships PNDM): the ED-SAM sampler takes
    # its own deterministic DDIM steps from alphas_cumprod and needs DDIM's timestep layout.
    return DDIMScheduler.from_config(config)


def tiny_random_components(seed: int = 0) -> dict[str, Any]:
    """A tiny SD-shaped model with seeded random weights; keys as StableDiffusionImg2ImgPipeline's."""
    return _random_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, seed)


def sd15_shaped_random_components(seed: int = 0) -> dict[str, Any]:
    """SD-1.5's architecture (~1.07 B parameters) with random weights, for timing on a GPU."""
    return _random_components(SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG, seed)


def sd21_shaped_random_components(seed: int = 0) -> dict[str, Any]:
    """SD-2.1-base's (and SD-Turbo's) architecture with random weights, for timing on a GPU."""
    return _random_components(SD21_UNET_CONFIG, SD15_VAE_CONFIG, SD21_TEXT_CONFIG, seed)


def sdxl_shaped_random_components(seed: int = 0) -> dict[str, Any]:
    """SDXL 1.0 base's (and SDXL-Turbo's) architecture with random weights, for timing on a GPU."""
    return _random_components(
        SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, SD15_TEXT_CONFIG, seed, SDXL_TEXT_2_CONFIG
    )


def tiny_sdxl_random_components(seed: int = 0) -> dict[str, Any]:
    """A tiny SDXL-shaped model (two text encoders, added conditioning) with random weights."""
    return _random_components(
        TINY_SDXL_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, seed, TINY_SDXL_TEXT_2_CONFIG
    )


def _random_components(
    unet_cfg: dict[str, Any],
    vae_cfg: dict[str, Any],
    text_cfg: dict[str, Any],
    seed: int,
    text_2_cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    # Seed before each model so one model's config never changes another's weights, and leave the
    # caller's global RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_cfg)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        sdxl: dict[str, Any] = {}
        if text_2_cfg is not None:
            torch.manual_seed(seed)
            sdxl["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**text_2_cfg)
            ).eval()
            sdxl["tokenizer_2"] = clip_tokenizer()
    return {
        **sdxl,
        "vae": vae.eval(),
        "unet": unet.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": clip_tokenizer(),
        "scheduler": ddim_scheduler(SD_SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }
