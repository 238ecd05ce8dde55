"""The mix/ view's score thresholds: which ED-SAM samples open_clip is shown, by their features scores."""

from __future__ import annotations

import logging
import posixpath

from pydantic import BaseModel, ConfigDict

from dgaug.core.scores import ScoreFilter, cosine_bound, left_out_keys, read_score_table
from dgaug.core.storage import Storage
from dgaug.pipeline.ledger import Ledger

log = logging.getLogger(__name__)


class MixConfig(BaseModel):
    """`mix:` thresholds on the ED-SAM samples linked into the open_clip view."""

    model_config = ConfigDict(extra="forbid")

    min_caption_score: float | None = cosine_bound(
        "Leave ED-SAM samples whose caption_score is below this out of mix/."
    )
    max_source_similarity: float | None = cosine_bound(
        "Leave ED-SAM samples whose source_similarity is above this out of mix/."
    )

    @property
    def score_filter(self) -> ScoreFilter:
        return ScoreFilter(self.min_caption_score, self.max_source_similarity)


def score_view_filter(manifest, storage: Storage, stages: dict) -> ScoreViewFilter | None:
    """The manifest's `mix:` thresholds as a view filter; None when none is set. The manifest
    check makes sure the edsam and features stages run when one is."""
    cfg = manifest.mix
    if cfg is None or not cfg.score_filter.active:
        return None
    edsam, features = stages["edsam"].output_dir, stages["features"].output_dir
    return ScoreViewFilter(storage, edsam.rstrip("/"), features.rstrip("/"), cfg.score_filter)


class ScoreViewFilter:
    """Judges the edsam folder's shards by the features file of the same shard number."""

    def __init__(self, storage: Storage, edsam_dir: str, features_dir: str, flt: ScoreFilter):
        self.storage = storage
        self.stage_dirs = frozenset({edsam_dir})
        self.rule = flt.describe()
        self._features_dir = features_dir
        self._filter = flt

    def left_out(self, stage_dir: str, shard: str) -> set[str] | None:
        shard_id = int(shard.removesuffix(".tar"))
        if not self.storage.exists(Ledger.marker_rel(self._features_dir, shard_id)):
            log.info("mix/: %s/%s has no committed scores yet: left out", stage_dir, shard)
            return None
        path = self.storage.path(posixpath.join(self._features_dir, f"{shard_id:05d}.parquet"))
        return left_out_keys(read_score_table(path), self._filter)[0]
