"""Per-sample ED-SAM scores (caption fit, distance to source) and the thresholds users filter by."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dgaug.core.parquet import embedding_matrix

# Columns the features stage writes beside the embeddings. caption_score: cos(image, its caption)
# by the features CLIP, every row. source_similarity: cos(ED-SAM sample, its source image), null
# for real rows and where the source was skipped. alpha: the sample's transport shift (its mean
# for channel / element shapes), null for real rows.
SCORE_COLUMNS = ("caption_score", "source_similarity", "alpha")


def score_values(
    keys: list[str], origins: list[str], source_keys: list[str], img: Any, txt: Any
) -> tuple[list[float], list[float | None]]:
    """(caption_score, source_similarity) per row from unit-norm [N, D] float32 embeddings.

    A sample's source is the real row of the same file whose key is its source_key: the features
    stage puts a real shard and its ED-SAM samples in one file.
    """
    import numpy as np

    img = np.asarray(img, dtype=np.float32)
    txt = np.asarray(txt, dtype=np.float32)
    caption = np.sum(img * txt, axis=1) if len(keys) else np.zeros(0, np.float32)
    real_row = {k: i for i, (k, o) in enumerate(zip(keys, origins, strict=True)) if o == "real"}
    source: list[float | None] = []
    for i, (o, s) in enumerate(zip(origins, source_keys, strict=True)):
        j = real_row.get(s) if o == "edsam" else None
        source.append(None if j is None else float(np.dot(img[i], img[j])))
    return [float(c) for c in caption], source


def alpha_value(record: Any) -> float | None:
    """One number for a sample json's `alpha`: the scalar, or the mean of its channels / elements."""
    if isinstance(record, bool):
        return None
    if isinstance(record, int | float):
        return float(record)
    if isinstance(record, list) and record and all(isinstance(a, int | float) for a in record):
        return float(sum(record) / len(record))
    if isinstance(record, dict) and isinstance(record.get("mean"), int | float):
        return float(record["mean"])
    return None


def cosine_bound(description: str) -> Any:
    """A manifest field for an optional threshold on a cosine score: null, or within [-1, 1]."""
    from pydantic import Field

    return Field(None, ge=-1, le=1, description=description)


@dataclass(frozen=True)
class ScoreFilter:
    """Which ED-SAM samples a reader keeps; samples are never deleted, only left out of a view."""

    min_caption_score: float | None = None
    max_source_similarity: float | None = None

    @property
    def active(self) -> bool:
        return self.min_caption_score is not None or self.max_source_similarity is not None

    def keeps(self, caption_score: float | None, source_similarity: float | None) -> bool:
        """A sample without a score cannot show it passes a threshold on that score: left out."""
        if self.min_caption_score is not None and not _at_least(
            caption_score, self.min_caption_score
        ):
            return False
        if self.max_source_similarity is not None:
            if source_similarity is None or math.isnan(source_similarity):
                return False
            return source_similarity <= self.max_source_similarity
        return True

    def describe(self) -> str:
        parts = []
        if self.min_caption_score is not None:
            parts.append(f"caption_score >= {self.min_caption_score:g}")
        if self.max_source_similarity is not None:
            parts.append(f"source_similarity <= {self.max_source_similarity:g}")
        return " and ".join(parts) or "no threshold"


def _at_least(v: float | None, bound: float) -> bool:
    return v is not None and not math.isnan(v) and v >= bound


def table_score_columns(table: Any) -> tuple[list[float | None], list[float | None]]:
    """(caption_score, source_similarity) of every row of one features table.

    Files written before the score columns existed have the embeddings: scored from them the
    same way, so old and new files read alike.
    """
    if "caption_score" in table.column_names and "source_similarity" in table.column_names:
        return table["caption_score"].to_pylist(), table["source_similarity"].to_pylist()
    return score_values(
        table["key"].to_pylist(),
        table["origin"].to_pylist(),
        table["source_key"].to_pylist(),
        embedding_matrix(table["image_embedding"]),
        embedding_matrix(table["text_embedding"]),
    )


def table_scores(table: Any) -> dict[str, tuple[float | None, float | None]]:
    """ED-SAM key -> (caption_score, source_similarity) of one features table."""
    keys = table["key"].to_pylist()
    origins = table["origin"].to_pylist()
    caption, source = table_score_columns(table)
    return {
        k: (c, s) for k, o, c, s in zip(keys, origins, caption, source, strict=True) if o == "edsam"
    }


def left_out_keys(table: Any, flt: ScoreFilter) -> tuple[set[str], int]:
    """(the ED-SAM keys of the table that `flt` leaves out, ED-SAM rows scored)."""
    scores = table_scores(table)
    return {k for k, (c, s) in scores.items() if not flt.keeps(c, s)}, len(scores)


SCORE_READ_COLUMNS = [
    "key",
    "origin",
    "source_key",
    "caption_score",
    "source_similarity",
    "image_embedding",
    "text_embedding",
]


def read_score_table(path: Any) -> Any:
    """The columns `table_scores` needs from one features file (score columns when present)."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    scored = {"caption_score", "source_similarity"} <= names
    cols = [
        c for c in SCORE_READ_COLUMNS if c in names and not (scored and c.endswith("_embedding"))
    ]
    return pq.read_table(path, columns=cols)
