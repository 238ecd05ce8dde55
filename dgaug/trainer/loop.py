"""The optimizer loop every mode shares: AdamW, warm-up + cosine, accumulation, checkpoints, resume."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from dgaug.trainer.checkpoint import latest_checkpoint, remove_temporaries, save_checkpoint

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a mode gives the loop. Batches are a pure function of (epoch, index): that is what lets
    a resumed run see exactly the batches an uninterrupted one would."""

    def micro_batches_per_epoch(self) -> int: ...

    def parameters(self) -> dict[str, torch.nn.Parameter]: ...

    def loss(self, epoch: int, index: int) -> torch.Tensor: ...


@dataclass
class LoopSettings:
    epochs: int
    max_steps: int | None
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_steps: int
    checkpoint_every: int
    keep_checkpoints: int


@dataclass
class FitResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean micro-batch loss per optimizer step
    resumed_from: int = 0


def total_steps(task: Task, s: LoopSettings) -> int:
    steps = s.epochs * task.micro_batches_per_epoch() // s.grad_accum
    if s.max_steps is not None:
        steps = min(steps, s.max_steps)
    return steps


def learning_rate(step: int, total: int, s: LoopSettings) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to zero at `total` (open_clip's shape)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(1, total - s.warmup_steps)
    return 0.5 * s.lr * (1 + math.cos(math.pi * (step - s.warmup_steps) / span))


def _optimizer(params: dict[str, torch.nn.Parameter], s: LoopSettings) -> torch.optim.AdamW:
    # As open_clip: no weight decay on gains, biases, embeddings' scale (1-d) or the logit scale.
    decay = [p for n, p in params.items() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in params.items() if not (p.ndim >= 2 and "logit_scale" not in n)]
    groups = [{"params": decay, "weight_decay": s.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    # foreach=False: the same arithmetic order on every run, so a resume matches bit for bit.
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.98), eps=1e-6, foreach=False)


def fit(
    task: Task,
    settings: LoopSettings,
    output: Path,
    fingerprint: str,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
) -> FitResult:
    """Train `task` to the end, resuming from the newest checkpoint in `output` when there is one.

    Checkpoints every `checkpoint_every` optimizer steps and at the end hold the weights, the
    optimizer state and the losses so far; batches depend only on (epoch, index) and the schedule
    only on the step, so the resumed run continues exactly as the uninterrupted one would have.
    """
    params = task.parameters()
    optimizer = _optimizer(params, settings)
    total = total_steps(task, settings)
    if total < 1:
        raise ValueError(
            f"{task.micro_batches_per_epoch()} micro-batch(es) per epoch with grad_accum "
            f"{settings.grad_accum} make no optimizer step; lower batch_size or grad_accum"
        )
    remove_temporaries(output)
    result = FitResult(steps=total)
    ckpt = latest_checkpoint(output, fingerprint)
    if ckpt is not None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(ckpt.weights[name])
        optimizer.load_state_dict(ckpt.optimizer)
        result.losses = list(ckpt.meta.get("losses", []))[: ckpt.step]
        result.resumed_from = ckpt.step
        log.info("resuming from the checkpoint of step %d of %d", ckpt.step, total)

    per_epoch = task.micro_batches_per_epoch()
    for step in range(result.resumed_from, total):
        lr = learning_rate(step, total, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for a in range(settings.grad_accum):
            epoch, index = divmod(step * settings.grad_accum + a, per_epoch)
            loss = task.loss(epoch, index) / settings.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        result.losses.append(step_loss)
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == total:
            save_checkpoint(
                output,
                done,
                {n: p.detach() for n, p in params.items()},
                optimizer.state_dict(),
                {"fingerprint": fingerprint, "losses": result.losses, "total_steps": total},
                keep=settings.keep_checkpoints,
            )
        if on_step is not None:
            on_step(done, total, step_loss)
    if ckpt is not None and ckpt.step >= total:
        log.info("training already finished (step %d); evaluating", ckpt.step)
    return result
