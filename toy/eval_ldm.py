"""Measure the toy LDM loaded through dgaug: VAE PSNR on held-out images, text-to-image samples
classified by a small CNN trained on the real pixels and by the toy CLIP (shape and style
accuracy vs chance).

  .venv/bin/python toy/eval_ldm.py --data toy-data/real
Writes toy/logs/ldm_eval.json, toy/logs/ldm_samples.png (rows: 6 shapes; columns: 4 samples of each
of photo, sketch, cartoon, painting) and toy/logs/ldm_recon.png (held-out originals above their
reconstructions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_ldm.py: spinning threads stall

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_ldm import REPO, load_shards, shard_paths, to_pixels  # noqa: E402

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
STYLES = ["photo", "sketch", "cartoon", "painting"]


class Classifier(torch.nn.Module):
    """A tiny CNN on 32 px pixels with one head for the shape and one for the style."""

    def __init__(self) -> None:
        super().__init__()
        c = [3, 16, 32, 64]
        layers = []
        for a, b in zip(c, c[1:], strict=False):
            layers += [
                torch.nn.Conv2d(a, b, 3, padding=1),
                torch.nn.BatchNorm2d(b),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]
        self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.shape = torch.nn.Linear(64, len(SHAPES))
        self.style = torch.nn.Linear(64, len(STYLES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(F.avg_pool2d(x, 2))
        return self.shape(h), self.style(h)


def train_classifier(images, shapes, styles, steps: int, seed: int) -> Classifier:
    torch.manual_seed(seed)
    net = Classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (64,), generator=g)
        x = to_pixels(images[idx])
        if step % 2:  # flips keep the shape and style; they make the classifier less brittle
            x = x.flip(-1)
        a, b = net(x)
        loss = F.cross_entropy(a, shapes[idx]) + F.cross_entropy(b, styles[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: Classifier, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = net(pixels)
    return a.argmax(1), b.argmax(1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, on [0, 1] pixels."""
    mse = ((x - y) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def sheet(tiles: torch.Tensor, cols: int) -> Image.Image:
    arr = ((tiles.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    rows, h, w = -(-len(arr) // cols), arr.shape[1], arr.shape[2]
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, a in enumerate(arr):
        out.paste(Image.fromarray(a), ((i % cols) * w, (i // cols) * h))
    return out


@torch.no_grad()
def sample(m, captions: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = m.vae_scale_factor
    z = torch.randn((len(captions), m.latent_channels, 64 // f, 64 // f), generator=g)
    cond, uncond = m.encode_text(captions), m.encode_text([""])
    m.scheduler.set_timesteps(steps)
    z = z * m.scheduler.init_noise_sigma
    for t in m.scheduler.timesteps:
        eps = m.predict_noise(z, t, cond, uncond, guidance)
        z = m.scheduler.step(eps, t, z).prev_sample
    return m.decode(z)


def clip_zero_shot(imgs: torch.Tensor, shape: torch.Tensor, style: torch.Tensor) -> dict:
    """Shape ("a photo of a {label}") and style ("a {style} of a shape") accuracy of the toy CLIP."""
    from dgaug.core.constants import TOY_CLIP
    from dgaug.models.clip import load_clip

    clip = load_clip(TOY_CLIP, device="cpu")
    pil = [
        Image.fromarray(((im.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
        for im in imgs
    ]
    with torch.no_grad():
        x = clip.encode_pil(pil)
        qs = (x @ clip.encode_text([f"a photo of a {c}" for c in SHAPES]).T).argmax(1)
        qd = (x @ clip.encode_text([f"a {s} of a shape" for s in STYLES]).T).argmax(1)
    return {
        "shape_acc": round(float((qs == shape).float().mean()), 3),
        "style_acc": round(float((qd == style).float().mean()), 3),
        "shape_acc_by_style": {
            d: round(float((qs == shape)[style == i].float().mean()), 3)
            for i, d in enumerate(STYLES)
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "dgaug/models/toy/ldm"))
    p.add_argument("--data", type=Path, default=REPO / "toy-data/real")
    p.add_argument("--train-shards", default="0-10")
    p.add_argument("--heldout-shards", default="11")
    p.add_argument("--per-cell", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    # Reused when present: the classifier depends only on the data, not on the LDM.
    p.add_argument(
        "--classifier-cache", type=Path, default=Path("/tmp/dgaug-toy-shape-style-cnn.pt")
    )
    p.add_argument("--out", type=Path, default=REPO / "toy/logs")
    args = p.parse_args()
    torch.set_num_threads(2)
    from dgaug.models.ldm import load_ldm

    t0 = time.time()
    try:
        m = load_ldm(args.model, device="cpu", dtype="float32", allow_large_on_cpu=True)
    except TypeError:  # the loader's CPU guard may have been renamed in a refactor
        m = load_ldm(args.model, device="cpu", dtype="float32")
    train = load_shards(shard_paths(args.data, args.train_shards))
    held = load_shards(shard_paths(args.data, args.heldout_shards))
    res: dict = {"model": args.model, "heldout_images": int(held["images"].shape[0])}

    # 1. VAE reconstruction of held-out images through the loader's own encode / decode.
    x = to_pixels(held["images"])
    rec = torch.cat([m.decode(m.encode_images(x[i : i + 250])) for i in range(0, len(x), 250)])
    ps = psnr(rec, x)
    doms = np.array(held["domains"])
    res["vae_psnr_db"] = round(float(ps.mean()), 2)
    res["vae_psnr_db_by_style"] = {d: round(float(ps[doms == d].mean()), 2) for d in STYLES}
    sheet(torch.cat([x[:16], rec[:16]]), 16).save(args.out / "ldm_recon.png")

    # 2. A classifier of real pixels (trained on the training shards, checked on held-out ones).
    sh = torch.tensor([SHAPES.index(s) for s in train["labels"]])
    st = torch.tensor([STYLES.index(s) for s in train["domains"]])
    cache = args.classifier_cache
    if cache and cache.is_file():
        net = Classifier()
        net.load_state_dict(torch.load(cache, weights_only=True))
        net.eval()
    else:
        net = train_classifier(train["images"], sh, st, args.classifier_steps, args.seed)
        if cache:
            torch.save(net.state_dict(), cache)
    hs = torch.tensor([SHAPES.index(s) for s in held["labels"]])
    hd = torch.tensor([STYLES.index(s) for s in held["domains"]])
    ps_, pd_ = predict(net, x)
    res["classifier_on_real_heldout"] = {
        "shape_acc": round(float((ps_ == hs).float().mean()), 3),
        "style_acc": round(float((pd_ == hd).float().mean()), 3),
    }

    # 3. Text-to-image samples from held-out captions of each (shape, style) cell.
    captions, want_shape, want_style = [], [], []
    for si, shape in enumerate(SHAPES):
        for di, style in enumerate(STYLES):
            cell = [
                c
                for c, lab, dom in zip(
                    held["captions"], held["labels"], held["domains"], strict=True
                )
                if lab == shape and dom == style
            ]
            captions += cell[: args.per_cell]
            want_shape += [si] * args.per_cell
            want_style += [di] * args.per_cell
    t1 = time.time()
    imgs = torch.cat(
        [
            sample(m, captions[i : i + 48], args.steps, args.guidance, args.seed + i)
            for i in range(0, len(captions), 48)
        ]
    )
    res["sampling_seconds"] = round(time.time() - t1, 1)
    sheet(imgs, 4 * args.per_cell).save(args.out / "ldm_samples.png")
    ws, wd = torch.tensor(want_shape), torch.tensor(want_style)
    qs, qd = predict(net, imgs)
    res["samples"] = {
        "n": len(captions),
        "ddim_steps": args.steps,
        "guidance": args.guidance,
        "shape_acc": round(float((qs == ws).float().mean()), 3),
        "shape_chance": round(1 / 6, 3),
        "style_acc": round(float((qd == wd).float().mean()), 3),
        "style_chance": 0.25,
        "shape_acc_by_style": {
            d: round(float((qs == ws)[wd == i].float().mean()), 3) for i, d in enumerate(STYLES)
        },
        "example_captions": captions[:: args.per_cell * 4][:6],
    }
    # 4. The same samples classified by the toy CLIP, zero-shot (the measure).
    res["samples_by_toy_clip"] = clip_zero_shot(imgs, ws, wd)
    res["seconds"] = round(time.time() - t0, 1)
    (args.out / "ldm_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
