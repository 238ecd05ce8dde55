"""Do ED-SAM samples keep their source's class, and how far do they move? Read from the CLIP features."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgaug.core.parquet import embedding_matrix
from dgaug.report.collect import RunView
from dgaug.report.projection import _read_table

# Rows read at most (in shard order, whole files): bounded memory and time at any scale, and
# far more than a class centroid in a 64-to-1024-dimensional space needs.
MAX_ROWS = 50_000
_COLUMNS = ["origin", "key", "source_key", "label", "image_embedding", "text_embedding"]


@dataclass
class Retention:
    """Nearest-centroid class accuracy (centroids: the real images' embeddings per class) and
    cosine similarities of ED-SAM samples to their source image and to their caption."""

    classes: int = 0
    real: int = 0
    edsam: int = 0
    real_accuracy: float | None = None  # the real images themselves, against their own centroids
    edsam_accuracy: float | None = None  # ED-SAM samples, labelled as their source's class
    edsam_to_source: float | None = None  # mean cos(sample, its source image)
    real_to_same_class: float | None = None  # mean cos(real, another real of its class): the scale
    edsam_to_caption: float | None = None  # mean cos(sample image, its caption's text embedding)
    real_to_caption: float | None = None
    files_read: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)

    @property
    def chance(self) -> float | None:
        return 1 / self.classes if self.classes else None


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _read(view: RunView, max_rows: int) -> tuple[list[Any], tuple[int, int], list[str]]:
    folder = view.output_dir("features")
    shards = sorted(view.committed("features"))
    tables, rows, problems = [], 0, []
    if folder is None:
        return tables, (0, 0), problems
    for shard in shards:
        rel = f"{folder}/{shard:05d}.parquet"
        try:
            table = _read_table(view, rel, _COLUMNS)
        except Exception as e:  # one unreadable file is a note on the page, not a failed report
            problems.append(f"{rel}: cannot read ({type(e).__name__}: {e})")
            continue
        tables.append(table)
        rows += table.num_rows
        if rows >= max_rows:
            break
    return tables, (len(tables), len(shards)), problems


def _mean_same_class_cos(emb: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> float:
    """Mean cosine between a real image and another, random real image of its class."""
    sims = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        other = rng.permutation(idx)
        same = other == idx
        other[same] = np.roll(other, 1)[same]  # never an image with itself
        sims.append(np.sum(emb[idx] * emb[other], axis=1))
    return float(np.concatenate(sims).mean()) if sims else float("nan")


def measure(view: RunView, max_rows: int = MAX_ROWS, seed: int = 0) -> Retention:
    """Read the committed features files (up to about `max_rows` rows) and measure them."""
    import pyarrow as pa

    tables, files_read, notes = _read(view, max_rows)
    r = from_table(pa.concat_tables(tables), seed) if tables else Retention()
    r.files_read, r.notes = files_read, notes + r.notes
    return r


def from_table(table: Any, seed: int = 0) -> Retention:
    """The measures of one features table (columns as the features stage writes them)."""
    r = Retention()
    origin = np.asarray(table["origin"].to_pylist(), dtype=object)
    label = np.asarray([str(v) for v in table["label"].to_pylist()], dtype=object)
    img = _unit(embedding_matrix(table["image_embedding"]))
    txt = _unit(embedding_matrix(table["text_embedding"]))
    is_real, is_ed = origin == "real", origin == "edsam"
    r.real, r.edsam = int(is_real.sum()), int(is_ed.sum())
    if not r.real:
        return r
    classes = sorted(set(label[is_real]))
    r.classes = len(classes)
    if r.classes < 2:
        r.notes.append("the real images have fewer than 2 classes: no class accuracy")
        return r
    centroids = _unit(np.stack([img[is_real & (label == c)].mean(axis=0) for c in classes]))
    predicted = np.asarray(classes, dtype=object)[np.argmax(img @ centroids.T, axis=1)]
    r.real_accuracy = float(np.mean(predicted[is_real] == label[is_real]))
    rng = np.random.default_rng(seed)
    r.real_to_same_class = _mean_same_class_cos(img[is_real], label[is_real], rng)
    r.real_to_caption = float(np.mean(np.sum(img[is_real] * txt[is_real], axis=1)))
    if not r.edsam:
        return r
    # A sample's class is its source's (the features stage copies the label with the caption).
    r.edsam_accuracy = float(np.mean(predicted[is_ed] == label[is_ed]))
    r.edsam_to_caption = float(np.mean(np.sum(img[is_ed] * txt[is_ed], axis=1)))
    row_of = {k: i for i, k in enumerate(table["key"].to_pylist()) if is_real[i]}
    pairs = [(i, row_of.get(k)) for i, k in enumerate(table["source_key"].to_pylist()) if is_ed[i]]
    pairs = [(i, j) for i, j in pairs if j is not None]
    if pairs:
        a, b = np.asarray(pairs).T
        r.edsam_to_source = float(np.mean(np.sum(img[a] * img[b], axis=1)))
    return r
