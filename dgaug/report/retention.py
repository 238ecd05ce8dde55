"""Do ED-SAM samples keep their source's class, and how far do they move? Read from the CLIP features."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgaug.core.parquet import embedding_matrix
from dgaug.core.scores import SCORE_COLUMNS, table_score_columns
from dgaug.report.collect import RunView

# Rows read at most (in shard order, whole files): bounded memory and time at any scale, and
# far more than a class centroid in a 64-to-1024-dimensional space needs.
MAX_ROWS = 50_000
_COLUMNS = ["origin", "key", "source_key", "label", "image_embedding", "text_embedding"]
ALPHA_BINS = 5  # the score table's rows: alpha cut into this many equal-width bins over [-rho, rho]


@dataclass
class SampleScores:
    """Per ED-SAM sample: its alpha (NaN where the file has none) and its two scores (NaN where
    its source was not embedded); and every real image's caption score, for scale."""

    alpha: np.ndarray
    caption_score: np.ndarray
    source_similarity: np.ndarray
    real_caption_score: np.ndarray

    def by_alpha(self, bins: int = ALPHA_BINS) -> list[tuple[float, float, int, float, float]]:
        """(bin low, bin high, samples, median caption score, median source similarity) per
        alpha bin that holds samples."""
        have = ~np.isnan(self.alpha)
        if not have.any():
            return []
        a = self.alpha[have]
        lo, hi = float(a.min()), float(a.max())
        edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.array([lo, hi])
        which = np.clip(np.searchsorted(edges, a, side="right") - 1, 0, len(edges) - 2)
        rows = []
        for b in range(len(edges) - 1):
            m = which == b
            if m.any():
                rows.append(
                    (
                        float(edges[b]),
                        float(edges[b + 1]),
                        int(m.sum()),
                        float(np.nanmedian(self.caption_score[have][m])),
                        _nanmedian(self.source_similarity[have][m]),
                    )
                )
        return rows


def _nanmedian(x: np.ndarray) -> float:
    return float(np.nanmedian(x)) if np.any(~np.isnan(x)) else float("nan")


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
    scores: SampleScores | None = field(default=None, repr=False)
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
            table = _read_table(view, rel)
        except Exception as e:  # one unreadable file is a note on the page, not a failed report
            problems.append(f"{rel}: cannot read ({type(e).__name__}: {e})")
            continue
        tables.append(table)
        rows += table.num_rows
        if rows >= max_rows:
            break
    return tables, (len(tables), len(shards)), problems


def _read_table(view: RunView, rel: str) -> Any:
    """The measured columns of one features file; the score columns where the file has them."""
    import pyarrow.parquet as pq

    with view.storage.fs.open(view.storage.path(rel), "rb") as f:
        pf = pq.ParquetFile(f)
        have = set(pf.schema_arrow.names)
        return pf.read(columns=_COLUMNS + [c for c in SCORE_COLUMNS if c in have])


def _sample_scores(table: Any, is_real: np.ndarray, is_ed: np.ndarray) -> SampleScores:
    """The features stage's score columns (computed alike for files written before them)."""
    caption, source = (_floats(c) for c in table_score_columns(table))
    alpha = _floats(table["alpha"].to_pylist()) if "alpha" in table.column_names else None
    if alpha is None:
        alpha = np.full(len(caption), np.nan)
    return SampleScores(alpha[is_ed], caption[is_ed], source[is_ed], caption[is_real])


def _floats(values: list[float | None]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


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
    if r.edsam:
        r.scores = _sample_scores(table, is_real, is_ed)
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
