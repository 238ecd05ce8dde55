"""Evaluation metrics on embeddings: classification accuracy, a fitted linear probe, retrieval recall."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows whose highest logit is the target (ties go to the lowest class index)."""
    if len(targets) == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == targets).float().mean())


def zero_shot_logits(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every image embedding [N,D] to every class text embedding [C,D]."""
    return F.normalize(images.float(), dim=-1) @ F.normalize(classes.float(), dim=-1).T


def fit_linear_probe(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L2 on the weights), fitted full-batch with L-BFGS in float64.

    Deterministic for the same inputs (no sampling, zero start), which is what an evaluation
    metric needs. Inputs are L2-normalized first, as CLIP features are compared.
    Returns (W [C,D], b [C]) in float32.
    """
    x = F.normalize(features.double(), dim=-1)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )
    y = targets.long()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float()


def probe_logits(features: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1) @ w.T + b


def retrieval_recall(
    images: torch.Tensor,
    texts: torch.Tensor,
    *,
    caption_ids: Sequence[int] | torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k of image->text and text->image retrieval over N held-out pairs (row i with row i).

    `caption_ids` groups pairs whose captions are the same text: retrieving any text of the same
    group counts as correct (class datasets caption many images alike). Default: every pair its
    own group. Keys: ``image_to_text@k`` and ``text_to_image@k``.
    """
    n = len(images)
    if n == 0:
        return {f"{d}@{k}": float("nan") for d in ("image_to_text", "text_to_image") for k in ks}
    ids = torch.arange(n) if caption_ids is None else torch.as_tensor(caption_ids)
    sim = zero_shot_logits(images, texts)  # [N images, N texts]
    same = ids[:, None] == ids[None, :]  # [i, j]: text j is a correct answer for image i
    out = {}
    for k in ks:
        kk = min(k, n)
        top_t = sim.topk(kk, dim=1).indices  # texts for each image
        out[f"image_to_text@{k}"] = float(same.gather(1, top_t).any(dim=1).float().mean())
        top_i = sim.T.topk(kk, dim=1).indices  # images for each text
        out[f"text_to_image@{k}"] = float(same.T.gather(1, top_i).any(dim=1).float().mean())
    return out
