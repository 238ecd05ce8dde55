"""The features stage: CLIP image and caption embeddings of each real and ED-SAM shard, to Parquet."""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dgaug.core.constants import IMAGE_EXTS, MAX_ASPECT_RATIO
from dgaug.core.images import open_rgb, skip_reason
from dgaug.core.parquet import embedding_column
from dgaug.core.prefetch import prefetch
from dgaug.core.scores import alpha_value, score_values
from dgaug.core.tars import read_tar_samples
from dgaug.pipeline.stage import ModelStage, Plan, ShardResult, ShardTask, StageContext
from dgaug.stages.features.config import FeaturesConfig

ORIGINS = ("real", "edsam")  # row order within a file: the real shard, then its ED-SAM samples


@dataclass
class _Row:
    """One sample's metadata; its image tensor is made in a loader thread."""

    key: str
    origin: str
    source_key: str
    sample_index: int | None
    alpha: float | None
    caption: str
    label: str | None
    domain: str | None
    image: Future[Any] | None  # the preprocessed tensor, or an exception for a bad image
    skip: str | None = None


def _preprocess(data: bytes, preprocess: Any) -> Any:
    # open_rgb: 16-bit and alpha images as the download stage makes them; a decompression bomb,
    # or a sliver that open_clip's short-side resize would blow up, raises BadImage undecoded.
    with open_rgb(data, MAX_ASPECT_RATIO) as im:
        return preprocess(im)


def _meta(members: dict[str, bytes]) -> dict[str, Any]:
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        meta = {}
    return meta if isinstance(meta, dict) else {}


class FeaturesStage(ModelStage):
    name = "features"
    output_dir = "features"
    shard_ext = ".parquet"
    model_attrs = ("_clip",)

    def __init__(self, manifest: Any):
        super().__init__(manifest)
        edsam = manifest.stages.edsam
        self.origins = ("real", "edsam") if self._with_edsam(edsam) else ("real",)
        # An instance attribute: which inputs this stage reads depends on the manifest.
        self.upstream = ("download", "edsam") if "edsam" in self.origins else ("download",)

    def _with_edsam(self, edsam: Any) -> bool:
        return bool(self.config.include_edsam and edsam is not None and edsam.enabled)

    @property
    def config(self) -> FeaturesConfig:
        return self.manifest.stages.features

    def fingerprint_config(self) -> dict[str, Any]:
        return {"features": self.config.effective(), "origins": list(self.origins)}

    # -- plan
    def plan(self, ctx: StageContext) -> Plan:
        tasks = []
        for up in ctx.upstream["download"]:
            i, stages = up.shard_id, [_STAGE_OF[o] for o in self.origins]
            tasks.append(
                ShardTask(
                    self.name,
                    i,
                    inputs=tuple(ctx.upstream_url(s, i) for s in stages),
                    deps=tuple((s, i) for s in stages),
                    outputs=(f"{self.shard_name(i)}.parquet",),
                )
            )
        return Plan(tasks)

    # -- work
    def setup(self, ctx: StageContext) -> None:
        from dgaug.models.clip import load_clip

        cfg = self.config
        t0 = time.perf_counter()
        self._clip = load_clip(cfg.model, device=cfg.device, precision=cfg.precision)
        self.log.info(
            "CLIP %s ready on %s in %.1fs",
            self._clip.model_id,
            self._clip.device,
            time.perf_counter() - t0,
        )

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        import pyarrow.parquet as pq
        import torch

        from dgaug.models.runtime import cpu_threads

        cfg, clip = self.config, self._clip
        failures: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        columns: dict[str, list[Any]] = {n: [] for n in _COLUMNS}
        images: list[Any] = []
        started = time.perf_counter()
        with (
            cpu_threads(cfg.cpu_threads, clip.device),
            ThreadPoolExecutor(max_workers=cfg.decode_threads) as pool,
        ):
            skipped: Counter[str] = Counter()  # written by the loader thread, merged after
            for batch in prefetch(self._batches(task, pool, skipped), depth=1):
                rows = []
                pixels = []
                for r in batch:
                    try:
                        pixels.append(r.image.result())
                        rows.append(r)
                    except Exception as e:  # PIL raises many types for bad bytes: skip, count
                        failures[skip_reason(e)] += 1
                if not rows:
                    continue
                images.append(clip.encode_preprocessed(torch.stack(pixels)).cpu())
                for r in rows:
                    counts[r.origin] += 1
                    for name, value in zip(_COLUMNS, _values(r), strict=True):
                        columns[name].append(value)
            text = self._text_embeddings(columns["caption"])
        failures.update(skipped)
        table = _table(columns, images, text, cfg.dtype, clip)
        pq.write_table(
            table,
            os.path.join(task.tmp_dir, task.outputs[0]),
            compression="zstd",
            write_statistics=False,
        )
        seconds = time.perf_counter() - started
        n = table.num_rows
        return ShardResult(
            samples=n,
            counts=dict(sorted(counts.items())),
            failures=dict(sorted(failures.items())),
            info={
                "model": clip.model_id,
                "device": str(clip.device),
                "embed_dim": clip.embed_dim,
                "images_per_s": round(n / seconds, 2) if seconds > 0 else None,
            },
        )

    def _batches(
        self, task: ShardTask, pool: ThreadPoolExecutor, skipped: Counter[str]
    ) -> Iterator[list[_Row]]:
        """The shard's rows in order, `batch_size` usable ones at a time, images decoding ahead.

        Submitting a batch's decodes before the model needs them keeps the loader threads one
        batch ahead; holding at most two batches bounds memory whatever the shard's size.
        """
        size = self.config.batch_size
        ahead: deque[list[_Row]] = deque()
        batch: list[_Row] = []
        for origin, url in zip(self.origins, task.inputs, strict=True):
            for key, members in read_tar_samples(url):
                row = self._row(origin, key, members, pool)
                if row.skip is not None:
                    skipped[row.skip] += 1
                    continue
                batch.append(row)
                if len(batch) == size:
                    ahead.append(batch)
                    batch = []
                    if len(ahead) > 1:
                        yield ahead.popleft()
        if batch:
            ahead.append(batch)
        while ahead:
            yield ahead.popleft()

    def _row(self, origin: str, key: str, members: dict[str, bytes], pool: ThreadPoolExecutor):
        meta = _meta(members)
        caption = members.get("txt", b"").decode("utf-8", errors="replace").strip()
        row = _Row(
            key=key,
            origin=origin,
            source_key=str(meta.get("source_key", key)),
            sample_index=meta.get("sample_index") if origin == "edsam" else None,
            alpha=alpha_value(meta.get("alpha")) if origin == "edsam" else None,
            caption=caption,
            label=_opt_str(meta.get("label")),
            domain=_opt_str(meta.get("domain")),
            image=None,
        )
        data = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if data is None:
            row.skip = "missing_image"
        elif not caption:
            row.skip = "missing_caption"
        else:
            row.image = pool.submit(_preprocess, data, self._clip.preprocess)
        return row

    def _text_embeddings(self, captions: list[str]) -> Any:
        """One text embedding per row; each distinct caption is encoded once (an ED-SAM sample
        shares its source's caption)."""
        import torch

        unique = sorted(set(captions))
        if not unique:
            return torch.empty(0, self._clip.embed_dim)
        emb = self._clip.encode_text(unique, batch_size=self.config.batch_size).cpu()
        index = {c: i for i, c in enumerate(unique)}
        return emb[torch.tensor([index[c] for c in captions])]


_STAGE_OF = {"real": "download", "edsam": "edsam"}
_COLUMNS = ("key", "origin", "source_key", "sample_index", "caption", "label", "domain", "alpha")


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _values(r: _Row) -> tuple[Any, ...]:
    return (r.key, r.origin, r.source_key, r.sample_index, r.caption, r.label, r.domain, r.alpha)


def _table(
    columns: dict[str, list[Any]], images: list[Any], text: Any, dtype: str, clip: Any
) -> Any:
    """The Parquet table: metadata columns, the scores, then fixed-size embedding lists, model in
    metadata. Scores come from the float32 embeddings, before any float16 rounding."""
    import pyarrow as pa
    import torch

    dim = clip.embed_dim
    pa_type = pa.float16() if dtype == "float16" else pa.float32()
    img = torch.cat(images) if images else torch.empty(0, dim)

    schema = pa.schema(
        [
            ("key", pa.string()),
            ("origin", pa.string()),
            ("source_key", pa.string()),
            ("sample_index", pa.int32()),
            ("caption", pa.string()),
            ("label", pa.string()),
            ("domain", pa.string()),
            ("alpha", pa.float32()),
            ("caption_score", pa.float32()),
            ("source_similarity", pa.float32()),
            ("image_embedding", pa.list_(pa_type, dim)),
            ("text_embedding", pa.list_(pa_type, dim)),
        ],
        metadata={
            "dgaug.stage": "features",
            "dgaug.model": clip.model_id,
            "dgaug.tiny_random": json.dumps(bool(clip.tiny)),
            "dgaug.embed_dim": str(dim),
            "dgaug.normalized": "l2",
        },
    )
    arrays = [pa.array(columns[n], type=schema.field(n).type) for n in _COLUMNS]
    caption, source = score_values(
        columns["key"], columns["origin"], columns["source_key"], img.numpy(), text.numpy()
    )
    arrays += [pa.array(caption, pa.float32()), pa.array(source, pa.float32())]
    embeddings = [embedding_column(t.numpy(), dtype) for t in (img, text)]
    return pa.Table.from_arrays([*arrays, *embeddings], schema=schema)
