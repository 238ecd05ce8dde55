"""The LDM families a user points `model:` at, each as a tiny random model saved in diffusers'
layout to a local folder and loaded by path through the stage's own loader, then sampled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dgaug.models.errors import ModelError
from dgaug.models.ldm import SDXL_SUBFOLDERS, SUBFOLDERS, load_ldm
from dgaug.models.ldm_presets import (
    SD_SCHEDULER_CONFIG,
    TINY_SDXL_TEXT_2_CONFIG,
    TINY_SDXL_UNET_CONFIG,
    TINY_TEXT_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
)
from dgaug.models.tokenizer import clip_tokenizer
from dgaug.stages.edsam.config import EdsamConfig
from dgaug.stages.edsam.sampler import EdsamSampler

# SD-2.x's differences from SD-1.x, at tiny size: per-block head widths, linear projections in
# the transformers, a GELU text tower (OpenCLIP's); SD-Turbo is SD-2.1 with a trailing schedule.
SD2_UNET = {**TINY_UNET_CONFIG, "attention_head_dim": (2, 4), "use_linear_projection": True}
SD2_TEXT = {**TINY_TEXT_CONFIG, "hidden_act": "gelu"}
FAMILIES: dict[str, dict[str, Any]] = {
    "sd1 (epsilon)": {
        "unet": TINY_UNET_CONFIG,
        "text": TINY_TEXT_CONFIG,
        "scheduler": DDIMScheduler,
    },
    "sd2 (epsilon)": {"unet": SD2_UNET, "text": SD2_TEXT, "scheduler": DDIMScheduler},
    "sd2 (v-prediction)": {
        "unet": SD2_UNET,
        "text": SD2_TEXT,
        "scheduler": DDIMScheduler,
        "prediction_type": "v_prediction",
    },
    "sd-turbo": {
        "unet": SD2_UNET,
        "text": SD2_TEXT,
        "scheduler": EulerDiscreteScheduler,
        "timestep_spacing": "trailing",
    },
    # LCM-distilled: the UNet embeds the guidance scale (time_cond_proj_dim), no CFG rows.
    "lcm": {
        "unet": {**TINY_UNET_CONFIG, "time_cond_proj_dim": 16},
        "text": TINY_TEXT_CONFIG,
        "scheduler": LCMScheduler,
    },
    # SDXL: two text encoders (the second with a projection: the pooled embedding) and a UNet
    # with added conditioning (pooled text and size ids); SDXL-Turbo samples it trailing, no CFG.
    "sdxl": {
        "unet": TINY_SDXL_UNET_CONFIG,
        "text": TINY_TEXT_CONFIG,
        "text_2": TINY_SDXL_TEXT_2_CONFIG,
        "scheduler": EulerDiscreteScheduler,
    },
    "sdxl-turbo": {
        "unet": TINY_SDXL_UNET_CONFIG,
        "text": TINY_TEXT_CONFIG,
        "text_2": TINY_SDXL_TEXT_2_CONFIG,
        "scheduler": EulerDiscreteScheduler,
        "timestep_spacing": "trailing",
    },
}
RECIPES = {  # how each family is meant to be sampled
    "sd1 (epsilon)": {"sampler": "ddim", "steps": 4, "guidance": 5.0},
    "sd2 (epsilon)": {"sampler": "dpmpp_2m", "steps": 4, "guidance": 5.0},
    "sd2 (v-prediction)": {"sampler": "euler", "steps": 4, "guidance": 5.0},
    "sd-turbo": {"sampler": "ddim", "steps": 1, "guidance": 1.0},
    "lcm": {"sampler": "lcm", "steps": 2, "guidance": 8.0},
    "sdxl": {"sampler": "euler", "steps": 3, "guidance": 5.0},
    "sdxl-turbo": {"sampler": "ddim", "steps": 1, "guidance": 1.0},
}


def save_family(folder: Path, family: str, seed: int = 0) -> Path:
    spec = FAMILIES[family]
    extra = {k: v for k, v in spec.items() if k in ("prediction_type", "timestep_spacing")}
    torch.manual_seed(seed)
    parts = {
        "unet": UNet2DConditionModel(**spec["unet"]),
        "vae": AutoencoderKL(**TINY_VAE_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**spec["text"])),
        "tokenizer": clip_tokenizer(),
        "scheduler": spec["scheduler"].from_config(SD_SCHEDULER_CONFIG, **extra),
    }
    names = SUBFOLDERS
    if "text_2" in spec:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_2"]))
        parts["tokenizer_2"] = clip_tokenizer()
        names += SDXL_SUBFOLDERS
    for name in names:
        parts[name].save_pretrained(folder / name)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_loads_from_a_folder_and_samples(tmp_path: Path, family: str) -> None:
    folder = save_family(tmp_path / "model", family)
    ldm = load_ldm(str(folder), device="cpu")
    cfg = EdsamConfig(model=str(folder), samples_per_image=2, image_size=32, **RECIPES[family])
    made = EdsamSampler(ldm, cfg, seed=0).generate(
        torch.zeros(1, 3, 32, 32), ["a photo of a circle"], ["0000000000"]
    )
    assert [g.image.shape for g in made] == [(32, 32, 3)] * 2
    assert made[0].record["sampler"] == cfg.sampler and made[0].record["model"] == str(folder)
    again = EdsamSampler(ldm, cfg, seed=0).generate(
        torch.zeros(1, 3, 32, 32), ["a photo of a circle"], ["0000000000"]
    )
    assert all((a.image == b.image).all() for a, b in zip(made, again, strict=True))


def test_an_lcm_unet_is_guided_by_its_embedding_in_one_row(tmp_path: Path) -> None:
    """time_cond_proj_dim: one UNet row per step whatever the guidance, and the guidance scale
    changes the prediction through the embedding."""
    ldm = load_ldm(str(save_family(tmp_path / "lcm", "lcm")), device="cpu")
    rows: list[int] = []
    hook = ldm.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = ldm.encode_text(["a", "b"]), ldm.encode_text([""])
    with torch.inference_mode():
        low = ldm.predict_noise(z, 500, cond, uncond, guidance=2.0)
        high = ldm.predict_noise(z, 500, cond, uncond, guidance=8.0)
    hook.remove()
    assert rows == [2, 2]
    assert not torch.allclose(low, high)


@pytest.mark.slow  # three model loads and a PEFT adapter
def test_a_lora_is_fused_into_the_unet_as_peft_applies_it(tmp_path: Path) -> None:
    """`lora:` (e.g. LCM-LoRA): weights saved by diffusers' LoRA saver load from the folder or
    the file, fused: the UNet then predicts what the adapted UNet does, not the base one."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dgaug.models.ldm_addons import attach_lora

    folder = save_family(tmp_path / "sd1", "sd1 (epsilon)")
    adapted = load_ldm(str(folder), device="cpu")
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    adapted.unet.add_adapter(lora)
    g = torch.Generator().manual_seed(1)
    for name, p in adapted.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    weights = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(
        str(weights), unet_lora_layers=get_peft_model_state_dict(adapted.unet)
    )
    z = torch.randn(1, 4, 16, 16, generator=g)
    cond = adapted.encode_text(["a photo of a circle"])
    with torch.inference_mode():
        want = adapted.predict_noise(z, 500, cond)
    for spec in (weights, weights / "pytorch_lora_weights.safetensors"):
        ldm = attach_lora(load_ldm(str(folder), device="cpu"), str(spec))
        with torch.inference_mode():
            got = ldm.predict_noise(z, 500, cond)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert not any("lora" in n for n, _ in ldm.unet.named_parameters())  # fused, unloaded
    base = load_ldm(str(folder), device="cpu")
    with torch.inference_mode():
        assert not torch.allclose(base.predict_noise(z, 500, cond), want, atol=1e-3)

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot use lora") as e:
        attach_lora(base, str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="does not exist"):
        attach_lora(base, str(tmp_path / "missing"))
