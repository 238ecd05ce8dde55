"""`synthesize`: a trained mapper's features of unseen domains, each draw seeded by its key."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgaug.core.hashing import derive_seed
from dgaug.stages.ldfs.config import LdfsConfig
from dgaug.stages.ldfs.data import SourceFeatures, TextEncoder, check_data
from dgaug.stages.ldfs.mappers import SharedMapper
from dgaug.stages.ldfs.texts import TextBank, cpu_generator, encode_texts, noisy

SYNTH_CHUNK = 4096  # (row, draw) pairs mapped together in `synthesize`


def draw_seed(seed: int, key: str, k: int, j: int) -> int:
    """The seed of draw j of target k for source `key`: it depends on nothing else."""
    return derive_seed(seed, key, k, j)


def _instance_columns(
    bank: TextBank, cfg: LdfsConfig, data: SourceFeatures, x: torch.Tensor, seed: int
) -> torch.Tensor:
    """[N, K, draws] instance-text columns for `condition: instance`, each seeded by its key."""
    n, n_t, draws = len(data.keys), len(cfg.targets), cfg.draws
    if bank.mode == "caption":
        return torch.arange(n)[:, None, None].expand(n, n_t, draws)
    if bank.sample_attributes and cfg.attribute_choice == "per_image":
        bank.choose_attributes_per_image(x, cfg.attribute_top_k)
    cols = torch.empty(n, n_t, draws, dtype=torch.long)
    for i in range(n):
        for k in range(n_t):
            for j in range(draws):
                g = cpu_generator(derive_seed(draw_seed(seed, data.keys[i], k, j), "attribute"))
                cols[i, k, j] = bank.text_rows(torch.tensor([i]), g)[0]
    return cols


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
    [D]), label, caption. With the shared mapper each draw is conditioned on normalize(c + sigma
    * eps), eps from a generator seeded by (seed, key, k, j) alone, so a shard synthesizes the
    same rows whatever else is synthesized; c is e_k (`condition: domain`) or the row's own text
    at target k (`instance`: its caption, or its class text with an attribute chosen as in
    training, `attributes` being the attribute file's content). Without noise (sigma 0,
    per_domain, lads) and with a fixed text all draws of a row are the same feature. The mapper
    runs in its own dtype (float64 for a float64 fit).
    """
    check_data(data)
    if cfg.attributes is not None and attributes is None and cfg.condition == "instance":
        raise ValueError(f"cfg.attributes names {cfg.attributes}: pass its content as `attributes`")
    mapper.eval()
    param = next(mapper.parameters())
    device, dtype = param.device, param.dtype
    x = F.normalize(data.features.detach().to(device=device, dtype=dtype), dim=-1)
    n, dim = x.shape
    n_t, draws = len(cfg.targets), cfg.draws
    shared = isinstance(mapper, SharedMapper)
    e = encode_texts(text, list(cfg.targets), device, dtype) if shared else None
    inst_cols, bank = None, None
    if shared and cfg.condition == "instance":
        bank = TextBank(data, text, cfg, attributes, device, dtype)
        inst_cols = _instance_columns(bank, cfg, data, x, seed)
    draws_noise = shared and cfg.method == "ldfs" and cfg.sigma > 0

    rows: list[dict[str, Any]] = []
    chunk = max(1, SYNTH_CHUNK // draws)  # about SYNTH_CHUNK mapped rows per target and pass
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        f = x[start:stop].repeat_interleave(draws, dim=0)  # row (i, j) at i * draws + j
        cond = None
        if e is not None:
            if bank is not None and inst_cols is not None:
                c = inst_cols[start:stop].permute(1, 0, 2).reshape(n_t, -1)  # [K, rows * draws]
                targets = torch.arange(n_t)[:, None].expand_as(c) + bank.n_sources
                cond = bank.instance[targets.to(device), c.to(device)]
            else:
                cond = e[:, None, :].expand(n_t, len(f), dim)
            if draws_noise:
                eps = torch.stack(
                    [
                        torch.randn(
                            dim, generator=cpu_generator(draw_seed(seed, data.keys[i], k, j))
                        )
                        for k in range(n_t)
                        for i in range(start, stop)
                        for j in range(draws)
                    ]
                ).reshape(n_t, len(f), dim)
                cond = noisy(cond, cfg.sigma, eps.to(device=device, dtype=dtype))
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
