"""`fit`: train the LDFS or LADS mapper on real source features, keeping the best epoch's weights.

LADS (Dunlap et al., github.com/lisadunlap/LADS) is the baseline: one MLP per target domain,
trained so that the change it makes to a source image feature points along the per-class text
direction normalize(T_tgt[y] - T_src[y]), while the mapped feature keeps its class (weighted CE
against the class texts). LDFS (arXiv 2405.02586) synthesizes diverse features of unseen domains
from text alone. The paper does not pin every detail; what `method: ldfs` does here is this
project's reconstruction:

- mapper: f_hat = normalize(f + g([f, e_k])), one MLP for all targets (`mapper: shared`), or one
  unconditioned residual MLP per target (`per_domain`). e_k is the text embedding of the target
  description as written in `targets` (e.g. E_T("sketch")), not of a template.
- stochastic text: e~ = normalize(e + sigma * eps), eps ~ N(0, I), fresh every step. The same eps
  moves the target's instance text and the conditioning e_k of that (instance, target), so the
  conditioning tells the mapper which noisy direction to follow and different draws of e~_k at
  synthesis give different features. The source instance text gets its own eps.
- instance directions: Delta_i = normalize(e~(target_k, i) - e~(source, i)); the instance text is
  the caption (caption datasets) or the class text, with one attribute sampled uniformly per
  instance per step (the same attribute in the source and every target text) when an attributes
  mapping is given. Which one is decided with the consistency loss (`consistency`).
- options (issue 18): `condition: instance` conditions the shared mapper on the instance's own
  noisy text at target k instead of e_k (the same vector its direction starts from), in training
  and at synthesis; `attribute_choice: per_image` fixes each image's top-k attributes by CLIP
  similarity of its feature to the source texts "<class text>, <attribute>"; `pairwise:
  anchored` adds the batch variance of cos(f_i, f_hat_i) to L_pr.
- losses: lambda_ld L_ld + lambda_cons L_cons + lambda_pr L_pr, averaged over targets; all
  targets are trained in every step. With noise, the curve's `noise_cos` is the mean cos of the
  noisy and the clean direction: how far sigma turns the direction the mapper learns.
- class weights of the class-consistency CE (both methods): LADS's 1/count scaled to max 1,
  counted over the training split only (LADS methods/augmentations.py:289,327).
- selection (`selection`): the state with the lowest validation loss is kept. `row_mean`: the
  mean over validation rows in a fixed order, with the validation noise and attributes drawn from
  the same seed every epoch so that epochs compare; `lads`: LADS's, the unweighted mean of batch
  losses over the validation split reshuffled every epoch (methods/augmentations.py:295,336-347,
  397). With per-target weights (`per_domain`, `lads`) each target's weights are selected (and
  stopped, with `patience`) on their own, as LADS trains and checkpoints one network per domain;
  the gradient is the sum over targets, so jointly training the independent networks on the same
  batches equals training them one by one.
- optimizer (`optimizer`): torch's AdamW, or transformers 4.x's that LADS uses (`optim`).

LADS's mapper is described in `mappers`; its L_cls uses the class texts "a photo of a {label}"
whatever the source domain (`class_text`), or with `target_class_texts` the target's
(DOM_SPECIFIC_XE). With several source descriptions each image's direction starts from the one
most similar to it (`TextBank.source_texts`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgaug.core.hashing import derive_seed
from dgaug.stages.ldfs.config import LdfsConfig
from dgaug.stages.ldfs.data import SourceFeatures, TextEncoder, check_data
from dgaug.stages.ldfs.losses import (
    caption_contrastive_loss,
    class_consistency_loss,
    lads_class_weights,
    lads_direction_loss,
    local_direction_loss,
    pairwise_loss,
)
from dgaug.stages.ldfs.mappers import PerDomainMapper, SharedMapper, build_mapper
from dgaug.stages.ldfs.optim import HFAdamW
from dgaug.stages.ldfs.texts import TextBank, cpu_generator


@dataclass
class FitResult:
    """A trained mapper's weights (the selected epoch's), its loss curve and what it was fit on."""

    state: dict[str, torch.Tensor]
    curve: list[dict[str, float]]
    best_epoch: int
    info: dict[str, Any]


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, validation rows) of n source rows, each sorted; seeded by `seed` alone."""
    perm = torch.randperm(n, generator=cpu_generator(derive_seed(seed, "split")))
    n_val = int(n * val_fraction)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def epoch_orders(
    train_rows: torch.Tensor, val_rows: torch.Tensor, seed: int, reshuffle_val: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per epoch, (training order, validation order): the rows in the order they are batched.

    The training rows are reshuffled every epoch; the validation rows too with `reshuffle_val`
    (LADS's val DataLoader shuffles, methods/augmentations.py:295), else they keep their order.
    """
    shuffle = cpu_generator(derive_seed(seed, "shuffle"))
    val_shuffle = cpu_generator(derive_seed(seed, "val_shuffle"))
    while True:
        train = train_rows[torch.randperm(len(train_rows), generator=shuffle)]
        val = val_rows
        if reshuffle_val:
            val = val_rows[torch.randperm(len(val_rows), generator=val_shuffle)]
        yield train, val


def initial_mapper(cfg: LdfsConfig, dim: int, seed: int, dtype: torch.dtype) -> nn.Module:
    """The mapper `fit` starts from (nn.Linear's init, drawn from a generator seeded by `seed`)."""
    return build_mapper(cfg, dim, cpu_generator(derive_seed(seed, "init"))).to(dtype)


def make_optimizer(cfg: LdfsConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "hf_adamw":  # LADS methods/augmentations.py:325
        return HFAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _batch_losses(
    mapper: nn.Module,
    bank: TextBank,
    cfg: LdfsConfig,
    f: torch.Tensor,
    rows: torch.Tensor,
    generator: torch.Generator | None,
    class_weights: torch.Tensor | None,
    logit_scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-target total loss [K] and per-target components of one batch (+ `noise_cos`)."""
    y = bank.y[rows] if bank.y is not None else None
    class_text = bank.target_class_text if cfg.target_class_texts else bank.class_text
    if cfg.method == "lads":
        # LADS methods/augmentations.py:375-383
        assert y is not None and class_text is not None
        g_f = mapper.raw(f, None)
        l_dir = lads_direction_loss(f, g_f, bank.lads_directions(f, y), keep_leading=True)
        l_cls = class_consistency_loss(g_f, class_text, y, class_weights, keep_leading=True)
        a = cfg.lads_alpha
        return a * l_dir + (1 - a) * l_cls, {"dir": l_dir, "cls": l_cls}
    shared = isinstance(mapper, SharedMapper)
    delta, cond, noise_cos = bank.step_texts(
        rows, f, generator, shared, instance_condition=cfg.condition == "instance"
    )
    f_hat = mapper(f, cond)
    l_ld = local_direction_loss(f, f_hat, delta, keep_leading=True)
    if y is not None and bank.mode == "class":
        assert class_text is not None
        l_cons = class_consistency_loss(f_hat, class_text, y, class_weights, keep_leading=True)
    else:
        cap = bank.caption_text(rows)
        l_cons = caption_contrastive_loss(f_hat, cap, logit_scale, keep_leading=True)
    l_pr = pairwise_loss(f, f_hat, keep_leading=True, anchored=cfg.pairwise == "anchored")
    total = cfg.lambda_ld * l_ld + cfg.lambda_cons * l_cons + cfg.lambda_pr * l_pr
    parts = {"ld": l_ld, "cons": l_cons, "pr": l_pr}
    if noise_cos is not None:
        parts["noise_cos"] = noise_cos.expand(total.shape)
    return total, parts


def _epoch(
    mapper: nn.Module,
    bank: TextBank,
    cfg: LdfsConfig,
    x: torch.Tensor,
    rows: torch.Tensor,
    generator: torch.Generator,
    class_weights: torch.Tensor | None,
    logit_scale: float,
    optimizer: torch.optim.Optimizer | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One pass over `rows` (training when an optimizer is given); per-target means.

    The mean over batches of the batch losses (`selection: lads`, as LADS's
    methods/augmentations.py:392,397), or over rows (`row_mean`: a short last batch counts less).
    """
    total_sum: torch.Tensor | None = None
    parts_sum: dict[str, torch.Tensor] = {}
    weight_sum = 0
    for start in range(0, len(rows), cfg.batch_size):
        r = rows[start : start + cfg.batch_size]
        with torch.set_grad_enabled(optimizer is not None):
            total, parts = _batch_losses(
                mapper, bank, cfg, x[r], r, generator, class_weights, logit_scale
            )
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            total.sum().backward()  # the sum: independent per-target nets get their own gradient
            optimizer.step()
        w = 1 if cfg.selection == "lads" else len(r)
        weight_sum += w
        total_sum = total.detach() * w + (0 if total_sum is None else total_sum)
        for name, v in parts.items():
            parts_sum[name] = v.detach() * w + parts_sum.get(name, 0)
    assert total_sum is not None
    return total_sum / weight_sum, {k: v / weight_sum for k, v in parts_sum.items()}


def fit(
    data: SourceFeatures,
    text: TextEncoder,
    cfg: LdfsConfig,
    seed: int,
    attributes: dict[str, list[str]] | None = None,
    logit_scale: float = 100.0,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train the mapper `cfg` describes on `data`; return the selected state and the loss curve.

    Trains where `data.features` lives (CPU or GPU), in float32, or in float64 when the features
    are float64 (the state is then float64 too). `attributes` is the content of the file that
    `cfg.attributes` names ({label: [attribute, ...]}); `logit_scale` is the CLIP model's (caption
    consistency only). Every distinct prompt is encoded once, before training: for caption data
    that is (sources + targets) x N prompts, held as embeddings during the fit. The rows, their
    order and the init come from `split_rows`, `epoch_orders` and `initial_mapper`.
    """
    check_data(data)
    if cfg.attributes is not None and attributes is None:
        raise ValueError(f"cfg.attributes names {cfg.attributes}: pass its content as `attributes`")
    device = data.features.device
    dtype = torch.float64 if data.features.dtype == torch.float64 else torch.float32
    x = F.normalize(data.features.detach().to(dtype), dim=-1)
    n, dim = x.shape
    bank = TextBank(data, text, cfg, attributes, device, dtype)
    if bank.mode == "class" and cfg.attribute_choice == "per_image" and bank.sample_attributes:
        bank.choose_attributes_per_image(x, cfg.attribute_top_k)

    train_rows, val_rows = split_rows(n, cfg.val_fraction, seed)
    n_val = len(val_rows)

    class_weights = None
    if bank.mode == "class":
        assert bank.y is not None
        # LADS methods/augmentations.py:289,327: the training split's counts only.
        y_train = bank.y[train_rows.to(device)]
        class_weights = lads_class_weights(y_train, len(bank.classes), dtype).to(device)

    mapper = initial_mapper(cfg, dim, seed, dtype).to(device)
    optimizer = make_optimizer(cfg, mapper.parameters())
    orders = epoch_orders(train_rows, val_rows, seed, reshuffle_val=cfg.selection == "lads")
    noise = cpu_generator(derive_seed(seed, "noise"))
    per_target = isinstance(mapper, PerDomainMapper)
    units = len(cfg.targets) if per_target else 1

    best = [math.inf] * units
    best_epoch = [0] * units
    since = [0] * units
    best_state = copy.deepcopy(mapper.state_dict())
    curve: list[dict[str, float]] = []
    stopped_early = False
    for epoch in range(1, cfg.epochs + 1):
        train_order, val_order = next(orders)
        mapper.train()
        tr, tr_parts = _epoch(
            mapper,
            bank,
            cfg,
            x,
            train_order.to(device),
            noise,
            class_weights,
            logit_scale,
            optimizer,
        )
        mapper.eval()
        if n_val:
            # The same draws every epoch: a change of the loss is the mapper's, not the noise's.
            val_gen = cpu_generator(derive_seed(seed, "val"))
            va, va_parts = _epoch(
                mapper,
                bank,
                cfg,
                x,
                val_order.to(device),
                val_gen,
                class_weights,
                logit_scale,
                None,
            )
            score = va
        else:
            va, va_parts, score = None, {}, tr
        row = {"epoch": float(epoch), "train_loss": float(tr.mean())}
        row["val_loss"] = float(va.mean()) if va is not None else math.nan
        row.update({k: float(v.mean()) for k, v in tr_parts.items()})
        row.update({f"val_{k}": float(v.mean()) for k, v in va_parts.items()})
        curve.append(row)

        scores = score.tolist() if per_target else [float(score.mean())]
        state = mapper.state_dict()
        for u, s in enumerate(scores):
            if s < best[u]:  # strictly lower: the first of equal epochs, as LADS :339
                best[u], best_epoch[u], since[u] = s, epoch, 0
                for name, t in state.items():
                    if per_target:
                        best_state[name][u] = t[u].detach()
                    else:
                        best_state[name] = t.detach().clone()
            else:
                since[u] += 1
        if log is not None:
            log(
                f"ldfs {cfg.method} epoch {epoch}/{cfg.epochs}: train {row['train_loss']:.4f} "
                f"val {row['val_loss']:.4f}"
            )
        if cfg.patience is not None and all(s >= cfg.patience for s in since):
            stopped_early = epoch < cfg.epochs
            if log is not None and stopped_early:
                log(f"ldfs: no improvement for {cfg.patience} epochs, stopped at epoch {epoch}")
            break

    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out_state = {k: v.detach().to("cpu", out_dtype).contiguous() for k, v in best_state.items()}
    info: dict[str, Any] = {
        "method": cfg.method,
        "mapper": "per_domain" if cfg.method == "lads" else cfg.mapper,
        "dim": dim,
        "targets": list(cfg.targets),
        "source_domain": cfg.source_domain,
        "mode": bank.mode,
        "n_train": len(train_rows),
        "n_val": n_val,
        "epochs_run": len(curve),
        "stopped_early": stopped_early,
        "selection": cfg.selection,
        "optimizer": cfg.optimizer,
        "selected_on": "val_loss" if n_val else "train_loss",
        "best_loss": sum(best) / len(best),
        "best_loss_per_target": dict(zip(cfg.targets, best, strict=True)) if per_target else None,
        "best_epoch_per_target": dict(zip(cfg.targets, best_epoch, strict=True))
        if per_target
        else None,
        "classes": bank.classes,
        "class_weights": class_weights.tolist() if class_weights is not None else None,
        "target_prompts": list(cfg.targets),
        "class_prompts": bank.class_prompts,
        "n_instance_prompts": len(bank.prompts),
        "instance_prompts_sample": bank.prompts[:8],
        "sigma": bank.sigma,
        "logit_scale": logit_scale if bank.mode == "caption" else None,
    }
    return FitResult(state=out_state, curve=curve, best_epoch=max(best_epoch), info=info)
