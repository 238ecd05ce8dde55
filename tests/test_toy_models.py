"""The shipped toy models load by name and by path through the public loaders, offline, and have
learned the toy world: thresholds that the same architectures with random weights fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgaug.core.constants import TOY_CLIP, TOY_LDM
from dgaug.models.clip import load_clip
from dgaug.models.ldm import load_ldm
from dgaug.models.toy import toy_path
from dgaug.sources.drawing import render_image

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
STYLES = ("photo", "sketch", "cartoon", "painting")
PER_CELL = 10  # images per (class, style): 240 in all, drawn with a seed no model trained on


@pytest.fixture(scope="module")
def world() -> list[tuple[str, str, object]]:
    rng = np.random.default_rng(4242)
    return [
        (label, style, render_image(label, style, rng, 64))
        for label in CLASSES
        for style in STYLES
        for _ in range(PER_CELL)
    ]


def _zero_shot(clip, images, prompts: list[str]) -> torch.Tensor:
    x = clip.encode_pil(images)
    t = clip.encode_text(prompts)
    return (x @ t.T).argmax(dim=1)


def _accuracy(pred: torch.Tensor, names: list[str], truth: list[str]) -> float:
    return sum(names[int(p)] == t for p, t in zip(pred, truth, strict=True)) / len(truth)


def test_toy_clip_loads_by_name_and_by_local_dir_path() -> None:
    by_name = load_clip(TOY_CLIP, device="cpu")
    by_path = load_clip(f"local-dir:{toy_path(TOY_CLIP)}", device="cpu")
    assert not by_name.tiny and by_name.image_size == 64
    named, pathed = by_name.model.state_dict(), by_path.model.state_dict()
    assert named.keys() == pathed.keys()
    for key, value in named.items():
        assert torch.equal(value, pathed[key]), key


def test_toy_clip_tells_shapes_and_styles_far_above_chance(world) -> None:
    clip = load_clip(TOY_CLIP, device="cpu")
    images = [im for _, _, im in world]
    shapes = _zero_shot(clip, images, [f"a photo of a {c}" for c in CLASSES])
    shape_acc = _accuracy(shapes, list(CLASSES), [c for c, _, _ in world])
    styles = _zero_shot(clip, images, [f"a {s} of a shape" for s in STYLES])
    style_acc = _accuracy(styles, list(STYLES), [s for _, s, _ in world])
    # Chance is 1/6 and 1/4; with random weights both stay there (240 images: std ~0.025).
    assert shape_acc >= 0.25, shape_acc
    assert style_acc >= 0.6, style_acc


def test_toy_ldm_loads_by_name_on_cpu_and_reconstructs_held_out_images(world) -> None:
    ldm = load_ldm(TOY_LDM, device="cpu")
    assert not ldm.tiny and ldm.model_id == TOY_LDM
    pixels = torch.stack(
        [
            torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            for _, _, im in world[::5]
        ]
    )
    with torch.no_grad():
        recon = ldm.decode(ldm.encode_images(pixels))
    mse = float(((recon - pixels) / 2).pow(2).mean())
    psnr = 10 * np.log10(1.0 / mse)
    # A random VAE gives noise (about 5-10 dB); the trained one keeps shapes and colours.
    assert psnr >= 20, psnr
