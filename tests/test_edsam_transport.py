"""ED-SAM's pure parts: α bounds, the transport's moments, SD's half-ᾱ step, DDIM and its inverse, seeds."""

from __future__ import annotations

import pytest
import torch

from dgaug.stages.edsam.config import EdsamConfig
from dgaug.stages.edsam.transport import (
    ddim_invert,
    ddim_sample,
    ddim_timesteps,
    ddim_update,
    draw_alpha,
    half_alpha_bar_step,
    sample_generator,
    sample_seed,
    transport,
)

LATENT = (4, 8, 8)


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule, written out (no diffusers, no download)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@pytest.mark.parametrize("kind", ["scalar", "channel", "element"])
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.5, 2.0])
def test_alpha_never_exceeds_rho(kind: str, rho: float) -> None:
    g = sample_generator(7)
    draws = torch.stack([draw_alpha(g, rho, kind, LATENT) for _ in range(2000)])
    expected = {"scalar": (), "channel": (4, 1, 1), "element": LATENT}[kind]
    assert draws.shape[1:] == expected
    assert draws.abs().max() <= rho
    if rho > 0:  # and it spreads over the interval, both signs
        assert draws.min() < -0.9 * rho and draws.max() > 0.9 * rho
        assert abs(float(draws.mean())) < 0.05 * rho


def test_transport_keeps_unit_variance_and_shifts_the_mean_by_alpha() -> None:
    g = torch.Generator().manual_seed(0)
    n = 1_000_000  # standard error of the mean 1e-3, of the std ~7e-4
    z_s = torch.randn(n, generator=g)
    eps = torch.randn(n, generator=g)
    for a in (-0.5, 0.0, 0.25, 0.5):
        out = transport(z_s, torch.tensor(a, dtype=torch.float64), eps)
        assert float(out.mean()) == pytest.approx(a, abs=5e-3)
        assert float(out.std()) == pytest.approx(1.0, abs=5e-3)


def test_transport_of_a_clean_latent_is_forward_diffusion_to_half_alpha_bar() -> None:
    z0, eps = torch.randn(2, 4, 8, 8).unbind(0)
    out = transport(z0, torch.tensor(0.0), eps)
    assert torch.allclose(out, 0.5**0.5 * z0 + 0.5**0.5 * eps, atol=1e-6)
    per_channel = torch.tensor([0.1, -0.2, 0.3, -0.4]).view(4, 1, 1)
    assert torch.allclose(transport(z0, per_channel, eps) - out, per_channel.expand(4, 8, 8))


def test_half_alpha_bar_step_of_sd_schedule_is_354() -> None:
    ac = sd_alphas_cumprod()
    t = half_alpha_bar_step(ac)
    assert t == 354
    assert abs(float(ac[t]) - 0.5) < 2e-3


def test_ddim_timesteps_descend_from_start_to_zero() -> None:
    ts = ddim_timesteps(354, 20)
    assert ts[0] == 354 and ts[-1] == 0 and len(ts) == 21
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert ddim_timesteps(999, 4) == [999, 749, 500, 250, 0]
    assert ddim_timesteps(3, 10) == [3, 2, 1, 0]  # no more steps than timesteps


def test_ddim_update_is_its_own_inverse_for_the_same_noise() -> None:
    z, eps = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64).unbind(0)
    up = ddim_update(z, eps, 0.9, 0.2)
    assert torch.allclose(ddim_update(up, eps, 0.2, 0.9), z, atol=1e-12)


def test_ddim_inversion_then_sampling_returns_the_latent_for_an_exact_predictor() -> None:
    ac = sd_alphas_cumprod()
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def exact_eps(z: torch.Tensor, t: int) -> torch.Tensor:
        # The true noise of z = √ᾱ x0 + √(1−ᾱ) ε for this x0: a perfect denoiser.
        a = float(ac[t])
        return (z - a**0.5 * x0) / (1 - a) ** 0.5

    ts = ddim_timesteps(999, 10)
    z0 = ac[0] ** 0.5 * x0  # x0 at step 0 (no noise drawn)
    z_t = ddim_invert(z0, exact_eps, ac, ts)
    assert torch.allclose(z_t, ac[999] ** 0.5 * x0, atol=1e-9)
    assert torch.allclose(ddim_sample(z_t, exact_eps, ac, ts), z0, atol=1e-9)

    # Any predictor whose output does not depend on z (here a constant ε) is also inverted exactly.
    const = torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def const_eps(z: torch.Tensor, t: int) -> torch.Tensor:
        return const

    z = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    back = ddim_sample(ddim_invert(z, const_eps, ac, ts), const_eps, ac, ts)
    assert torch.allclose(back, z, atol=1e-9)


def test_sample_seeds_are_deterministic_and_distinct() -> None:
    assert sample_seed(0, "0000000001", 3) == sample_seed(0, "0000000001", 3)
    seeds = {sample_seed(s, f"{k:010d}", j) for s in (0, 1) for k in range(200) for j in range(10)}
    assert len(seeds) == 2 * 200 * 10
    assert all(0 <= s < 2**63 for s in seeds)
    a = torch.randn(4, generator=sample_generator(sample_seed(0, "k", 0)))
    b = torch.randn(4, generator=sample_generator(sample_seed(0, "k", 0)))
    assert torch.equal(a, b)


def test_effective_config_drops_settings_without_effect() -> None:
    random = EdsamConfig(objective="random", candidates=7).effective()
    assert random["candidates"] is None and random["reference_clip"] is None
    worst = EdsamConfig(objective="worst", candidates=7).effective()
    assert worst["candidates"] == 7 and worst["refine_lr"] is None
    assert "enabled" not in worst and "allow_cpu" not in worst
    assert worst["batch_size"] == 8 and worst["device"] == "auto"  # these change pixels: kept
    with pytest.raises(ValueError, match="multiple of 8"):
        EdsamConfig(image_size=100)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "lcm"])
@pytest.mark.parametrize(("start", "steps"), [(999, 1), (999, 4), (354, 20)])
def test_scheduler_samplers_return_the_latent_for_an_exact_predictor(
    sampler: str, start: int, steps: int
) -> None:
    """With a noise predictor consistent with one x0, each diffusers sampler on our timesteps
    (counted from the start step) ends at that x0: the schedule and the σ-space conversion are
    right. (Our DDIM ends at step 0's noise level, as diffusers' DDIM does for SD.)"""
    from diffusers import DDIMScheduler

    from dgaug.models.ldm_presets import ddim_scheduler
    from dgaug.stages.edsam.samplers import denoise
    from dgaug.stages.edsam.transport import ddim_timesteps, sample_generator

    config = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    ac = ddim_scheduler(config).alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)

    def eps_fn(z: torch.Tensor, t: int) -> torch.Tensor:
        a = float(ac[t])
        return (z - a**0.5 * x0) / (1 - a) ** 0.5

    a = float(ac[start])
    z = a**0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=g)
    gens = [sample_generator(i) for i in range(3)]
    out = denoise(sampler, z, eps_fn, ac, ddim_timesteps(start, steps), config, gens)
    assert float((out - x0).abs().max()) < 1e-4
