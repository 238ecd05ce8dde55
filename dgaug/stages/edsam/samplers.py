"""The denoising samplers ED-SAM runs from the start step: our DDIM, or a diffusers scheduler."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from dgaug.stages.edsam.transport import EpsFn, ddim_sample

SAMPLERS: tuple[str, ...] = ("ddim", "dpmpp_2m", "euler", "lcm")
# Samplers that draw noise between steps: each sample gets its own generator, so a sample's
# pixels do not depend on the batch it was made in.
STOCHASTIC = frozenset({"lcm"})


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh diffusers scheduler for `name` from the model's scheduler config; None for `ddim`
    (our own update, which also inverts exactly). Every one takes ε: the LDM converts a
    v-prediction model's output to ε before a scheduler sees it."""
    if name == "ddim":
        return None
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    common = {"prediction_type": "epsilon"}
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            final_sigmas_type="zero",  # end at the clean latent, as DDIM does
            lower_order_final=True,
            **common,
        )
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config, final_sigmas_type="zero", **common)
    if name == "lcm":
        return LCMScheduler.from_config(config, **common)
    raise ValueError(f"unknown sampler {name!r}; one of {', '.join(SAMPLERS)}")


def denoise(
    name: str,
    z: torch.Tensor,
    eps_fn: EpsFn,
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int],
    scheduler_config: Any,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Denoise z, at noise level timesteps[0], down the descending `timesteps` (ending at 0) to a
    clean latent. The predictor runs at every entry but the last, whatever the sampler, so
    `steps` costs the same UNet work for each.

    The timesteps are ours for every sampler (evenly spaced from the start step: from the last
    step this is diffusers' "trailing" spacing, the schedule SD-Turbo-style models need), handed
    to the scheduler as a custom schedule. `generators`: one per row, for stochastic samplers.
    """
    if name == "ddim":
        return ddim_sample(z, eps_fn, alphas_cumprod, timesteps)
    scheduler = make_scheduler(name, scheduler_config)
    ts = [int(t) for t in timesteps[:-1]]
    # LCM logs a warning for every schedule off its distillation grid (any latent start, most
    # step counts): the grid is a training detail, and the warning would repeat every batch.
    quiet = logging.getLogger(type(scheduler).__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        scheduler.set_timesteps(timesteps=ts, device=z.device)
    finally:
        quiet.setLevel(level)
    if name == "euler":
        # Euler works in σ space: x = z_t / √ᾱ_t, and scale_model_input maps it back to z_t.
        z = z / float(alphas_cumprod[ts[0]]) ** 0.5
    kwargs: dict[str, Any] = {}
    if name in STOCHASTIC:
        if generators is None or len(generators) != z.shape[0]:
            raise ValueError(f"sampler {name} needs one generator per row")
        kwargs["generator"] = list(generators)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(z, t)
        eps = eps_fn(model_in, int(t))
        z = scheduler.step(eps, t, z, return_dict=True, **kwargs).prev_sample
    return z
