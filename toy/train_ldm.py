"""Train the toy world's latent diffusion model on a CPU and save it in diffusers' folder format.

Two parts, one after the other, seeded:
  (a) an AutoencoderKL (3 blocks: 64 px -> 16x16x4 latents), L1 + L2 reconstruction + a small KL,
      trained on random 32 px crops (it is fully convolutional: no attention in its mid block),
      whose config then gets scaling_factor = 1 / std of the training latents;
  (b) a text-conditional UNet2DConditionModel on those latents (epsilon prediction, DDPM with SD-1.x's
      scaled_linear schedule of 1000 steps, 10 % of captions dropped to "" for classifier-free
      guidance), trained jointly with a small CLIPTextModel on the real CLIP BPE tokenizer.
Weights are written as float16 safetensors by StableDiffusionPipeline.save_pretrained, so dgaug
loads them through load_ldm(path) exactly as it loads a Stable Diffusion checkpoint.

  .venv/bin/python toy/train_ldm.py                      # full run (~35 min on 2 shared cores)
  .venv/bin/python toy/train_ldm.py --quick --out /tmp/ldm-quick
Data: `dgaug run toy/data.yaml` writes toy-data/real/{00000..00011}.tar; shard 00011 is held out.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import tarfile
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting made each step 4-15x slower (measured:
# 3-13 s vs 0.8 s per VAE step); passive waiting must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dgaug.models.ldm_presets import SD_SCHEDULER_CONFIG, TINY_TEXT_CONFIG

REPO = Path(__file__).resolve().parents[1]

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    # No attention: the VAE trains on 32 px crops and must behave the same at 64 px.
    "mid_block_add_attention": False,
}
# dgaug's tiny text encoder, with a wider MLP: the toy's captions must condition the UNet.
TEXT_CONFIG = {**TINY_TEXT_CONFIG, "intermediate_size": 64}
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}


def load_shards(paths: list[Path]) -> dict:
    """Images (uint8 [N,3,64,64]), captions, labels and domains from dgaug's webdataset tars."""
    images, captions, labels, domains = [], [], [], []
    for path in paths:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    key, ext = m.name.rsplit(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key in sorted(samples):
            s = samples[key]
            if not {"jpg", "txt", "json"} <= s.keys():
                continue
            img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
            images.append(np.asarray(img).transpose(2, 0, 1))
            captions.append(s["txt"].decode("utf-8"))
            meta = json.loads(s["json"])
            labels.append(meta["label"])
            domains.append(meta["domain"])
    return {
        "images": torch.from_numpy(np.stack(images)),
        "captions": captions,
        "labels": labels,
        "domains": domains,
    }


def shard_paths(data: Path, spec: str) -> list[Path]:
    lo, _, hi = spec.partition("-")
    ids = range(int(lo), int(hi or lo) + 1)
    return [data / f"{i:05d}.tar" for i in ids]


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(127.5).sub(1.0)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Logger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("w")

    def __call__(self, **rec) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        print(json.dumps(rec), flush=True)


def train_vae(args, images: torch.Tensor, log: Logger):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    n, crop = images.shape[0], args.vae_crop
    t0, acc = time.time(), {"loss": 0.0, "l1": 0.0, "mse": 0.0, "kl": 0.0}
    step = 0
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 50)
        idx = torch.randint(0, n, (args.vae_batch,), generator=g)
        # One crop offset per batch, on the 4-pixel latent grid.
        oy, ox = (torch.randint(0, (64 - crop) // 4 + 1, (2,), generator=g) * 4).tolist()
        x = to_pixels(images[idx, :, oy : oy + crop, ox : ox + crop])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = l1 + mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in (("loss", loss), ("l1", l1), ("mse", mse), ("kl", kl)):
            acc[k] += v.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            k = (step % args.log_every) + 1
            log(
                part="vae",
                step=step + 1,
                **{a: round(b / k, 5) for a, b in acc.items()},
                lr=round(opt.param_groups[0]["lr"], 6),
                sec=round(time.time() - t0, 1),
            )
            acc = dict.fromkeys(acc, 0.0)
        if time.time() - t0 > args.max_minutes_vae * 60:
            log(part="vae", event="time_cap", step=step + 1)
            break
    vae.eval().requires_grad_(False)
    return vae, step + 1, time.time() - t0


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(to_pixels(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - decay)


def train_unet(args, mean, std, scale, ids, empty_ids, log: Logger):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed + 2)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(args.seed + 3)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    ema_unet, ema_text = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text).requires_grad_(False),
    )
    noise_sched = DDPMScheduler(
        **{
            k: v
            for k, v in SD_SCHEDULER_CONFIG.items()
            if k != "set_alpha_to_one" and k != "steps_offset"
        }
    )
    opt = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "weight_decay": 1e-2},
            # No decay on the text tower: its unused token rows must stay as initialised.
            {"params": text.parameters(), "weight_decay": 0.0},
        ],
        lr=args.unet_lr,
    )
    g = torch.Generator().manual_seed(args.seed + 4)
    n = mean.shape[0]
    t0, acc, step = time.time(), 0.0, 0
    for step in range(args.unet_steps):
        lr = lr_at(step, args.unet_steps, args.unet_lr, 50)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, n, (args.unet_batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (args.unet_batch,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        tok = ids[idx].clone()
        drop = torch.rand(args.unet_batch, generator=g) < args.caption_dropout
        tok[drop] = empty_ids
        cond = text(tok).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        acc += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.unet_steps:
            k = (step % args.log_every) + 1
            log(
                part="unet",
                step=step + 1,
                loss=round(acc / k, 5),
                lr=round(lr, 6),
                sec=round(time.time() - t0, 1),
            )
            acc = 0.0
        if time.time() - t0 > args.max_minutes_unet * 60:
            log(part="unet", event="time_cap", step=step + 1)
            break
    return ema_unet.eval(), ema_text.eval(), step + 1, time.time() - t0


def save(out: Path, vae, unet, text, tokenizer, scale: float) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scale)
    # float16 on disk halves the folder; the loaders cast to the dtype asked for.
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(),
        text_encoder=copy.deepcopy(text).half(),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(),
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "toy-data/real")
    p.add_argument("--out", type=Path, default=REPO / "dgaug/models/toy/ldm")
    p.add_argument("--log", type=Path, default=REPO / "toy/logs/ldm_train.jsonl")
    p.add_argument("--train-shards", default="0-10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-crop", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=2400)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--max-minutes-vae", type=float, default=12.0)
    p.add_argument("--max-minutes-unet", type=float, default=45.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="1-2 minute smoke run on one shard")
    args = p.parse_args()
    if args.quick:
        args.train_shards, args.vae_steps, args.unet_steps, args.log_every = "0", 20, 20, 5
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    from dgaug.models.tokenizer import clip_tokenizer

    log = Logger(args.log)
    t_all = time.time()
    paths = shard_paths(args.data, args.train_shards)
    data = load_shards(paths)
    images = data["images"]
    t_data = time.time() - t_all
    log(
        event="data",
        shards=[p.name for p in paths],
        images=int(images.shape[0]),
        domains=sorted(set(data["domains"])),
        labels=sorted(set(data["labels"])),
        sec=round(t_data, 1),
        args={k: str(v) for k, v in vars(args).items()},
    )

    vae, vae_steps, t_vae = train_vae(args, images, log)
    t1 = time.time()
    mean, std = encode_all(vae, images)
    # SD's recipe: scale latents to unit variance, measured on samples of the posterior.
    scale = float(1.0 / (mean + std * torch.randn_like(mean)).std())
    t_enc = time.time() - t1
    log(
        event="latents",
        shape=list(mean.shape[1:]),
        scaling_factor=round(scale, 5),
        posterior_std=round(float(std.mean()), 5),
        sec=round(t_enc, 1),
    )

    tokenizer = clip_tokenizer()

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    ids, empty_ids = tokenize(data["captions"]), tokenize([""])[0]
    unet, text, unet_steps, t_unet = train_unet(args, mean, std, scale, ids, empty_ids, log)

    t2 = time.time()
    save(args.out, vae, unet, text, tokenizer, scale)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log(
        event="done",
        vae_steps=vae_steps,
        unet_steps=unet_steps,
        params={"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text)},
        seconds={
            "data": round(t_data, 1),
            "vae": round(t_vae, 1),
            "encode": round(t_enc, 1),
            "unet": round(t_unet, 1),
            "save": round(time.time() - t2, 1),
            "total": round(time.time() - t_all, 1),
        },
        folder_mb=round(size / 1e6, 2),
        out=str(args.out),
    )


if __name__ == "__main__":
    main()
