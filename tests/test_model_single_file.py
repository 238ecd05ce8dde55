"""Single-file .safetensors checkpoints (the original LDM key layout users download): a tiny
random SD-1.x written in that layout loads by path through diffusers' from_single_file, offline,
with exactly its source's weights; what cannot work is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from dgaug.models.errors import ModelError
from dgaug.models.ldm import load_ldm
from dgaug.models.ldm_presets import tiny_random_components
from dgaug.stages.edsam.config import EdsamConfig
from dgaug.stages.edsam.sampler import EdsamSampler
from tests.ldm_checkpoint import write_sd1_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(the single file, a diffusers folder of the same architecture, the source parts)."""
    from diffusers import StableDiffusionPipeline

    tmp = tmp_path_factory.mktemp("single")
    parts = tiny_random_components(seed=3)
    pipe = StableDiffusionPipeline(
        **{k: v for k, v in parts.items() if k != "image_encoder"}, requires_safety_checker=False
    )
    pipe.save_pretrained(tmp / "config")
    return write_sd1_checkpoint(parts, tmp / "model.safetensors"), tmp / "config", parts


def test_a_single_file_loads_with_its_sources_weights_and_samples(checkpoint) -> None:
    path, config, parts = checkpoint
    ldm = load_ldm(str(path), device="cpu", config=str(config))
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(ldm, name).state_dict(), parts[name].state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    cfg = EdsamConfig(
        model=str(path), model_config_dir=str(config), samples_per_image=1, image_size=32, steps=2
    )
    made = EdsamSampler(ldm, cfg, seed=0).generate(
        torch.zeros(1, 3, 32, 32), ["a photo of a circle"], ["0000000000"]
    )
    assert made[0].image.shape == (32, 32, 3) and made[0].record["model"] == str(path)


def test_what_cannot_load_is_one_line(checkpoint, tmp_path: Path, monkeypatch) -> None:
    path, config, _ = checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yaml = tmp_path / "v1-inference.yaml"
    yaml.write_text("model: {}\n")
    cases = [
        (str(tmp_path / "missing.safetensors"), None, "does not exist"),
        (str(path), str(yaml), "original .yaml"),
        (str(path), str(tmp_path), "model_index.json"),
        # No config folder and no hub: diffusers cannot know the parts' configs.
        (str(path), None, "model_config"),
    ]
    for spec, cfg, match in cases:
        with pytest.raises(ModelError, match=match) as e:
            load_ldm(spec, device="cpu", config=cfg)
        assert "\n" not in str(e.value), str(e.value)


def test_the_manifest_refuses_a_pickled_checkpoint_and_a_stray_config_dir() -> None:
    with pytest.raises(ValidationError, match="safetensors version"):
        EdsamConfig(model="/models/v1-5-pruned.ckpt")
    with pytest.raises(ValidationError, match="only for a single-file"):
        EdsamConfig(model="/models/sd15", model_config_dir="/models/sd15")


def test_a_single_file_is_billed_with_its_config_folders_shapes(
    checkpoint, tmp_path: Path, monkeypatch
) -> None:
    from dgaug.job.bill import edsam_flops

    monkeypatch.setenv("DGAUG_CACHE_DIR", str(tmp_path))
    path, config, _ = checkpoint
    single, _ = edsam_flops(
        EdsamConfig(model=str(path), model_config_dir=str(config), image_size=32)
    )
    folder, _ = edsam_flops(EdsamConfig(model=str(config), image_size=32))
    assert single is not None and single == folder


@pytest.mark.slow  # an SDXL pipeline saved, written as one file and loaded
def test_an_sdxl_single_file_loads_with_its_sources_weights(tmp_path: Path) -> None:
    """SGM's layout (sd_xl_base_1.0.safetensors): the first encoder under
    conditioner.embedders.0, the second in OpenCLIP's own layout under conditioner.embedders.1.
    The two encoders differ in width, as SDXL's do (diffusers tells them apart by it)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dgaug.models.ldm_presets import (
        SD_SCHEDULER_CONFIG,
        TINY_SDXL_UNET_CONFIG,
        TINY_TEXT_CONFIG,
        TINY_VAE_CONFIG,
    )
    from dgaug.models.tokenizer import clip_tokenizer
    from tests.ldm_checkpoint import write_sdxl_checkpoint

    torch.manual_seed(4)
    text_2 = {**TINY_TEXT_CONFIG, "hidden_size": 48, "hidden_act": "gelu"}
    unet = {
        **TINY_SDXL_UNET_CONFIG,
        "cross_attention_dim": 32 + 48,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
    }
    parts = {
        "unet": UNet2DConditionModel(**unet),
        "vae": AutoencoderKL(**TINY_VAE_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**text_2)),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(),
        "scheduler": EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG),
    }
    StableDiffusionXLPipeline(**parts, add_watermarker=False).save_pretrained(tmp_path / "config")
    path = write_sdxl_checkpoint(parts, tmp_path / "xl.safetensors")
    ldm = load_ldm(str(path), device="cpu", config=str(tmp_path / "config"))
    assert ldm.sdxl
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(ldm, name).state_dict(), parts[name].state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
