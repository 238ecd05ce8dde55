"""Latent diffusion loader: tiny-random model, save/load round trip, errors, tokenizer, SD-1.5 configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from PIL import Image

from dgaug.core.constants import TINY as TINY_RANDOM
from dgaug.models.errors import ModelError
from dgaug.models.ldm import (
    SUBFOLDERS,
    LatentDiffusion,
    from_components,
    load_ldm,
    tiny_random_components,
)
from dgaug.models.ldm_presets import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from dgaug.models.tokenizer import clip_tokenizer, clip_tokenizer_files

CAPTIONS = ["a photo of a cat", "a dog on a beach"]


@pytest.fixture(scope="module")
def tiny() -> LatentDiffusion:
    return load_ldm(TINY_RANDOM, device="cpu")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 64, generator=g) * 2 - 1


def _weights(components: dict) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name in ("vae", "unet", "text_encoder")
        for k, v in components[name].state_dict().items()
    }


def test_tiny_weights_are_deterministic_by_seed():
    a, b, c = (_weights(tiny_random_components(s)) for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Every model's weights change with the seed (not only one of them).
    for name in ("vae.", "unet.", "text_encoder."):
        assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith(name)), name


def test_tiny_components_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_random_components(0)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_properties(tiny):
    assert tiny.tiny and tiny.model_id == TINY_RANDOM
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    assert tiny.num_train_timesteps == 1000
    ac = tiny.alphas_cumprod
    assert ac.dtype == torch.float64 and ac.device.type == "cpu" and ac.shape == (1000,)
    assert torch.all(ac[1:] < ac[:-1]) and 0 < ac[-1] < ac[0] < 1
    assert tiny.latent_channels == 4 and tiny.vae_scale_factor == 2
    assert type(tiny.scheduler).__name__ == "DDIMScheduler"
    for module in (tiny.unet, tiny.vae):
        kinds = {type(p).__name__ for p in module.attn_processors.values()}
        assert kinds == {"AttnProcessor2_0"}
    assert not any(p.requires_grad for p in tiny.unet.parameters())


def test_encode_decode_shapes_and_range(tiny, pixels):
    z = tiny.encode_images(pixels.double())  # any input dtype is accepted
    f = tiny.vae_scale_factor
    assert z.shape == (2, tiny.latent_channels, 64 // f, 64 // f) and z.dtype == torch.float32
    assert torch.equal(z, tiny.encode_images(pixels))  # the posterior mean: deterministic
    x = tiny.decode(z)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and not x.requires_grad
    with pytest.raises(ValueError):
        tiny.encode_images(pixels[:, :, :63, :63])


def test_encode_text_shape(tiny):
    c = tiny.encode_text(CAPTIONS)
    assert c.shape == (2, 77, 32) and c.dtype == tiny.dtype
    assert not torch.equal(c[0], c[1])


def test_predict_noise_and_guidance(tiny, pixels):
    z = tiny.encode_images(pixels)
    cond, uncond = tiny.encode_text(CAPTIONS), tiny.encode_text([""])
    t = torch.tensor([500, 200])
    with torch.inference_mode():
        eps_c = tiny.predict_noise(z, t, cond)
        eps_u = tiny.predict_noise(z, t, uncond.expand(2, -1, -1))
        guided = tiny.predict_noise(z, t, cond, uncond, guidance=5.0)
        plain = tiny.predict_noise(z, t, cond, uncond, guidance=1.0)
        scalar_t = tiny.predict_noise(z, 500, cond[:1].expand(2, -1, -1))
    assert eps_c.shape == z.shape and eps_c.dtype == torch.float32
    torch.testing.assert_close(guided, eps_u + 5.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, eps_c)
    torch.testing.assert_close(scalar_t[0], eps_c[0])
    assert not torch.allclose(eps_c, eps_u)


def test_predict_noise_follows_the_callers_grad_mode(tiny, pixels):
    # One small image: a backward pass through the UNet and the VAE decoder is the costly part.
    z = tiny.encode_images(pixels[:1, :, :32, :32]).requires_grad_(True)
    cond = tiny.encode_text(CAPTIONS[:1])
    eps = tiny.predict_noise(z, 300, cond, tiny.encode_text([""]), guidance=3.0)
    loss = tiny.decode(z - 0.1 * eps, grad=True).square().mean()
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.unet.parameters())
    with torch.no_grad():
        assert not tiny.predict_noise(z, 300, cond).requires_grad


def test_save_pretrained_round_trip(tmp_path, tiny, pixels):
    parts = tiny_random_components(0)
    # SD-1.5 ships a PNDM scheduler; the loader must turn its config into DDIM.
    parts["scheduler"] = PNDMScheduler.from_config(parts["scheduler"].config, skip_prk_steps=True)
    for name in SUBFOLDERS:
        parts[name].save_pretrained(tmp_path / name)
    loaded = load_ldm(str(tmp_path), device="cpu", allow_large_on_cpu=True)
    assert not loaded.tiny and loaded.model_id == str(tmp_path)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    torch.testing.assert_close(loaded.alphas_cumprod, tiny.alphas_cumprod)
    z = tiny.encode_images(pixels)
    torch.testing.assert_close(loaded.encode_images(pixels), z)
    cond = tiny.encode_text(CAPTIONS)
    torch.testing.assert_close(loaded.encode_text(CAPTIONS), cond)
    with torch.inference_mode():
        expected = tiny.predict_noise(z, 400, cond, tiny.encode_text([""]), guidance=4.0)
        got = loaded.predict_noise(z, 400, cond, loaded.encode_text([""]), guidance=4.0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(loaded.decode(z), tiny.decode(z))


def test_v_prediction_is_converted_to_noise(tiny, pixels):
    parts = tiny_random_components(0)
    parts["scheduler"] = DDIMScheduler.from_config(
        parts["scheduler"].config, prediction_type="v_prediction"
    )
    vmodel = from_components(parts, model_id="v", tiny=True, device="cpu")
    z = tiny.encode_images(pixels[:, :, :32, :32])
    cond, uncond = tiny.encode_text(CAPTIONS), tiny.encode_text([""])
    t = torch.tensor([700, 100])
    with torch.inference_mode():
        raw = tiny.predict_noise(z, t, cond, uncond, guidance=2.0)  # same weights: the raw v
        eps = vmodel.predict_noise(z, t, cond, uncond, guidance=2.0)
    ac = tiny.alphas_cumprod.float()[t].view(2, 1, 1, 1)
    torch.testing.assert_close(eps, ac.sqrt() * raw + (1 - ac).sqrt() * z)


def test_sample_prediction_is_refused():
    parts = tiny_random_components(0)
    parts["scheduler"] = DDIMScheduler.from_config(
        parts["scheduler"].config, prediction_type="sample"
    )
    with pytest.raises(ModelError, match="predicts 'sample'"):
        from_components(parts, model_id="s", tiny=True, device="cpu")


def test_inpainting_unet_is_refused():
    from diffusers import UNet2DConditionModel

    from dgaug.models.ldm_presets import TINY_UNET_CONFIG

    parts = tiny_random_components(0)
    parts["unet"] = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 9})
    with pytest.raises(ModelError, match="inpainting"):
        from_components(parts, model_id="inpaint", tiny=True, device="cpu")


def test_a_non_ddim_scheduler_becomes_ddim():
    parts = tiny_random_components(0)
    parts["scheduler"] = PNDMScheduler.from_config(parts["scheduler"].config)
    model = from_components(parts, model_id="p", tiny=True, device="cpu")
    assert isinstance(model.scheduler, DDIMScheduler)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_missing_local_folder(tmp_path):
    spec = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError) as exc:
        load_ldm(spec, device="cpu", allow_large_on_cpu=True)
    assert spec in _one_line(exc) and "does not exist" in str(exc.value)


def test_incomplete_local_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError) as exc:
        load_ldm(str(tmp_path), device="cpu", allow_large_on_cpu=True)
    assert "missing vae/" in _one_line(exc)


# diffusers itself passes a deprecated argument to huggingface_hub; not ours to fix.
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "dgaug-tests/no-such-model"
    with pytest.raises(ModelError) as exc:
        load_ldm(spec, device="cpu", allow_large_on_cpu=True)
    msg = _one_line(exc)
    assert spec in msg and "HF_HUB_OFFLINE" in msg


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_without_a_gpu():
    with pytest.raises(ModelError) as exc:
        load_ldm(TINY_RANDOM, device="cuda")
    msg = _one_line(exc)
    assert "CUDA" in msg and "device: cpu" in msg


def test_full_size_model_on_cpu_needs_consent(tmp_path):
    with pytest.raises(ModelError) as exc:
        load_ldm("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu")
    assert "full-size model" in _one_line(exc) and "allow_cpu: true" in str(exc.value)
    for name in SUBFOLDERS:
        (tmp_path / name).mkdir()
    with pytest.raises(ModelError, match="full-size model"):
        load_ldm(str(tmp_path), device="cpu")


def test_bad_dtype():
    with pytest.raises(ModelError, match="dtype"):
        load_ldm(TINY_RANDOM, device="cpu", dtype="float8")


def test_img2img_pipeline_accepts_the_tiny_components():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(
        **tiny_random_components(0), requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = pipe(
        "a photo of a cat",
        image=image,
        num_inference_steps=2,
        strength=0.5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_tokenizer_matches_open_clip():
    import open_clip

    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.pad_token == "<|endoftext|>"
    for caption in ["a photo of a cat", "Hello, World! It's a 3-D photo of a café (at night)."]:
        reference = open_clip.tokenize([caption])[0].tolist()
        end = reference.index(49407) + 1
        assert tok(caption).input_ids == reference[:end], caption
    padded = tok(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    assert len(padded) == 77 and padded[7:] == [49407] * 70


def test_tokenizer_files_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DGAUG_CACHE_DIR", str(tmp_path))
    folder = clip_tokenizer_files()
    assert folder.is_relative_to(tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    assert (folder / "merges.txt").read_text(encoding="utf-8").count("\n") == 48894 + 1
    mtime = (folder / "vocab.json").stat().st_mtime_ns
    assert clip_tokenizer_files() == folder and (folder / "vocab.json").stat().st_mtime_ns == mtime
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_sd15_shaped_configs():
    # Shapes only: instantiating them would allocate ~1 B parameters.
    assert SD15_UNET_CONFIG["block_out_channels"] == (320, 640, 1280, 1280)
    assert SD15_UNET_CONFIG["cross_attention_dim"] == 768
    assert SD15_UNET_CONFIG["attention_head_dim"] == 8
    assert SD15_UNET_CONFIG["layers_per_block"] == 2 and SD15_UNET_CONFIG["sample_size"] == 64
    assert SD15_UNET_CONFIG["in_channels"] == SD15_UNET_CONFIG["out_channels"] == 4
    assert [b.startswith("CrossAttn") for b in SD15_UNET_CONFIG["down_block_types"]] == [
        True,
        True,
        True,
        False,
    ]
    assert SD15_VAE_CONFIG["block_out_channels"] == (128, 256, 512, 512)
    assert SD15_VAE_CONFIG["latent_channels"] == 4 and SD15_VAE_CONFIG["scaling_factor"] == 0.18215
    assert 2 ** (len(SD15_VAE_CONFIG["block_out_channels"]) - 1) == 8
    t = SD15_TEXT_CONFIG
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"]) == (768, 12, 12)
    assert t["intermediate_size"] == 3072 and t["max_position_embeddings"] == 77
    assert t["vocab_size"] == 49408


def test_from_components_wraps_given_parts(pixels):
    model = from_components(tiny_random_components(1), model_id="x", tiny=True, device="cpu")
    assert model.encode_images(pixels).shape == (2, 4, 32, 32)
    assert model.tiny and model.model_id == "x" and model.dtype == torch.float32


@pytest.mark.slow  # torch.compile's first call: several seconds
def test_compile_wraps_in_place():
    # Wrapping only: the first forward would compile for minutes on a CPU.
    model = load_ldm(TINY_RANDOM, device="cpu", compile=True)
    assert type(model.unet).__name__ == "UNet2DConditionModel"
    assert model.unet._compiled_call_impl is not None
    assert model.vae.decoder._compiled_call_impl is not None
