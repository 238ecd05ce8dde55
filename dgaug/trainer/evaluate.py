"""Held-out evaluation: zero-shot and linear-probe accuracy per domain, retrieval recall@k, a table."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgaug.trainer.config import EvalConfig
from dgaug.trainer.data import (
    DataError,
    ImageRef,
    Pair,
    filter_domains,
    index_shards,
    list_image_folder,
)
from dgaug.trainer.metrics import (
    accuracy,
    fit_linear_probe,
    probe_logits,
    retrieval_recall,
    zero_shot_logits,
)
from dgaug.trainer.modes import load_pixels

KS = (1, 5, 10)


def eval_embeddings(cfg: EvalConfig, clip) -> Embedded | None:
    """The evaluation set embedded by `clip`: images through it, or (kind features) the cached
    embeddings of a features stage's real rows, made by the same model. None: no evaluation."""
    if cfg.path is None:
        return None
    if cfg.kind == "features":
        return read_eval_features(cfg)
    pairs = load_eval_set(cfg)
    return embed_eval_set(clip, pairs, batch_size=cfg.batch_size, threads=4)


def read_eval_features(cfg: EvalConfig) -> Embedded:
    """The real rows of a features folder as an evaluation set: image and caption embeddings,
    label and domain, in file and row order (at most max_per_domain per domain)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dgaug.core.parquet import embedding_matrix

    pairs: list[Pair] = []
    images, captions = [], []
    seen: dict[str | None, int] = {}
    columns = ["key", "origin", "caption", "label", "domain", "image_embedding", "text_embedding"]
    for path in sorted(Path(cfg.path).glob("*.parquet")):
        t = pq.read_table(path, columns=columns)
        t = t.filter(pc.equal(t["origin"], "real"))
        keep = []
        for i, (label, domain) in enumerate(
            zip(t["label"].to_pylist(), t["domain"].to_pylist(), strict=True)
        ):
            if label is None or (cfg.domains is not None and domain not in cfg.domains):
                continue
            seen[domain] = seen.get(domain, 0) + 1
            if cfg.max_per_domain is None or seen[domain] <= cfg.max_per_domain:
                keep.append(i)
        t = t.take(keep)
        names = zip(t["key"].to_pylist(), t["caption"].to_pylist(), strict=True)
        labels, domains = t["label"].to_pylist(), t["domain"].to_pylist()
        for (key, caption), label, domain in zip(names, labels, domains, strict=True):
            pairs.append(Pair(key, caption or "", ImageRef(str(path)), label, domain))
        images.append(torch.from_numpy(embedding_matrix(t["image_embedding"]).copy()))
        captions.append(torch.from_numpy(embedding_matrix(t["text_embedding"]).copy()))
    if not pairs:
        raise DataError(
            f"{cfg.path}: no labelled real rows in its features files (domains {cfg.domains})"
        )
    return Embedded(pairs, torch.cat(images).float(), torch.cat(captions).float())


def load_eval_set(cfg: EvalConfig) -> list[Pair]:
    """The evaluation pairs, each with a label and a domain, at most max_per_domain per domain."""
    if cfg.path is None:
        return []
    if cfg.kind == "image_folder":
        pairs = list_image_folder(cfg.path, cfg.domains, cfg.caption_template)
    else:
        pairs = filter_domains(index_shards(cfg.path), cfg.domains)
        unlabeled = sum(1 for p in pairs if p.label is None or p.domain is None)
        if unlabeled:
            raise DataError(
                f"{cfg.path}: {unlabeled} evaluation sample(s) lack a label or domain in their json"
            )
    if cfg.max_per_domain is not None:
        seen: dict[str | None, int] = {}
        kept = []
        for p in pairs:
            seen[p.domain] = seen.get(p.domain, 0) + 1
            if seen[p.domain] <= cfg.max_per_domain:
                kept.append(p)
        pairs = kept
    if not pairs:
        raise DataError(f"{cfg.path}: no evaluation samples (domains {cfg.domains})")
    return pairs


@dataclass
class Embedded:
    """The evaluation set through one CLIP: unit-norm image and caption embeddings (CPU, float32)."""

    pairs: list[Pair]
    images: torch.Tensor
    captions: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)  # undecodable images by reason


@torch.no_grad()
def embed_eval_set(clip, pairs: Sequence[Pair], *, batch_size: int, threads: int) -> Embedded:
    skipped: Counter[str] = Counter()
    kept: list[Pair] = []
    images = []
    with ThreadPoolExecutor(threads, thread_name_prefix="eval-decode") as pool:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            pixels = list(pool.map(lambda p: load_pixels(clip.preprocess, p, skipped), chunk))
            good = [j for j, x in enumerate(pixels) if x is not None]
            if good:
                batch = torch.stack([pixels[j] for j in good])
                images.append(clip.encode_preprocessed(batch).float().cpu())
                kept += [chunk[j] for j in good]
    if not kept:
        raise DataError(f"no evaluation image could be decoded ({dict(skipped)})")
    unique = sorted({p.caption for p in kept})
    text = clip.encode_text(unique).float().cpu()
    row = {c: i for i, c in enumerate(unique)}
    captions = text[[row[p.caption] for p in kept]]
    return Embedded(kept, torch.cat(images), captions, dict(skipped))


def class_prompts(classnames: Sequence[str], template: str) -> list[str]:
    return [template.format(label=c.replace("_", " ")) for c in classnames]


def evaluate(
    data: Embedded,
    classnames: Sequence[str],
    *,
    classify: Callable[[torch.Tensor], torch.Tensor],
    start: tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor] | None = None,
    probe: Callable[[torch.Tensor], torch.Tensor] | None = None,
    train_domains: Sequence[str] | None,
) -> dict:
    """Metrics per domain of the evaluation set.

    `classify` maps image embeddings to class logits: the trained model's zero-shot head (clip,
    coop) or the base CLIP's (probe). `start`, when given, is (head, image embeddings of every
    row) of the model before training, reported beside it.
    `probe` is the trained probe (probe mode); otherwise a linear probe is fitted here on the even
    rows (per class) of the training domains' images. Every accuracy is measured on the rest: the
    odd rows of the training domains, all rows of the held-out domains.
    """
    index = {c: i for i, c in enumerate(classnames)}
    domains = sorted({p.domain for p in data.pairs}, key=str)
    seen = set(domains if train_domains is None else train_domains)
    # Even and odd rows counted per (domain, class), so both halves hold every class.
    position: dict[tuple[str | None, str | None], int] = {}
    fit_rows, test_rows = [], []
    for i, p in enumerate(data.pairs):
        if p.label not in index:
            continue
        n = position[p.domain, p.label] = position.get((p.domain, p.label), -1) + 1
        (fit_rows if p.domain in seen and n % 2 == 0 else test_rows).append(i)
    skipped = sum(1 for p in data.pairs if p.label not in index)
    targets = torch.tensor([index.get(p.label, -1) for p in data.pairs])

    probe_source = "trained"
    if probe is None:
        probe_source = "fitted on the even rows of each class of the training domains"
        if len({int(targets[i]) for i in fit_rows}) < 2:
            raise DataError("the evaluation set has fewer than 2 classes in the training domains")
        w, b = fit_linear_probe(data.images[fit_rows], targets[fit_rows], len(classnames))
        probe = lambda x: probe_logits(x, w, b)  # noqa: E731

    per_domain = {}
    for d in domains:
        rows = [i for i in test_rows if data.pairs[i].domain == d]
        every = [i for i, p in enumerate(data.pairs) if p.domain == d]
        x, y = data.images[rows], targets[rows]
        entry = {
            "held_out": d not in seen,
            "images": len(rows),
            "zero_shot": accuracy(classify(x), y),
            "probe": accuracy(probe(x), y),
        }
        if start is not None:
            entry["zero_shot_start"] = accuracy(start[0](start[1][rows]), y)
        ids = _caption_ids([data.pairs[i].caption for i in every])
        entry.update(retrieval_recall(data.images[every], data.captions[every], caption_ids=ids))
        per_domain[str(d)] = entry
    held = [v for v in per_domain.values() if v["held_out"]]
    return {
        "classes": list(classnames),
        "train_domains": None if train_domains is None else list(train_domains),
        "probe": probe_source,
        "skipped_unknown_label": skipped,
        "skipped_images": dict(data.skipped),
        "domains": per_domain,
        "held_out_mean": _mean(held) if held else None,
    }


def _caption_ids(captions: Sequence[str]) -> list[int]:
    ids: dict[str, int] = {}
    return [ids.setdefault(c, len(ids)) for c in captions]


def _mean(entries: list[dict]) -> dict:
    keys = [k for k, v in entries[0].items() if isinstance(v, float)]
    out = {k: sum(e[k] for e in entries) / len(entries) for k in keys}
    out["images"] = sum(e["images"] for e in entries)
    out["held_out"] = True
    return out


def zero_shot_head(class_embeddings: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    classes = class_embeddings.float().cpu()
    return lambda x: zero_shot_logits(x, classes)


def markdown_table(result: dict) -> str:
    """The per-domain results as a markdown table; held-out domains are marked, their mean last."""
    has_start = any("zero_shot_start" in v for v in result["domains"].values())
    head = ["domain", "images", "zero-shot"] + (["zero-shot (start)"] if has_start else [])
    head += ["probe"] + [f"I→T R@{k}" for k in KS] + [f"T→I R@{k}" for k in KS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, v: dict) -> str:
        cells = [name, str(v["images"]), _pct(v["zero_shot"])]
        if has_start:
            cells.append(_pct(v.get("zero_shot_start", math.nan)))
        cells.append(_pct(v["probe"]))
        cells += [_pct(v[f"image_to_text@{k}"]) for k in KS]
        cells += [_pct(v[f"text_to_image@{k}"]) for k in KS]
        return "| " + " | ".join(cells) + " |"

    for name, v in result["domains"].items():
        lines.append(row(name + (" (held out)" if v["held_out"] else " (train)"), v))
    if result.get("held_out_mean"):
        lines.append(row("**held-out mean**", result["held_out_mean"]))
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"
