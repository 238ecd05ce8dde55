"""transformers 4.x's `AdamW`, which LADS trains with, written out: transformers 5 no longer ships it.

It differs from `torch.optim.AdamW` in three ways that change the weights LADS's recipe gives:
eps is added to sqrt(v) before the bias correction (torch adds it after), the bias corrections are
folded into the step size lr * sqrt(1 - b2^t) / (1 - b1^t), and the decoupled decay
p -= lr * wd * p is applied after the Adam update, to the updated weights (torch decays first).
Its eps defaults to 1e-6 (torch: 1e-8); LADS passes none. Reference: transformers v4.26.1,
src/transformers/optimization.py, class AdamW (lines 273-381; the step at 356-381).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class HFAdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay as transformers 4.x's `AdamW` computes it (see the module)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0: {lr}, {eps}, {weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1): {betas}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("HFAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = v.sqrt().add_(eps)  # eps before any bias correction
                step_size = lr
                if group["correct_bias"]:
                    step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(m, denom, value=-step_size)
                if wd > 0:  # decay after the update, of the updated weights
                    p.add_(p, alpha=-lr * wd)
        return loss
