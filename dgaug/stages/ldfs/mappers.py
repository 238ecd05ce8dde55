"""The mappers from a source feature to a target domain's: LDFS shared, per-domain, and LADS.

LADS's mapper is its `MLP` (methods/augmentations.py:242-252): g(f) = fc2(relu(fc1(f))), D ->
hidden -> D, not residual; its output, normalized, is the synthesized feature (:411-414). (The
residual `ResMLP` of its methods/predictors.py is not used by LADS's augmentation.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from dgaug.stages.ldfs.config import LdfsConfig


def _uniform_(t: torch.Tensor, fan_in: int, generator: torch.Generator) -> None:
    # nn.Linear's default init (kaiming_uniform with a=sqrt(5) gives U(+-1/sqrt(fan_in)) for both
    # weight and bias), drawn from our generator instead of the global RNG.
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        t.copy_(torch.empty(t.shape).uniform_(-bound, bound, generator=generator))


class SharedMapper(nn.Module):
    """LDFS, one mapper for all targets: f_hat = normalize(f + g([f, e_k])), g = D*2 -> h -> D."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.dim = dim
        # skip_init: nn.Linear's own init would draw from (and advance) the global RNG.
        self.fc1 = skip_init(nn.Linear, 2 * dim, hidden)
        self.fc2 = skip_init(nn.Linear, hidden, dim)
        for layer in (self.fc1, self.fc2):
            if generator is None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            else:
                _uniform_(layer.weight, layer.in_features, generator)
                _uniform_(layer.bias, layer.in_features, generator)

    def raw(self, f: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """f: [B, D], cond (e~_k per target and row): [K, B, D] -> f + g([f, e]): [K, B, D]."""
        if cond is None:
            raise ValueError("the shared mapper needs the targets' text embeddings")
        w = self.fc1.weight
        # [f, e] @ W1.T split in two: the f half is computed once for all targets.
        h = F.relu(F.linear(f, w[:, : self.dim], self.fc1.bias) + cond @ w[:, self.dim :].T)
        return f + self.fc2(h)

    def forward(self, f: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return F.normalize(self.raw(f, cond), dim=-1)


class PerDomainMapper(nn.Module):
    """One MLP D -> h -> D per target, stored stacked ([K, ...]) so all targets run in one bmm.

    residual: f_hat = normalize(f + g_k(f)) (LDFS per_domain); else normalize(g_k(f)) (LADS).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_targets: int,
        residual: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.w1 = nn.Parameter(torch.zeros(n_targets, hidden, dim))
        self.b1 = nn.Parameter(torch.zeros(n_targets, hidden))
        self.w2 = nn.Parameter(torch.zeros(n_targets, dim, hidden))
        self.b2 = nn.Parameter(torch.zeros(n_targets, dim))
        if generator is not None:
            for k in range(n_targets):  # each target's network drawn in turn, as if built alone
                _uniform_(self.w1[k], dim, generator)
                _uniform_(self.b1[k], dim, generator)
                _uniform_(self.w2[k], hidden, generator)
                _uniform_(self.b2[k], hidden, generator)

    def raw(self, f: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """f: [B, D] (or [K, B, D], a batch per target) -> g_k(f) (+ f if residual): [K, B, D]."""
        fk = f.expand(self.w1.shape[0], *f.shape[-2:])
        h = F.relu(torch.baddbmm(self.b1[:, None, :], fk, self.w1.transpose(1, 2)))
        out = torch.baddbmm(self.b2[:, None, :], h, self.w2.transpose(1, 2))
        return fk + out if self.residual else out

    def forward(self, f: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.raw(f, cond), dim=-1)


def build_mapper(cfg: LdfsConfig, dim: int, generator: torch.Generator | None = None) -> nn.Module:
    """The mapper `cfg` asks for, initialized from `generator` (None: zeros, to load a state)."""
    if cfg.method == "lads":
        return PerDomainMapper(dim, cfg.hidden, len(cfg.targets), False, generator)
    if cfg.mapper == "per_domain":
        return PerDomainMapper(dim, cfg.hidden, len(cfg.targets), True, generator)
    return SharedMapper(dim, cfg.hidden, generator)


def load_mapper(state: dict[str, torch.Tensor], cfg: LdfsConfig, dim: int) -> nn.Module:
    """Rebuild a mapper from `FitResult.state` (e.g. read back from safetensors), in eval mode."""
    # float64 states (fits on float64 features, in tests) stay float64; anything else is float32.
    dtype = torch.float64 if next(iter(state.values())).dtype == torch.float64 else torch.float32
    mapper = build_mapper(cfg, dim).to(dtype)
    mapper.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return mapper.eval()
