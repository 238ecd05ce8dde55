"""The LDFS and LADS losses on CLIP features: directions, pairwise structure, class and caption CE.

Every loss takes `keep_leading`: average over the batch only, keeping one value per target, so
that per-target networks can be selected (and stopped) on their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_row: torch.Tensor, keep_leading: bool) -> torch.Tensor:
    # keep_leading: the mean over the batch (last) dim only, e.g. one loss per target.
    return per_row.mean(-1) if keep_leading else per_row.mean()


def local_direction_loss(
    f: torch.Tensor, f_hat: torch.Tensor, delta: torch.Tensor, keep_leading: bool = False
) -> torch.Tensor:
    """L_ld = mean_i (1 - cos(normalize(f_hat_i - f_i), delta_i)).

    f: [B, D] or [..., B, D]; f_hat, delta: [..., B, D]. keep_leading: average over B only.
    """
    move = F.normalize(f_hat - f, dim=-1)
    return _reduce(1 - (move * F.normalize(delta, dim=-1)).sum(-1), keep_leading)


def lads_direction_loss(
    f: torch.Tensor,
    g_f: torch.Tensor,
    delta: torch.Tensor,
    y: torch.Tensor | None = None,
    keep_leading: bool = False,
) -> torch.Tensor:
    """LADS's L_dir = mean_i (1 - cos(g(f_i) - f_i, delta_i)), written as LADS writes it.

    f: [B, D]; g_f: [..., B, D]; delta: [..., B, D] per row, or with y ([B]) [..., C, D] per
    class (delta_i = delta[y_i]). LADS methods/augmentations.py:377-379.
    """
    if y is not None:
        delta = delta[..., y, :]
    return _reduce(1 - F.cosine_similarity(g_f - f, delta, dim=-1), keep_leading)


def pairwise_loss(
    f: torch.Tensor, f_hat: torch.Tensor, keep_leading: bool = False, anchored: bool = False
) -> torch.Tensor:
    """L_pr = mean_{i,j} (cos(f_i, f_j) - cos(f_hat_i, f_hat_j))^2; f: [B, D], f_hat: [..., B, D].

    anchored: plus var_i cos(f_i, f_hat_i) (population variance over the batch). The first term
    is blind to a rotation of the whole batch, which moves each feature by its own angle; the
    second asks every feature to move by the same angle (our variant; the paper gives no formula).
    """
    fn, hn = F.normalize(f, dim=-1), F.normalize(f_hat, dim=-1)
    sq = (fn @ fn.T - hn @ hn.transpose(-1, -2)) ** 2
    loss = sq.mean((-1, -2)) if keep_leading else sq.mean(tuple(range(sq.ndim - 2, sq.ndim)))
    if anchored:
        self_cos = (fn * hn).sum(-1)  # [..., B]
        loss = loss + self_cos.var(-1, correction=0)
    return loss if keep_leading else loss.mean()


def class_consistency_loss(
    f_hat: torch.Tensor,
    class_text: torch.Tensor,
    y: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    keep_leading: bool = False,
) -> torch.Tensor:
    """Class-weighted CE of normalize(f_hat) @ class_text.T (no temperature), as LADS's L_cls.

    f_hat: [..., B, D]; class_text: [C, D], or [..., C, D] per target (LADS's DOM_SPECIFIC_XE,
    methods/augmentations.py:380); y: [B]. The weighted mean sum(w_y l) / sum(w_y), as torch's
    `cross_entropy(weight=...)` (methods/augmentations.py:327, 381-382).
    """
    logits = F.normalize(f_hat, dim=-1) @ class_text.transpose(-1, -2)
    y = y.expand(logits.shape[:-1])
    c = class_text.shape[-2]
    if not keep_leading:
        return F.cross_entropy(logits.reshape(-1, c), y.reshape(-1), weight=class_weights)
    per_row = F.cross_entropy(
        logits.reshape(-1, c), y.reshape(-1), weight=class_weights, reduction="none"
    ).reshape(y.shape)
    w = class_weights[y] if class_weights is not None else torch.ones_like(per_row)
    return per_row.sum(-1) / w.sum(-1)


def caption_contrastive_loss(
    f_hat: torch.Tensor, caption_text: torch.Tensor, logit_scale: float, keep_leading: bool = False
) -> torch.Tensor:
    """In-batch image->text CE of logit_scale * cos(f_hat_i, caption_j), target j = i.

    f_hat: [..., B, D]; caption_text: [B, D].
    """
    logits = logit_scale * F.normalize(f_hat, dim=-1) @ F.normalize(caption_text, dim=-1).T
    b = caption_text.shape[0]
    target = torch.arange(b, device=logits.device).expand(logits.shape[:-1])
    per_row = F.cross_entropy(logits.reshape(-1, b), target.reshape(-1), reduction="none")
    return _reduce(per_row.reshape(target.shape), keep_leading)


def lads_class_weights(
    y: torch.Tensor, n_classes: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """LADS's weights: 1 / count, scaled so that the rarest class weighs 1 (absent classes: 1).

    LADS methods/lads_utils.py:115-121 counts only the classes present (a class absent from the
    training split makes its CE fail); here an absent class weighs 1.
    """
    counts = torch.bincount(y, minlength=n_classes).double()
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    w = inv / inv.max()
    return torch.where(counts > 0, w, torch.ones_like(w)).to(dtype)
