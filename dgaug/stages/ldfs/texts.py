"""The text side of LDFS: prompt embeddings, seeded noise on them, the bank that training draws.

Everything random draws from seeded `torch.Generator`s (never the global RNG), so the same inputs
and seed give bit-identical weights on the same CPU and thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dgaug.stages.ldfs.config import LdfsConfig
from dgaug.stages.ldfs.data import SourceFeatures, TextEncoder

TEXT_CHUNK = 1024  # texts per encoder call: bounds the encoder's activations on large caption sets


def cpu_generator(seed: int) -> torch.Generator:
    # CPU generators: the draws are the same whatever device the tensors then move to.
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(device)


def stochastic_text(e: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """normalize(e + sigma * eps), eps ~ N(0, I) from `generator`, one draw per element of e."""
    if sigma == 0:
        return F.normalize(e, dim=-1)
    return noisy(e, sigma, randn(e.shape, generator, e.device))


def noisy(e: torch.Tensor, sigma: float, eps: torch.Tensor) -> torch.Tensor:
    """normalize(e + sigma * eps) for a given eps (shared by a text and its conditioning)."""
    return F.normalize(e + sigma * eps, dim=-1)


def encode_texts(
    text: TextEncoder,
    prompts: Sequence[str],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Embeddings of `prompts` ([n, D] `dtype` on `device`), each distinct prompt encoded once."""
    index: dict[str, int] = {}
    for p in prompts:
        index.setdefault(p, len(index))
    unique = list(index)
    parts = [
        text(unique[i : i + TEXT_CHUNK]).detach().to(device=device, dtype=dtype)
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

    Class mode: `instance[d, v]` for domain d (0..S-1: the sources, S+k: target k) and text
    variant v (a label, or a label with one of its attributes); `class_text[c]`: the class texts
    of the consistency loss; `target_class_text[k, c]`: class c at target k. Caption mode:
    `instance[d, i]` for source row i. `domain_text[k]`: e_k.
    """

    def __init__(
        self,
        data: SourceFeatures,
        text: TextEncoder,
        cfg: LdfsConfig,
        attributes: dict[str, list[str]] | None,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.mode = resolve_mode(data, cfg)
        self.sigma = 0.0 if cfg.method == "lads" else cfg.sigma
        sources = cfg.source_domains
        self.n_sources = len(sources)
        self.n_targets = len(cfg.targets)
        domains = [*sources, *cfg.targets]
        self.classes: list[str] = sorted(set(data.labels)) if data.labels is not None else []
        cls_idx = {c: i for i, c in enumerate(self.classes)}
        self.y = (
            torch.tensor([cls_idx[lab] for lab in data.labels], device=device)
            if data.labels is not None
            else None
        )
        target_class_prompts: list[str] = []
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
            template = cfg.class_text or cfg.class_template.replace("{domain}", sources[0])
            class_prompts = [template.format(label=c) for c in self.classes]
            if cfg.target_class_texts:
                target_class_prompts = [
                    cfg.class_template.format(domain=t, label=c)
                    for t in cfg.targets
                    for c in self.classes
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
        emb = encode_texts(
            text,
            prompts + class_prompts + target_class_prompts + list(cfg.targets),
            device,
            dtype,
        )
        k = len(domains) * n
        c = len(class_prompts)
        self.instance = emb[:k].reshape(len(domains), n, -1)
        self.class_text = emb[k : k + c]
        self.target_class_text = (
            emb[k + c : k + c + len(target_class_prompts)].reshape(self.n_targets, c, -1)
            if target_class_prompts
            else None
        )
        self.domain_text = emb[k + c + len(target_class_prompts) :]
        self.dim = emb.shape[1]
        self.per_image: torch.Tensor | None = None  # [N, top_k] columns: attribute_choice per_image

    def choose_attributes_per_image(self, f: torch.Tensor, top_k: int) -> None:
        """Fix each row's `top_k` best attribute columns: highest f . T_src(class, attribute).

        f: [N, D] features of the bank's rows. Classes with fewer attributes repeat their best.
        """
        assert self.y is not None and self.mode == "class"
        src = self.instance[0]  # the (first) source's texts of every variant
        cols = []
        for i in range(len(f)):
            c = int(self.y[i])
            o, m = int(self.offset[c]), int(self.count[c])
            sims = src[o : o + m] @ f[i]
            best = sims.topk(min(top_k, m)).indices + o
            cols.append(best.repeat((top_k + len(best) - 1) // len(best))[:top_k])
        self.per_image = torch.stack(cols)

    def text_rows(self, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Which instance column each source row uses this step (attributes sampled here)."""
        if self.mode == "caption":
            return rows
        assert self.y is not None
        y = self.y[rows]
        if self.per_image is not None:
            choices = self.per_image[rows]
            if choices.shape[1] == 1 or generator is None:
                return choices[:, 0]
            u = torch.rand(len(rows), generator=generator, dtype=torch.float64).to(rows.device)
            pick = (u * choices.shape[1]).long().clamp(max=choices.shape[1] - 1)
            return choices.gather(1, pick[:, None])[:, 0]
        if not self.sample_attributes or generator is None:
            return self.offset[y]
        u = torch.rand(len(rows), generator=generator, dtype=torch.float64).to(rows.device)
        pick = (u * self.count[y]).long().clamp(max=self.count[y] - 1)
        return self.offset[y] + pick

    def source_texts(self, f: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Each row's source text [B, D]: of several sources, the one most similar to its feature.

        LADS methods/augmentations.py:356-358: argmax over source prompts of f . T_src[:, y].
        """
        src = self.instance[: self.n_sources, cols]  # [S, B, D]
        if self.n_sources == 1:
            return src[0]
        best = (src * f[None]).sum(-1).argmax(0)  # [B]
        return src[best, torch.arange(len(cols), device=cols.device)]

    def step_texts(
        self,
        rows: torch.Tensor,
        f: torch.Tensor,
        generator: torch.Generator | None,
        shared: bool,
        instance_condition: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(Delta [K, B, D], cond [K, B, D] or None, mean cos(noisy Delta, clean Delta) or None).

        The texts of source `rows` (features f [B, D]), noisy when sigma > 0. cond is e_k, or
        with `instance_condition` the instance's (noisy) text at target k.
        """
        cols = self.text_rows(rows, generator)
        src, tgt = self.source_texts(f, cols), self.instance[self.n_sources :, cols]
        cond = None
        if shared:
            cond = tgt if instance_condition else self.domain_text[:, None, :].expand_as(tgt)
        noise_cos = None
        if self.sigma > 0 and generator is not None:
            clean = F.normalize(tgt - src, dim=-1)
            eps = randn(tgt.shape, generator, tgt.device).to(tgt.dtype)
            tgt = noisy(tgt, self.sigma, eps)
            if cond is not None:  # the same eps: the conditioning names the noisy direction
                cond = tgt if instance_condition else noisy(cond, self.sigma, eps)
            src = stochastic_text(src, self.sigma, generator)
            delta = F.normalize(tgt - src, dim=-1)
            noise_cos = (delta * clean).sum(-1).mean()
            return delta, cond, noise_cos
        return F.normalize(tgt - src, dim=-1), cond, noise_cos

    def lads_directions(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per target and row: normalize(T_tgt[y] - T_src[s, y]), s the row's best source; [K, B, D].

        LADS methods/augmentations.py:349-364 (get_direction_vectors).
        """
        cols = self.offset[y]
        src = self.source_texts(f, cols)
        return F.normalize(self.instance[self.n_sources :, cols] - src[None], dim=-1)

    def caption_text(self, rows: torch.Tensor) -> torch.Tensor:
        return self.instance[0, rows]
