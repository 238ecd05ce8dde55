"""CLIP loading and encoding: tiny-random, local checkpoints, spec errors; CPU, offline, no hub."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from PIL import Image

from dgaug.core.constants import TINY as TINY_RANDOM
from dgaug.models import clip as clip_module
from dgaug.models import runtime
from dgaug.models.clip import (
    TINY_ARCH,
    TINY_CONFIG,
    ClipModel,
    load_clip,
    parse_clip_spec,
)
from dgaug.models.errors import ModelError


@pytest.fixture(scope="module")
def tiny() -> ClipModel:
    return load_clip(TINY_RANDOM, device="cpu", seed=0)


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) any attempt to resolve or connect, so a test proves it stayed offline."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _state(clip: ClipModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in clip.model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _pil(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


class Opaque:
    """A class a checkpoint pickle would need code to rebuild: weights_only must refuse it."""

    def __init__(self):
        self.weights = torch.zeros(2)


# --- tiny-random ---------------------------------------------------------------------------


def test_tiny_same_seed_same_weights_other_seed_differs():
    a, b = load_clip(TINY_RANDOM, seed=7), load_clip(TINY_RANDOM, seed=7)
    _assert_same_weights(_state(a), _state(b))
    c = load_clip(TINY_RANDOM, seed=8)
    assert not torch.equal(a.model.visual.conv1.weight, c.model.visual.conv1.weight)


def test_tiny_leaves_the_callers_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_clip(TINY_RANDOM, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_is_frozen_and_described(tiny):
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.tiny and tiny.model_id == TINY_RANDOM
    assert (tiny.image_size, tiny.embed_dim) == (32, 32)
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    assert len(tiny.mean) == len(tiny.std) == 3
    assert tiny.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert sum(p.numel() for p in tiny.model.parameters()) < 2_000_000


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (3, 3, 64, 48), (1, 3, 17, 100)])
def test_encode_images_any_size_gives_unit_vectors(tiny, shape):
    features = tiny.encode_images(torch.rand(shape))
    assert features.shape == (shape[0], tiny.embed_dim) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(shape[0]))
    raw = tiny.encode_images(torch.rand(shape), normalize=False)
    assert raw.shape == features.shape


def test_encode_images_matches_encode_pil(tiny):
    # At the model's own size the two paths differ only in where the normalisation runs.
    images = [_pil(32, 32, seed) for seed in range(3)]
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    torch.testing.assert_close(
        tiny.encode_images(pixels.float() / 255), tiny.encode_pil(images), atol=1e-5, rtol=0
    )
    # Resized and cropped (PIL's bicubic vs torch's) they still point the same way.
    wide = _pil(50, 70)
    pixels = torch.from_numpy(np.array(wide)).permute(2, 0, 1)[None].float() / 255
    cos = (tiny.encode_images(pixels) * tiny.encode_pil([wide])).sum()
    assert cos > 0.99


def test_encode_pil_batches_mixed_sizes(tiny):
    images = [_pil(40, 30, 1), _pil(32, 32, 2), _pil(100, 64, 3).convert("L")]
    features = tiny.encode_pil(images, batch_size=2)
    assert features.shape == (3, tiny.embed_dim)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    assert tiny.encode_pil([]).shape == (0, tiny.embed_dim)


def test_encode_text_unit_vectors(tiny):
    texts = ["a photo of a dog", "a sketch of a cat", "word " * 200]  # the last is truncated
    features = tiny.encode_text(texts)
    assert features.shape == (3, tiny.embed_dim) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(features[0], features[1])
    assert tiny.encode_text([]).shape == (0, tiny.embed_dim)


def test_gradient_reaches_pixels_not_weights(tiny):
    # What the ED-SAM `worst` objective does: a contrastive loss on decoded images, backpropagated.
    pixels = torch.rand(4, 3, 48, 48).requires_grad_()
    text = tiny.encode_text(["a", "b", "c", "d"])
    logits = tiny.logit_scale * tiny.encode_images(pixels) @ text.T
    F.cross_entropy(logits, torch.arange(4)).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())
    with torch.no_grad():
        assert not tiny.encode_images(torch.rand(1, 3, 32, 32).requires_grad_()).requires_grad


def test_bf16_autocast_on_cpu_still_returns_float32():
    clip = load_clip(TINY_RANDOM, precision="bf16")
    assert clip.dtype == torch.bfloat16
    assert clip.encode_images(torch.rand(2, 3, 32, 32)).dtype == torch.float32


# --- local checkpoints ----------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    source = load_clip(TINY_RANDOM, seed=3)
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(_state(source), str(path))
    loaded = load_clip(f"{TINY_ARCH}:{path}")
    _assert_same_weights(_state(loaded), _state(source))
    assert loaded.tiny and loaded.model_id == f"{TINY_ARCH}:{path}"
    assert not any(p.requires_grad for p in loaded.model.parameters())
    pixels = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_images(pixels), source.encode_images(pixels))


def test_torch_checkpoints_raw_and_wrapped(tmp_path):
    source = load_clip(TINY_RANDOM, seed=4)
    raw = tmp_path / "raw.pt"
    torch.save(_state(source), raw)
    _assert_same_weights(_state(load_clip(f"{TINY_ARCH}:{raw}")), _state(source))
    # As open_clip training writes it: DDP-wrapped names, beside the epoch and optimizer state.
    wrapped = tmp_path / "epoch_3.pt"
    state = {f"module.{k}": v for k, v in _state(source).items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state, "optimizer": {}}, wrapped)
    _assert_same_weights(_state(load_clip(f"{TINY_ARCH}:{wrapped}")), _state(source))


def test_mismatched_keys_are_named(tmp_path):
    state = _state(load_clip(TINY_RANDOM))
    del state["logit_scale"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "keys.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(ModelError, match=r"missing keys \[logit_scale\].*unexpected keys \[extra"):
        load_clip(f"{TINY_ARCH}:{path}")


def test_mismatched_shapes_are_named(tmp_path):
    state = _state(load_clip(TINY_RANDOM))
    state["text_projection"] = torch.zeros(32, 64)
    path = tmp_path / "shapes.bin"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"text_projection \(32, 64\) vs \(32, 32\)"):
        load_clip(f"{TINY_ARCH}:{path}")


@pytest.mark.parametrize("name", ["corrupt.safetensors", "corrupt.pt"])
def test_corrupt_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ModelError, match="could not be read"):
        load_clip(f"{TINY_ARCH}:{path}")


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "opaque.pt"
    torch.save({"state_dict": Opaque()}, path)
    with pytest.raises(
        ModelError, match=r"refused: unpickling it would run code \(.*Opaque\).*weights_only=True"
    ):
        load_clip(f"{TINY_ARCH}:{path}")


def test_checkpoint_without_tensors(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 1}, path)
    with pytest.raises(ModelError, match="no state dict of tensors"):
        load_clip(f"{TINY_ARCH}:{path}")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_clip(f"ViT-B-32:{tmp_path / 'absent.safetensors'}")


# --- spec grammar and errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("tiny-random", ("tiny-random", TINY_ARCH, None)),
        ("ViT-B-32:laion2b_s34b_b79k", ("pretrained", "ViT-B-32", "laion2b_s34b_b79k")),
        ("ViT-B/32:openai", ("pretrained", "ViT-B-32", "openai")),
        ("hf-hub:laion/CLIP-ViT-B-32", ("hf-hub", None, "laion/CLIP-ViT-B-32")),
        ("ViT-L-14:/ckpt/epoch_3.pt", ("checkpoint", "ViT-L-14", "/ckpt/epoch_3.pt")),
        ("dgaug-tiny:weights.safetensors", ("checkpoint", TINY_ARCH, "weights.safetensors")),
        ("ViT-B-32:~/w.bin", ("checkpoint", "ViT-B-32", "~/w.bin")),
    ],
)
def test_parse_clip_spec(spec, parsed):
    assert parse_clip_spec(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ViT-B-33:openai", r"unknown CLIP architecture 'ViT-B-33'; did you mean ViT-B-32"),
        ("ViT-B-32:laion9b", r"unknown pretrained tag 'laion9b' for ViT-B-32; known tags: openai"),
        ("ViT-B-32", r"names an architecture but no weights"),
        ("hf-hub:just-a-name", r"expected hf-hub:ORG/NAME"),
        ("", r"is not one of 'tiny-random'"),
        (":openai", r"is not one of"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(ModelError, match=message):
        load_clip(spec)


@pytest.mark.parametrize(
    ("spec", "what"),
    [
        ("ViT-B-32:laion2b_s34b_b79k", "ViT-B-32/laion2b_s34b_b79k"),
        ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf-hub:laion/CLIP-ViT-B-32"),
    ],
)
def test_hub_weights_offline_fail_fast(spec, what, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        load_clip(spec, cache_dir=str(tmp_path))  # an empty cache, whatever this machine holds
    message = str(info.value)
    assert what in message and "not in the local cache and the hub cannot be reached" in message
    assert "\n" not in message and "local checkpoint" in message
    assert no_network == [], "offline means no connection is even tried"


def test_hf_hub_model_from_a_copied_cache(tmp_path, monkeypatch, no_network):
    # The offline story: a cache filled on a machine with network, copied here, read as it is.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    source = load_clip(TINY_RANDOM, seed=5)
    snapshot = tmp_path / "models--dgaug--tiny-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    config = {"model_cfg": TINY_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(_state(source), str(snapshot / "open_clip_model.safetensors"))
    loaded = load_clip("hf-hub:dgaug/tiny-clip", cache_dir=str(tmp_path))
    _assert_same_weights(_state(loaded), _state(source))
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.image_size == 32 and not loaded.tiny
    assert loaded.encode_text(["a cat"]).shape == (1, 32) and no_network == []


def test_unreachable_hub_is_one_line(monkeypatch):
    # Online mode with no route to the hub: what open_clip's download raises becomes a ModelError.
    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known\nretrying...")

    monkeypatch.setattr(runtime, "hub_offline", lambda: False)
    monkeypatch.setattr(clip_module.open_clip, "download_pretrained", unreachable)
    with pytest.raises(ModelError) as info:
        load_clip("ViT-L-14:openai")
    message = str(info.value)
    assert message.startswith("weights for ViT-L-14/openai are not in the local cache and the hub")
    assert "Name or service not known" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu():
    with pytest.raises(ModelError, match="no CUDA GPU is visible"):
        load_clip(TINY_RANDOM, device="cuda")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "not one of auto, cpu, cuda"),
        ({"precision": "int8"}, "not one of auto, fp32, bf16, fp16"),
        ({"device": "cpu", "precision": "fp16"}, "fp16 needs a CUDA device"),
    ],
)
def test_device_and_precision_errors(kwargs, message):
    with pytest.raises(ModelError, match=message):
        load_clip(TINY_RANDOM, **kwargs)
