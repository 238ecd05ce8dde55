"""What the LDFS functions take: real source features with labels or captions; a text encoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# texts -> [n, D] unit-norm float32 embeddings, on any device.
TextEncoder = Callable[[Sequence[str]], torch.Tensor]


@dataclass
class SourceFeatures:
    """Real source-domain image features, one row per key, with their labels or captions."""

    keys: list[str]
    features: torch.Tensor  # [N, D] float32, unit norm
    labels: list[str] | None = None
    captions: list[str] | None = None


def check_data(data: SourceFeatures) -> None:
    """ValueError unless the features are [N >= 1, D] with one key (label, caption) per row."""
    x = data.features
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    for name, seq in (("keys", data.keys), ("labels", data.labels), ("captions", data.captions)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{len(seq)} {name} for {n} features")
    if n < 1:
        raise ValueError("no source features")
