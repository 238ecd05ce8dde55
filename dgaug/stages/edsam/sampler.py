"""The ED-SAM recipe on a batch of source images: encode once, transport, denoise, decode; batched."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dgaug.core.hashing import derive_seed
from dgaug.stages.edsam.config import EdsamConfig
from dgaug.stages.edsam.samplers import STOCHASTIC, denoise
from dgaug.stages.edsam.transport import (
    ddim_invert,
    ddim_timesteps,
    draw_alpha,
    half_alpha_bar_step,
    predict_x0,
    sample_generator,
    sample_seed,
    transport,
)


@dataclass
class Generated:
    """One generated sample: which source and index, its pixels, and what made it."""

    source_index: int
    j: int
    image: np.ndarray  # uint8 [H, W, 3]
    record: dict[str, Any]


@dataclass
class _Job:
    """One sample to make: its draws from its own seeded generator, then the chosen alpha."""

    src: int
    j: int
    seed: int
    eps: torch.Tensor  # [C, h, w] float32, CPU
    candidates: list[torch.Tensor]  # K alphas, float64, CPU
    alpha: torch.Tensor | None = None
    scores: list[float] = field(default_factory=list)
    chosen: int = 0
    loss: float | None = None
    refined: bool = False


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def alpha_record(alpha: torch.Tensor) -> float | list[float] | dict[str, float]:
    """What a sample's json says of α: the number, one per channel, or a summary per element."""
    if alpha.dim() == 0:
        return float(alpha)
    if alpha.shape[1:] == (1, 1):
        return [float(a) for a in alpha.flatten()]
    return {"mean": float(alpha.mean()), "min": float(alpha.min()), "max": float(alpha.max())}


def contrastive_loss(
    image_feats: torch.Tensor, text_feats: torch.Tensor, own: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Per image: the InfoNCE loss against its own caption among the group's captions.

    L_i = −log softmax_j(s · ⟨f_i, g_j⟩)[own_i] over the group's caption embeddings g_j (unit norm,
    s the reference CLIP's logit scale), the image-to-text half of CLIP's loss. With a group of one
    caption there are no negatives and L_i = −⟨f_i, g_own⟩ (the negative cosine similarity).
    """
    sims = image_feats @ text_feats.T
    if text_feats.shape[0] == 1:
        return -sims[:, 0]
    return F.cross_entropy(logit_scale * sims, own, reduction="none")


class EdsamSampler:
    """Runs the recipe of one EdsamConfig with a loaded LDM (and a reference CLIP for `worst`)."""

    def __init__(self, ldm: Any, cfg: EdsamConfig, seed: int, clip: Any = None):
        if cfg.objective == "worst" and clip is None:
            raise ValueError("objective worst needs a reference CLIP")
        self.ldm, self.cfg, self.seed, self.clip = ldm, cfg, seed, clip
        self.ac = ldm.alphas_cumprod.double().cpu()
        last = int(ldm.num_train_timesteps) - 1
        self.start_step = half_alpha_bar_step(self.ac) if cfg.start == "latent" else last
        self.timesteps = ddim_timesteps(self.start_step, cfg.steps)
        self.tiny = bool(ldm.tiny or (clip is not None and clip.tiny))
        self._uncond: torch.Tensor | None = None
        self._loss_kind = "infonce"  # of the current batch: "neg_cos" for a batch of one image
        self.seconds: dict[str, float] = {}

    # -- pieces
    def _time(self, name: str, t0: float) -> None:
        if self.ldm.device.type == "cuda":  # kernels run ahead of Python: wait, once per batch
            torch.cuda.synchronize(self.ldm.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def uncond(self) -> torch.Tensor:
        """The unconditional row's conditioning (the empty caption's embedding; zeros for
        SDXL), computed once per sampler."""
        if self._uncond is None:
            self._uncond = self.ldm.encode_unconditional()
        return self._uncond

    def _eps_fn(self, cond: torch.Tensor, guidance: float):
        uncond = self.uncond().expand(cond.shape[0], -1, -1) if guidance != 1.0 else None

        def eps(z: torch.Tensor, t: int) -> torch.Tensor:
            tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
            return self.ldm.predict_noise(z, tt, cond, uncond, guidance)

        return eps

    def _draw(self, key: str, src: int, j: int, latent_shape: Sequence[int]) -> _Job:
        """ε first, then the K candidate α: `random` uses candidate 0 of the very draws `worst`
        chooses among, and ρ = 0 or `none` leave ε unchanged."""
        cfg = self.cfg
        seed = sample_seed(self.seed, key, j)
        g = sample_generator(seed)
        eps = torch.randn(tuple(latent_shape), generator=g, dtype=torch.float32)
        k = cfg.candidates if cfg.objective == "worst" else 1
        rho = 0.0 if cfg.objective == "none" else cfg.rho
        cands = [draw_alpha(g, rho, cfg.alpha, latent_shape) for _ in range(k)]
        return _Job(src, j, seed, eps, cands)

    def _stack(self, alphas: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-sample alphas ([], [C,1,1] or [C,H,W]) as one float32 batch that broadcasts."""
        rows = [a.reshape(1, 1, 1) if a.dim() == 0 else a for a in alphas]
        return torch.stack(rows).to(device=self.ldm.device, dtype=torch.float32)

    def _transport(self, z_s: torch.Tensor, jobs: list[_Job], alphas) -> torch.Tensor:
        src = torch.tensor([jb.src for jb in jobs], device=z_s.device)
        eps = torch.stack([jb.eps for jb in jobs]).to(z_s.device)
        alpha = alphas if torch.is_tensor(alphas) else self._stack(alphas)
        return transport(z_s[src], alpha, eps)

    # -- the recipe
    @torch.no_grad()
    def generate(
        self, pixels: torch.Tensor, captions: Sequence[str], keys: Sequence[str]
    ) -> list[Generated]:
        """M samples for each source image ([N,3,S,S] in [−1, 1]), in (image, j) order."""
        cfg, ldm = self.cfg, self.ldm
        bs = cfg.batch_size
        n = len(keys)
        t0 = time.perf_counter()
        # Once per source image, whatever M is: the VAE encode and the caption's embedding.
        z0 = torch.cat([ldm.encode_images(pixels[s].to(ldm.device)) for s in _chunks(n, bs)])
        cond = torch.cat([ldm.encode_text(list(captions[s])) for s in _chunks(n, bs)])
        self._time("encode", t0)
        t0 = time.perf_counter()
        if cfg.start == "inverted":
            # Inversion with the caption and no guidance (guided inversion drifts), once per image.
            z_s = torch.cat(
                [
                    ddim_invert(z0[s], self._eps_fn(cond[s], 1.0), self.ac, self.timesteps)
                    for s in _chunks(n, bs)
                ]
            )
        else:
            z_s = z0
        self._time("invert", t0)
        shape = tuple(z0.shape[1:])
        jobs = [
            self._draw(keys[i], i, j, shape) for i in range(n) for j in range(cfg.samples_per_image)
        ]
        for jb in jobs:
            jb.alpha = jb.candidates[0]
        if cfg.objective == "worst":
            t0 = time.perf_counter()
            self._choose_worst(z_s, cond, jobs, captions)
            self._time("score", t0)

        out: list[Generated] = []
        for s in _chunks(len(jobs), bs):
            part = jobs[s]
            t0 = time.perf_counter()
            z = self._transport(z_s, part, [jb.alpha for jb in part])
            c = cond[torch.tensor([jb.src for jb in part], device=cond.device)]
            gens = None
            if cfg.sampler in STOCHASTIC:
                # The sampler's noise comes from the sample's own seed, not from the batch.
                gens = [sample_generator(derive_seed(jb.seed, "sampler", 0)) for jb in part]
            z = denoise(
                cfg.sampler,
                z,
                self._eps_fn(c, cfg.guidance),
                self.ac,
                self.timesteps,
                ldm.scheduler.config,
                gens,
            )
            self._time("denoise", t0)
            t0 = time.perf_counter()
            x = ldm.decode(z)
            images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            self._time("decode", t0)
            for jb, im in zip(part, images, strict=True):
                out.append(Generated(jb.src, jb.j, im, self._record(keys[jb.src], jb)))
        return out

    def _record(self, key: str, jb: _Job) -> dict[str, Any]:
        cfg = self.cfg
        rec: dict[str, Any] = {
            "source_key": key,
            "sample_index": jb.j,
            "seed": jb.seed,
            "rho": cfg.rho,
            "alpha": alpha_record(jb.alpha),
            "alpha_kind": cfg.alpha,
            "start": cfg.start,
            "start_step": self.start_step,
            "objective": cfg.objective,
            "model": self.ldm.model_id,
            "reference_clip": self.clip.model_id if cfg.objective == "worst" else None,
            "tiny_random": self.tiny,
            "sampler": cfg.sampler,
            "lora": cfg.lora,
            "decoder": f"tiny:{self.ldm.tiny_decoder_id}" if cfg.decoder == "tiny" else "vae",
            "steps": len(self.timesteps) - 1,
            "guidance": cfg.guidance,
            "image_size": cfg.image_size,
        }
        if cfg.objective == "worst":
            rec["reference_loss"] = jb.loss
            rec["reference_loss_kind"] = self._loss_kind
            rec["candidate_scores"] = jb.scores
            rec["chosen_candidate"] = jb.chosen
            rec["refined"] = jb.refined
        return rec

    # -- objective `worst`
    def _loss(
        self,
        z_s: torch.Tensor,
        cond: torch.Tensor,
        text: torch.Tensor,
        jobs: list[_Job],
        alpha: torch.Tensor,
    ) -> torch.Tensor:
        """The reference CLIP's contrastive loss of the one-step estimate x̂0 at the start step."""
        ldm, f = self.ldm, self.ldm.vae_scale_factor
        t = self.start_step
        z_t = self._transport(z_s, jobs, alpha)
        src = torch.tensor([jb.src for jb in jobs], device=cond.device)
        eps = ldm.predict_noise(
            z_t, torch.full((len(jobs),), t, dtype=torch.long, device=z_t.device), cond[src]
        )
        x0 = predict_x0(z_t, eps, float(self.ac[t]))
        side = max(1, self.cfg.score_size // f)
        if side < x0.shape[-1]:
            x0 = F.interpolate(x0, size=(side, side), mode="bilinear", antialias=True)
        img = ((ldm.decode(x0, grad=torch.is_grad_enabled()) + 1) / 2).clamp(0, 1)
        feats = self.clip.encode_images(img)
        return contrastive_loss(feats, text, src.to(feats.device), float(self.clip.logit_scale))

    def _choose_worst(
        self, z_s: torch.Tensor, cond: torch.Tensor, jobs: list[_Job], captions: Sequence[str]
    ) -> None:
        """Score the K candidates of every sample, keep the highest loss, then maybe refine it."""
        cfg = self.cfg
        text = self.clip.encode_text(list(captions))
        self._loss_kind = "infonce" if len(captions) > 1 else "neg_cos"
        rows = [(jb, k) for jb in jobs for k in range(len(jb.candidates))]
        scores: list[float] = []
        for s in _chunks(len(rows), 2 * cfg.batch_size):  # no guidance: one UNet row each
            part = rows[s]
            alpha = self._stack([jb.candidates[k] for jb, k in part])
            loss = self._loss(z_s, cond, text, [jb for jb, _ in part], alpha)
            scores += [float(v) for v in loss.cpu()]
        it = iter(scores)
        for jb in jobs:
            jb.scores = [next(it) for _ in jb.candidates]
            jb.chosen = max(range(len(jb.scores)), key=jb.scores.__getitem__)  # first max
            jb.alpha, jb.loss = jb.candidates[jb.chosen], jb.scores[jb.chosen]
        if cfg.refine_steps:
            for s in _chunks(len(jobs), cfg.batch_size):
                self._refine(z_s, cond, text, jobs[s])

    def _refine(
        self, z_s: torch.Tensor, cond: torch.Tensor, text: torch.Tensor, jobs: list[_Job]
    ) -> None:
        """Projected sign-gradient ascent: α ← clip(α + lr·ρ·sign(∇_α L), −ρ, ρ), best loss kept.

        The box [−ρ, ρ] is an L∞ ball, for which the sign of the gradient is the steepest ascent
        direction. A refined α replaces the chosen candidate only if its loss is strictly higher.
        """
        cfg = self.cfg
        rho, step = cfg.rho, cfg.refine_lr * cfg.rho
        cur = [jb.alpha for jb in jobs]
        for i in range(cfg.refine_steps + 1):
            last = i == cfg.refine_steps
            alpha = self._stack(cur)
            if not last:
                alpha.requires_grad_(True)
            with torch.enable_grad():
                loss = self._loss(z_s, cond, text, jobs, alpha)
                grad = None if last else torch.autograd.grad(loss.sum(), alpha)[0]
            vals = [float(v) for v in loss.detach().cpu()]
            if i > 0:
                for jb, a, v in zip(jobs, cur, vals, strict=True):
                    if v > jb.loss:
                        jb.alpha, jb.loss, jb.refined = a, v, True
            if grad is not None:
                g = grad.detach().sign().double().cpu()
                cur = [
                    (a + step * gi.reshape(a.shape)).clamp(-rho, rho)
                    for a, gi in zip(cur, g, strict=True)
                ]
