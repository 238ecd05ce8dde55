"""LDFS and LADS on CLIP feature tensors: the losses, the mappers, `fit` and `synthesize`.

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
- losses: lambda_ld L_ld + lambda_cons L_cons + lambda_pr L_pr, averaged over targets; all
  targets are trained in every step.
- class weights of the class-consistency CE (both methods): LADS's 1/count scaled to max 1,
  counted over all source rows (train and validation split).
- selection: the state with the lowest validation loss is kept; the validation noise and
  attributes are drawn from the same seed every epoch so that epochs compare. With per-target
  weights (`per_domain`, `lads`) each target's weights are selected (and stopped) on their own,
  as LADS trains and checkpoints one network per domain; the gradient is the sum over targets,
  so jointly training the independent networks equals training them one by one.

LADS as implemented here follows the specification of this project: g(f) is a plain MLP
(D -> hidden -> D, ReLU, not residual); its output, normalized, is the synthesized feature. (The
`ResMLP` of LADS's public code, methods/augmentations.py, returns f + MLP(f): a residual map.)
Its L_cls uses the class texts at `source_domain` ("a photo of a {label}" by default, as LADS).

Everything random draws from seeded `torch.Generator`s (never the global RNG), so the same inputs
and seed give bit-identical weights on the same CPU and thread count.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from dgaug.stages.ldfs.config import LdfsConfig

# texts -> [n, D] unit-norm float32 embeddings, on any device.
TextEncoder = Callable[[Sequence[str]], torch.Tensor]

TEXT_CHUNK = 1024  # texts per encoder call: bounds the encoder's activations on large caption sets
SYNTH_CHUNK = 4096  # (row, draw) pairs mapped together in `synthesize`


@dataclass
class SourceFeatures:
    """Real source-domain image features, one row per key, with their labels or captions."""

    keys: list[str]
    features: torch.Tensor  # [N, D] float32, unit norm
    labels: list[str] | None = None
    captions: list[str] | None = None


@dataclass
class FitResult:
    """A trained mapper's weights (the selected epoch's), its loss curve and what it was fit on."""

    state: dict[str, torch.Tensor]
    curve: list[dict[str, float]]
    best_epoch: int
    info: dict[str, Any]


# ------------------------------------------------------------------------------------------ seeds


def derive_seed(*parts: object) -> int:
    """First 8 bytes of sha256("/".join(parts)) as an int63: independent streams from one seed."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _generator(seed: int) -> torch.Generator:
    # CPU generators: the draws are the same whatever device the tensors then move to.
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(device)


# ----------------------------------------------------------------------------------------- losses


def stochastic_text(e: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """normalize(e + sigma * eps), eps ~ N(0, I) from `generator`, one draw per element of e."""
    if sigma == 0:
        return F.normalize(e, dim=-1)
    return _noisy(e, sigma, _randn(e.shape, generator, e.device))


def _noisy(e: torch.Tensor, sigma: float, eps: torch.Tensor) -> torch.Tensor:
    return F.normalize(e + sigma * eps, dim=-1)


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
    delta_per_class: torch.Tensor,
    y: torch.Tensor,
    keep_leading: bool = False,
) -> torch.Tensor:
    """LADS's L_dir = mean_i (1 - cos(g(f_i) - f_i, delta[y_i])), written as LADS writes it.

    f: [B, D]; g_f: [..., B, D]; delta_per_class: [..., C, D] (one direction per class, per
    target when leading dims are given); y: [B].
    """
    delta = delta_per_class[..., y, :]
    return _reduce(1 - F.cosine_similarity(g_f - f, delta, dim=-1), keep_leading)


def pairwise_loss(f: torch.Tensor, f_hat: torch.Tensor, keep_leading: bool = False) -> torch.Tensor:
    """L_pr = mean_{i,j} (cos(f_i, f_j) - cos(f_hat_i, f_hat_j))^2; f: [B, D], f_hat: [..., B, D]."""
    fn, hn = F.normalize(f, dim=-1), F.normalize(f_hat, dim=-1)
    sq = (fn @ fn.T - hn @ hn.transpose(-1, -2)) ** 2
    return sq.mean((-1, -2)) if keep_leading else sq.mean()


def class_consistency_loss(
    f_hat: torch.Tensor,
    class_text: torch.Tensor,
    y: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    keep_leading: bool = False,
) -> torch.Tensor:
    """Class-weighted CE of normalize(f_hat) @ class_text.T (no temperature), as LADS's L_cls.

    f_hat: [..., B, D]; class_text: [C, D]; y: [B]. The weighted mean sum(w_y l) / sum(w_y), as
    torch's `cross_entropy(weight=...)`.
    """
    logits = F.normalize(f_hat, dim=-1) @ class_text.T
    y = y.expand(logits.shape[:-1])
    c = class_text.shape[0]
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


def lads_class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """LADS's weights: 1 / count, scaled so that the rarest class weighs 1 (absent classes: 1)."""
    counts = torch.bincount(y, minlength=n_classes).double()
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    w = inv / inv.max()
    return torch.where(counts > 0, w, torch.ones_like(w)).float()


# ---------------------------------------------------------------------------------------- mappers


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
    mapper = build_mapper(cfg, dim)
    mapper.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return mapper.eval()


# ------------------------------------------------------------------------------------------- text


def encode_texts(text: TextEncoder, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Embeddings of `prompts` ([n, D] float32 on `device`), each distinct prompt encoded once."""
    index: dict[str, int] = {}
    for p in prompts:
        index.setdefault(p, len(index))
    unique = list(index)
    parts = [
        text(unique[i : i + TEXT_CHUNK]).detach().to(device=device, dtype=torch.float32)
        for i in range(0, len(unique), TEXT_CHUNK)
    ]
    emb = F.normalize(torch.cat(parts), dim=-1)
    return emb[torch.tensor([index[p] for p in prompts], device=device)]


def resolve_mode(data: SourceFeatures, cfg: LdfsConfig) -> str:
    """'class' or 'caption': the consistency loss and the instance text of the directions."""
    mode = cfg.consistency
    if mode == "auto":
        mode = "class" if data.labels is not None else "caption"
    if mode == "class" and data.labels is None:
        raise ValueError("class consistency (and lads) needs labels; this data has none")
    if mode == "caption" and data.captions is None:
        raise ValueError("caption consistency needs captions; this data has none")
    if cfg.method == "lads" and mode != "class":
        raise ValueError("lads uses per-class directions and class consistency: set labels")
    return mode


class TextBank:
    """Every text embedding training needs, encoded once; noisy draws per step come from here.

    Class mode: `instance[d, v]` for domain d (0: source, 1+k: target k) and text variant v
    (a label, or a label with one of its attributes); `class_text[c]`: class c at the source
    domain. Caption mode: `instance[d, i]` for source row i. `domain_text[k]`: e_k.
    """

    def __init__(
        self,
        data: SourceFeatures,
        text: TextEncoder,
        cfg: LdfsConfig,
        attributes: dict[str, list[str]] | None,
        device: torch.device,
    ) -> None:
        self.mode = resolve_mode(data, cfg)
        self.sigma = 0.0 if cfg.method == "lads" else cfg.sigma
        domains = [cfg.source_domain, *cfg.targets]
        self.classes: list[str] = sorted(set(data.labels)) if data.labels is not None else []
        cls_idx = {c: i for i, c in enumerate(self.classes)}
        self.y = (
            torch.tensor([cls_idx[lab] for lab in data.labels], device=device)
            if data.labels is not None
            else None
        )
        if self.mode == "class":
            # LADS's directions are per class: attributes only refine LDFS's instance texts.
            attrs = (attributes or {}) if cfg.method == "ldfs" else {}
            variants: list[tuple[str, str | None]] = []
            offset, count = [], []
            for c in self.classes:
                options = list(attrs.get(c) or [None])
                offset.append(len(variants))
                count.append(len(options))
                variants += [(c, a) for a in options]
            self.offset = torch.tensor(offset, device=device)
            self.count = torch.tensor(count, device=device)
            self.sample_attributes = any(n > 1 for n in count)
            prompts = [
                cfg.class_template.format(domain=d, label=c) + (f", {a}" if a is not None else "")
                for d in domains
                for c, a in variants
            ]
            n = len(variants)
            class_prompts = [
                cfg.class_template.format(domain=cfg.source_domain, label=c) for c in self.classes
            ]
        else:
            assert data.captions is not None
            prompts = [
                cfg.caption_template.format(domain=d, caption=cap)
                for d in domains
                for cap in data.captions
            ]
            n = len(data.captions)
            class_prompts = []
            self.sample_attributes = False
        self.prompts = prompts
        self.class_prompts = class_prompts
        emb = encode_texts(text, prompts + class_prompts + list(cfg.targets), device)
        k = len(domains) * n
        self.instance = emb[:k].reshape(len(domains), n, -1)
        self.class_text = emb[k : k + len(class_prompts)]
        self.domain_text = emb[k + len(class_prompts) :]
        self.dim = emb.shape[1]

    def text_rows(self, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Which instance column each source row uses this step (attributes sampled here)."""
        if self.mode == "caption":
            return rows
        assert self.y is not None
        y = self.y[rows]
        if not self.sample_attributes or generator is None:
            return self.offset[y]
        u = torch.rand(len(rows), generator=generator, dtype=torch.float64).to(rows.device)
        pick = (u * self.count[y]).long().clamp(max=self.count[y] - 1)
        return self.offset[y] + pick

    def step_texts(
        self, rows: torch.Tensor, generator: torch.Generator | None, shared: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Delta [K, B, D], cond [K, B, D] or None) for source `rows`, noisy when sigma > 0."""
        cols = self.text_rows(rows, generator)
        src, tgt = self.instance[0, cols], self.instance[1:, cols]
        cond = self.domain_text[:, None, :].expand_as(tgt) if shared else None
        if self.sigma > 0 and generator is not None:
            eps = _randn(tgt.shape, generator, tgt.device)
            tgt = _noisy(tgt, self.sigma, eps)
            if cond is not None:  # the same eps: the conditioning names the noisy direction
                cond = _noisy(cond, self.sigma, eps)
            src = stochastic_text(src, self.sigma, generator)
        return F.normalize(tgt - src, dim=-1), cond

    def lads_directions(self) -> torch.Tensor:
        """Per target and class: normalize(T_tgt[c] - T_src[c]), [K, C, D]."""
        cols = self.offset
        return F.normalize(self.instance[1:, cols] - self.instance[0, cols][None], dim=-1)

    def caption_text(self, rows: torch.Tensor) -> torch.Tensor:
        return self.instance[0, rows]


# -------------------------------------------------------------------------------------------- fit


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
    """Per-target total loss [K] and per-target components of one batch."""
    y = bank.y[rows] if bank.y is not None else None
    if cfg.method == "lads":
        assert y is not None
        g_f = mapper.raw(f, None)
        l_dir = lads_direction_loss(f, g_f, bank.lads_directions(), y, keep_leading=True)
        l_cls = class_consistency_loss(g_f, bank.class_text, y, class_weights, keep_leading=True)
        a = cfg.lads_alpha
        return a * l_dir + (1 - a) * l_cls, {"dir": l_dir, "cls": l_cls}
    delta, cond = bank.step_texts(rows, generator, isinstance(mapper, SharedMapper))
    f_hat = mapper(f, cond)
    l_ld = local_direction_loss(f, f_hat, delta, keep_leading=True)
    if y is not None and bank.mode == "class":
        l_cons = class_consistency_loss(f_hat, bank.class_text, y, class_weights, keep_leading=True)
    else:
        cap = bank.caption_text(rows)
        l_cons = caption_contrastive_loss(f_hat, cap, logit_scale, keep_leading=True)
    l_pr = pairwise_loss(f, f_hat, keep_leading=True)
    total = cfg.lambda_ld * l_ld + cfg.lambda_cons * l_cons + cfg.lambda_pr * l_pr
    return total, {"ld": l_ld, "cons": l_cons, "pr": l_pr}


def _check_data(data: SourceFeatures) -> None:
    x = data.features
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    for name, seq in (("keys", data.keys), ("labels", data.labels), ("captions", data.captions)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{len(seq)} {name} for {n} features")
    if n < 1:
        raise ValueError("no source features")


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
    """One pass over `rows` (training when an optimizer is given); per-target means."""
    total_sum: torch.Tensor | None = None
    parts_sum: dict[str, torch.Tensor] = {}
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
        w = len(r)
        total_sum = total.detach() * w + (0 if total_sum is None else total_sum)
        for name, v in parts.items():
            parts_sum[name] = v.detach() * w + parts_sum.get(name, 0)
    assert total_sum is not None
    n = len(rows)
    return total_sum / n, {k: v / n for k, v in parts_sum.items()}


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

    Trains where `data.features` lives (CPU or GPU). `attributes` is the content of the file that
    `cfg.attributes` names ({label: [attribute, ...]}); `logit_scale` is the CLIP model's (caption
    consistency only). Every distinct prompt is encoded once, before training: for caption data
    that is (1 + targets) x N prompts, held as float32 embeddings during the fit.
    """
    _check_data(data)
    if cfg.attributes is not None and attributes is None:
        raise ValueError(f"cfg.attributes names {cfg.attributes}: pass its content as `attributes`")
    device = data.features.device
    x = F.normalize(data.features.detach().float(), dim=-1)
    n, dim = x.shape
    bank = TextBank(data, text, cfg, attributes, device)

    perm = torch.randperm(n, generator=_generator(derive_seed(seed, "split")))
    n_val = int(n * cfg.val_fraction)
    val_rows = perm[:n_val].sort().values.to(device)
    train_rows = perm[n_val:].sort().values.to(device)

    class_weights = None
    if bank.mode == "class":
        assert bank.y is not None
        class_weights = lads_class_weights(bank.y, len(bank.classes)).to(device)

    mapper = build_mapper(cfg, dim, _generator(derive_seed(seed, "init"))).to(device)
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    shuffle = _generator(derive_seed(seed, "shuffle"))
    noise = _generator(derive_seed(seed, "noise"))
    per_target = isinstance(mapper, PerDomainMapper)
    units = len(cfg.targets) if per_target else 1

    best = [math.inf] * units
    best_epoch = [0] * units
    since = [0] * units
    best_state = copy.deepcopy(mapper.state_dict())
    curve: list[dict[str, float]] = []
    stopped_early = False
    for epoch in range(1, cfg.epochs + 1):
        mapper.train()
        order = train_rows[torch.randperm(len(train_rows), generator=shuffle).to(device)]
        tr, tr_parts = _epoch(
            mapper, bank, cfg, x, order, noise, class_weights, logit_scale, optimizer
        )
        mapper.eval()
        if n_val:
            # The same draws every epoch: a change of the loss is the mapper's, not the noise's.
            val_gen = _generator(derive_seed(seed, "val"))
            va, va_parts = _epoch(
                mapper, bank, cfg, x, val_rows, val_gen, class_weights, logit_scale, None
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
            if s < best[u]:
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

    out_state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in best_state.items()}
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
        "selected_on": "val_loss" if n_val else "train_loss",
        "best_loss": sum(best) / len(best),
        "best_loss_per_target": dict(zip(cfg.targets, best, strict=True)) if per_target else None,
        "best_epoch_per_target": dict(zip(cfg.targets, best_epoch, strict=True))
        if per_target
        else None,
        "classes": bank.classes,
        "target_prompts": list(cfg.targets),
        "class_prompts": bank.class_prompts,
        "n_instance_prompts": len(bank.prompts),
        "instance_prompts_sample": bank.prompts[:8],
        "sigma": bank.sigma,
        "logit_scale": logit_scale if bank.mode == "caption" else None,
    }
    return FitResult(state=out_state, curve=curve, best_epoch=max(best_epoch), info=info)


# ------------------------------------------------------------------------------------- synthesize


def draw_seed(seed: int, key: str, k: int, j: int) -> int:
    """The seed of draw j of target k for source `key`: it depends on nothing else."""
    return derive_seed(seed, key, k, j)


@torch.no_grad()
def synthesize(
    mapper: nn.Module,
    data: SourceFeatures,
    text: TextEncoder,
    cfg: LdfsConfig,
    seed: int,
    attributes: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """The synthesized features of `data`: for each row, each target, each draw (in that order).

    Each row: key, domain (the target's description), draw, embedding (unit-norm float32 numpy
    [D]), label, caption. With the shared mapper each draw is conditioned on normalize(e_k + sigma
    * eps), eps from a generator seeded by (seed, key, k, j) alone, so a shard synthesizes the
    same rows whatever else is synthesized. Without noise (sigma 0, per_domain, lads) all draws of
    a row are the same feature. `attributes` is accepted for symmetry with `fit`: the mapper does
    not read instance texts.
    """
    del attributes
    _check_data(data)
    mapper.eval()
    device = next(mapper.parameters()).device
    x = F.normalize(data.features.detach().float().to(device), dim=-1)
    n, dim = x.shape
    n_t, draws = len(cfg.targets), cfg.draws
    shared = isinstance(mapper, SharedMapper)
    e = encode_texts(text, list(cfg.targets), device) if shared else None
    noisy = shared and cfg.method == "ldfs" and cfg.sigma > 0

    rows: list[dict[str, Any]] = []
    chunk = max(1, SYNTH_CHUNK // draws)  # about SYNTH_CHUNK mapped rows per target and pass
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        f = x[start:stop].repeat_interleave(draws, dim=0)  # row (i, j) at i * draws + j
        cond = None
        if e is not None:
            cond = e[:, None, :].expand(n_t, len(f), dim)
            if noisy:
                eps = torch.stack(
                    [
                        torch.randn(dim, generator=_generator(draw_seed(seed, data.keys[i], k, j)))
                        for k in range(n_t)
                        for i in range(start, stop)
                        for j in range(draws)
                    ]
                ).reshape(n_t, len(f), dim)
                cond = _noisy(cond, cfg.sigma, eps.to(device))
        out = mapper(f, cond)  # [K, (stop - start) * draws, D]
        out = out.reshape(n_t, stop - start, draws, dim).permute(1, 0, 2, 3).float().cpu().numpy()
        for a, i in enumerate(range(start, stop)):
            label = data.labels[i] if data.labels is not None else None
            caption = data.captions[i] if data.captions is not None else None
            for k, domain in enumerate(cfg.targets):
                for j in range(draws):
                    rows.append(
                        {
                            "key": data.keys[i],
                            "domain": domain,
                            "draw": j,
                            "embedding": out[a, k, j],
                            "label": label,
                            "caption": caption,
                        }
                    )
    return rows
