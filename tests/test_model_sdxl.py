"""SDXL and SDXL-Turbo loaded by path: the conditioning SDXL defines (two encoders, pooled text,
size ids, a zero unconditional row), the transport's invariants through the stage's sampler, and
one line for the SDXL checkpoints dgaug cannot condition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from dgaug.models.errors import ModelError
from dgaug.models.ldm import load_ldm
from dgaug.models.ldm_presets import TINY_SDXL_UNET_CONFIG
from dgaug.stages.edsam.config import EdsamConfig
from dgaug.stages.edsam.sampler import EdsamSampler
from tests.test_model_families import save_family

CAPTIONS = ["a photo of a circle", "a sketch of a square on a table"]


@pytest.fixture(scope="module")
def turbo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family(tmp_path_factory.mktemp("xl") / "sdxl-turbo", "sdxl-turbo")


def test_sdxl_conditioning_is_both_encoders_penultimate_states_pooled_text_and_size_ids(
    turbo: Path,
) -> None:
    """Written out from SDXL's definition, independently of the loader: hidden states = the
    penultimate layers of both encoders side by side, pooled = the second's projection, time ids
    = (H, W, 0, 0, H, W) of the generated image; the unconditional row is all zeros."""
    ldm = load_ldm(str(turbo), device="cpu")
    assert ldm.sdxl
    states, pooled = [], None
    for tok, enc in ((ldm.tokenizer, ldm.text_encoder), (ldm.tokenizer_2, ldm.text_encoder_2)):
        ids = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True).input_ids
        out = enc(torch.tensor(ids), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
    hidden = torch.cat(states, dim=-1)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700, 700])
    side = 8 * ldm.vae_scale_factor
    ids = torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32)

    def unet(h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        kw = {"text_embeds": p, "time_ids": ids}
        return ldm.unet(z, t, encoder_hidden_states=h, added_cond_kwargs=kw).sample

    with torch.inference_mode():
        cond = ldm.encode_text(CAPTIONS)
        uncond = ldm.encode_unconditional()
        want = unet(hidden, pooled)
        torch.testing.assert_close(ldm.predict_noise(z, t, cond), want)
        zero = unet(torch.zeros_like(hidden), torch.zeros_like(pooled))
        guided = ldm.predict_noise(z, t, cond, uncond, guidance=4.0)
        torch.testing.assert_close(guided, zero + 4.0 * (want - zero), atol=1e-5, rtol=1e-5)
        # The size ids are inputs: another latent size conditions differently.
        other = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
        moved = ldm.unet(
            z,
            t,
            encoder_hidden_states=hidden,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": other},
        ).sample
        assert not torch.allclose(moved, want)
    assert float(uncond.abs().sum()) == 0.0


@pytest.mark.slow  # a model saved and loaded
def test_force_zeros_off_makes_the_empty_caption_the_unconditional_row(tmp_path: Path) -> None:
    folder = save_family(tmp_path / "xl", "sdxl")
    (folder / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": False}
        )
    )
    ldm = load_ldm(str(folder), device="cpu")
    with torch.inference_mode():
        torch.testing.assert_close(ldm.encode_unconditional(), ldm.encode_text([""]))
        assert float(ldm.encode_unconditional().abs().sum()) > 0


@pytest.mark.slow  # five sampler runs
def test_sdxl_turbo_keeps_the_transport_invariants(turbo: Path) -> None:
    """Through the stage's sampler (inverted start, trailing 2-step DDIM, no CFG): rho = 0 gives
    what objective none gives, byte for byte; |alpha| <= rho; a rerun is byte-identical."""
    ldm = load_ldm(str(turbo), device="cpu")
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    keys = ["0000000000", "0000000001"]

    def run(**kw: object) -> list:
        cfg = EdsamConfig(
            model=str(turbo), samples_per_image=2, image_size=32, steps=2, guidance=1.0, **kw
        )
        return EdsamSampler(ldm, cfg, seed=5).generate(pixels, CAPTIONS, keys)

    zero, none = run(rho=0.0), run(objective="none")
    assert all((a.image == b.image).all() for a, b in zip(zero, none, strict=True))
    moved, again = run(rho=0.4, alpha="channel"), run(rho=0.4, alpha="channel")
    assert all(abs(a) <= 0.4 for g in moved for a in g.record["alpha"])
    assert all((a.image == b.image).all() for a, b in zip(moved, again, strict=True))
    assert any((a.image != b.image).any() for a, b in zip(moved, none, strict=True))


def _save_unet(folder: Path, **changes: object) -> None:
    torch.manual_seed(0)
    UNet2DConditionModel(**{**TINY_SDXL_UNET_CONFIG, **changes}).save_pretrained(folder / "unet")


@pytest.mark.slow  # two models saved and loaded
def test_sdxl_without_its_second_encoder_or_with_refiner_ids_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """An SDXL UNet in a folder with one text encoder (as the refiner ships), or one whose added
    conditioning is not 6 size ids + pooled text (the refiner's aesthetic score): one line."""
    one_encoder = save_family(tmp_path / "one", "sd1 (epsilon)")
    _save_unet(one_encoder)
    refiner = save_family(tmp_path / "refiner", "sdxl")
    _save_unet(refiner, projection_class_embeddings_input_dim=5 * 8 + 32)
    for folder, match in ((one_encoder, "both text encoders"), (refiner, "refiner")):
        with pytest.raises(ModelError, match=match) as e:
            load_ldm(str(folder), device="cpu")
        assert "\n" not in str(e.value)
