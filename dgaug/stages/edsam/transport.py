"""ED-SAM's transport transformation, per-sample seeds, and deterministic DDIM (sampling, inversion)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from dgaug.core.hashing import derive_seed

AlphaKind = Literal["scalar", "channel", "element"]
# eps_fn(z_t, t) -> the noise prediction at integer timestep t (the same t for the whole batch).
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]

SQRT2 = math.sqrt(2.0)


# ------------------------------------------------------------------------------------------ seeds


def sample_seed(seed: int, key: str, j: int) -> int:
    """The seed of sample j of source `key`: first 8 bytes of sha256(f"{seed}/{key}/{j}"), as int63.

    It depends on nothing else (not on the batch, the shard or the worker), so a sample is the same
    whichever run, resume or executor produces it.
    """
    return derive_seed(seed, key, j)


def sample_generator(seed: int) -> torch.Generator:
    """A CPU generator: draws are the same on any device, then moved where they are used."""
    return torch.Generator(device="cpu").manual_seed(seed)


# -------------------------------------------------------------------------------------- transport


def alpha_shape(kind: AlphaKind, latent_shape: Sequence[int]) -> tuple[int, ...]:
    c, h, w = latent_shape
    return {"scalar": (), "channel": (c, 1, 1), "element": (c, h, w)}[kind]


def draw_alpha(
    generator: torch.Generator, rho: float, kind: AlphaKind, latent_shape: Sequence[int]
) -> torch.Tensor:
    """α ~ U(−ρ, ρ), float64, of shape [] (scalar), [C,1,1] (channel) or [C,H,W] (element).

    α = (2u − 1)·ρ with u ~ U[0, 1), clamped to [−ρ, ρ] so that |α| ≤ ρ holds exactly, whatever the
    rounding. With ρ = 0 it is 0 but consumes the generator the same, so later draws do not move.
    """
    u = torch.rand(alpha_shape(kind, latent_shape), generator=generator, dtype=torch.float64)
    return ((2.0 * u - 1.0) * rho).clamp(-rho, rho)


def transport(z_s: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """T(z_s, ρ) = (z_s + N(α·√2, I)) / √2 = (z_s + α·√2 + ε) / √2, with ε ~ N(0, I) given as `noise`.

    For z_s ~ N(μ, I) the result is N((μ + α√2)/√2, I): unit variance is kept, and for μ = 0 the
    mean is α. With z_s = z0 this is forward diffusion to ᾱ = ½ (√½·z0 + √½·ε) shifted by α.
    `alpha` broadcasts against z_s ([], [C,1,1], [C,H,W], or batched with a leading dim).
    """
    return (z_s + alpha.to(z_s.dtype) * SQRT2 + noise) / SQRT2


def half_alpha_bar_step(alphas_cumprod: torch.Tensor) -> int:
    """t* = argmin_t |ᾱ_t − ½|: the step at which forward diffusion mixes signal and noise equally.

    For Stable Diffusion's scaled-linear schedule (β from 0.00085 to 0.012 over 1000 steps) it is
    about 354.
    """
    return int(torch.argmin((alphas_cumprod.double() - 0.5).abs()).item())


# ------------------------------------------------------------------------------------------- DDIM


def ddim_timesteps(start_step: int, steps: int) -> list[int]:
    """`steps` intervals from start_step down to 0: [start_step, ..., 0], evenly spaced, unique.

    The noise predictor runs at every entry but the last; each step moves to the next entry. More
    steps than start_step allows are cut to one per timestep.
    """
    if start_step < 0 or steps < 1:
        raise ValueError(f"need start_step >= 0 and steps >= 1, got {start_step}, {steps}")
    steps = max(1, min(steps, start_step))
    ts = [math.floor(start_step * (steps - i) / steps + 0.5) for i in range(steps + 1)]
    out: list[int] = []
    for t in ts:  # rounding can repeat a value only when steps == start_step; keep them unique
        if not out or t < out[-1]:
            out.append(t)
    return out


def ddim_update(z: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """The deterministic DDIM move (η = 0) from noise level ᾱ_from to ᾱ_to, either direction.

    x̂0 = (z − √(1−ᾱ_from)·ε) / √ᾱ_from;   z' = √ᾱ_to·x̂0 + √(1−ᾱ_to)·ε.
    Sampling goes to a larger ᾱ (less noise); inversion uses the same formula towards a smaller one.
    """
    x0 = predict_x0(z, eps, a_from)
    return math.sqrt(a_to) * x0 + math.sqrt(1.0 - a_to) * eps


def predict_x0(z_t: torch.Tensor, eps: torch.Tensor, a_t: float) -> torch.Tensor:
    """The one-step estimate x̂0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
    return (z_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)


def ddim_sample(
    z: torch.Tensor, eps_fn: EpsFn, alphas_cumprod: torch.Tensor, timesteps: Sequence[int]
) -> torch.Tensor:
    """Denoise z, at noise level timesteps[0], along the descending `timesteps` to timesteps[-1]."""
    ac = alphas_cumprod.double()
    for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=True):
        eps = eps_fn(z, t)
        z = ddim_update(z, eps, float(ac[t]), float(ac[t_next]))
    return z


def ddim_invert(
    z: torch.Tensor, eps_fn: EpsFn, alphas_cumprod: torch.Tensor, timesteps: Sequence[int]
) -> torch.Tensor:
    """DDIM inversion: z at timesteps[-1] (a clean latent at step 0) noised up to timesteps[0].

    The same update run forward in t, with ε predicted at the lower step of each pair. For a noise
    predictor that is exact (consistent with one x0), ddim_sample undoes it up to rounding.
    """
    ac = alphas_cumprod.double()
    up = list(reversed(timesteps))
    for t, t_next in zip(up[:-1], up[1:], strict=True):
        eps = eps_fn(z, t)
        z = ddim_update(z, eps, float(ac[t]), float(ac[t_next]))
    return z
