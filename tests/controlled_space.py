"""A synthetic CLIP-like feature space, its text encoder and a linear probe, to measure LDFS.

Known class and domain directions let LDFS's gain on an unseen domain be measured without CLIP.
Image features: f = normalize(class_dir[y] + domain_dir[d] + noise). Text: the encoder reads the
words of a prompt and returns normalize(sum of the directions of the words it knows): "a sketch of
a dog" -> normalize(class_dir[dog] + domain_dir[sketch]); unknown words add nothing.

What makes the space hard for a probe trained on one domain: domain directions are longer than
class directions and part of each lies in the class subspace (`leak`), so a domain shift adds a
class-dependent bias to a source probe's logits. A map that moves features along the text
direction of the domain change (what LDFS learns) removes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("dog", "cat", "car", "tree", "house", "bird", "fish", "boat", "chair", "cup")
DOMAINS = ("photo", "sketch", "cartoon", "painting")
ATTRIBUTES = ("small", "large", "red", "blue", "old", "new")


@dataclass
class ControlledSpace:
    """Known directions of a D-dim space; `text` is a TextEncoder, `images` draws features."""

    dim: int
    classes: tuple[str, ...]
    domains: tuple[str, ...]
    class_dirs: torch.Tensor  # [C, D]
    domain_dirs: torch.Tensor  # [M, D]
    attribute_dirs: torch.Tensor  # [A, D]
    noise: float

    @property
    def vocabulary(self) -> dict[str, torch.Tensor]:
        words = dict(zip(self.classes, self.class_dirs, strict=True))
        words.update(zip(self.domains, self.domain_dirs, strict=True))
        words.update(zip(ATTRIBUTES, self.attribute_dirs, strict=True))
        return words

    def text(self, texts: Sequence[str]) -> torch.Tensor:
        """The text encoder: bag of known words, summed and normalized ([n, D] float32)."""
        vocab = self.vocabulary
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for word in re.findall(r"[a-z]+", t.lower()):
                if word in vocab:
                    out[i] += vocab[word]
        return F.normalize(out, dim=-1)

    def images(
        self, domain: str, per_class: int, seed: int
    ) -> tuple[torch.Tensor, list[str], list[str]]:
        """`per_class` features of every class in `domain`: (features [N, D], labels, keys)."""
        g = torch.Generator().manual_seed(seed)
        d = self.domain_dirs[self.domains.index(domain)]
        y = torch.arange(len(self.classes)).repeat_interleave(per_class)
        eps = torch.randn(len(y), self.dim, generator=g) * self.noise
        x = F.normalize(self.class_dirs[y] + d + eps, dim=-1)
        labels = [self.classes[int(c)] for c in y]
        keys = [f"{domain}/{seed}/{i:05d}" for i in range(len(y))]
        return x, labels, keys


def make_space(
    dim: int = 64,
    n_classes: int = 10,
    domain_scale: float = 2.0,
    leak: float = 0.6,
    noise: float = 0.12,
    seed: int = 0,
) -> ControlledSpace:
    """Class directions: orthonormal. Domain directions: length `domain_scale`, a fraction `leak`
    of which (in norm) lies in the class subspace, different for every domain."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    q = q.T.float()  # rows orthonormal
    n_dom, n_attr = len(DOMAINS), len(ATTRIBUTES)
    assert n_classes + n_dom + n_attr <= dim
    class_dirs = q[:n_classes]
    own = q[n_classes : n_classes + n_dom]
    mix = F.normalize(torch.randn(n_dom, n_classes, generator=g), dim=-1) @ class_dirs
    domain_dirs = domain_scale * (
        (1 - leak**2) ** 0.5 * own + leak * mix
    )  # |own| and |mix| are 1 and orthogonal: the norm is domain_scale
    attribute_dirs = 0.3 * q[n_classes + n_dom : n_classes + n_dom + n_attr]
    return ControlledSpace(
        dim=dim,
        classes=CLASSES[:n_classes],
        domains=DOMAINS,
        class_dirs=class_dirs,
        domain_dirs=domain_dirs,
        attribute_dirs=attribute_dirs,
        noise=noise,
    )


def train_probe(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int = 300, lr: float = 0.05
) -> torch.nn.Linear:
    """Multinomial logistic regression, full batch, Adam from zero weights: deterministic."""
    probe = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        opt.step()
    return probe


@torch.no_grad()
def accuracy(probe: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((probe(x).argmax(-1) == y).float().mean())


def label_ids(labels: Sequence[str], classes: Sequence[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[lab] for lab in labels])


# The space of the controlled test and the bench: a photo probe scores ~0.65 on sketch/painting.
HARD = {"leak": 0.8, "domain_scale": 2.0}


@dataclass
class ProbeComparison:
    """Held-out accuracies per training set and domain, and what each method synthesized."""

    space: ControlledSpace
    source: tuple[torch.Tensor, torch.Tensor]  # real photo features, class ids
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]]  # domain -> real features, class ids
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # training set -> domain
    synthesized: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fits: dict[str, Any] = field(default_factory=dict)


def compare_probes(
    methods: Sequence[str] = ("ldfs", "lads"),
    targets: Sequence[str] = ("sketch", "painting"),
    other_domains: Sequence[str] = ("cartoon",),
    seed: int = 0,
    per_class: int = 40,
    epochs: int = 20,
    **cfg: Any,
) -> ProbeComparison:
    """Probes on real photo features alone and with each method's synthesized `targets` features,
    scored on real features of the targets and of `other_domains` (never seen by any step)."""
    from dgaug.stages.ldfs.config import LdfsConfig
    from dgaug.stages.ldfs.data import SourceFeatures
    from dgaug.stages.ldfs.fit import fit
    from dgaug.stages.ldfs.mappers import load_mapper
    from dgaug.stages.ldfs.synthesis import synthesize

    sp = make_space(seed=seed, **HARD)
    x, labels, keys = sp.images("photo", per_class, seed=1000 + seed)
    y = label_ids(labels, sp.classes)
    tests = {}
    for i, d in enumerate([*targets, *other_domains]):
        tx, tl, _ = sp.images(d, per_class, seed=2000 + 10 * seed + i)
        tests[d] = (tx, label_ids(tl, sp.classes))
    out = ProbeComparison(space=sp, source=(x, y), tests=tests)

    def score(name: str, probe: torch.nn.Linear) -> None:
        out.accuracy[name] = {d: accuracy(probe, tx, ty) for d, (tx, ty) in tests.items()}

    score("source_only", train_probe(x, y, len(sp.classes)))
    data = SourceFeatures(keys=keys, features=x, labels=labels)
    for method in methods:
        settings = {"batch_size": 128, "patience": None, **cfg}
        c = LdfsConfig(method=method, targets=list(targets), epochs=epochs, **settings)
        res = fit(data, sp.text, c, seed=seed)
        rows = synthesize(load_mapper(res.state, c, sp.dim), data, sp.text, c, seed=seed)
        xs = torch.from_numpy(np.stack([r["embedding"] for r in rows]))
        ys = label_ids([r["label"] for r in rows], sp.classes)
        score(method, train_probe(torch.cat([x, xs]), torch.cat([y, ys]), len(sp.classes)))
        out.synthesized[method] = rows
        out.fits[method] = res
    return out
