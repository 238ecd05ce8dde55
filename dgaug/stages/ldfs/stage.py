"""The LDFS stages: fit the mapper once on every real feature (a barrier), then synthesize per shard."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from dgaug.core.constants import TINY
from dgaug.core.errors import ManifestError
from dgaug.core.hashing import sha256_hex
from dgaug.pipeline.stage import Plan, ShardResult, ShardTask, Stage, StageContext
from dgaug.stages.ldfs.config import LdfsConfig

MAPPER = "mapper.safetensors"
CURVE = "curve.json"


class _LdfsBase(Stage):
    """What both LDFS stages share: the config, the CLIP text encoder, the attributes file."""

    uses_gpu = False  # small MLPs on features: the CPU is enough, the GPUs stay with the models

    def __init__(self, manifest: Any):
        super().__init__(manifest)
        self._clip: Any = None
        self._attributes: dict[str, list[str]] | None = None

    @property
    def config(self) -> LdfsConfig:
        return self.manifest.stages.ldfs

    @property
    def features(self) -> Any:
        return self.manifest.stages.features

    def default_resources(self):
        from dgaug.pipeline.resources import StageResources

        return StageResources(workers=1, num_cpus=1, num_gpus=0)

    def fingerprint_config(self) -> dict[str, Any]:
        """The LDFS settings, the seed, the text encoder, and the attribute file's content."""
        return {
            "seed": self.manifest.seed,
            "ldfs": self.config.model_dump(
                mode="json", exclude=set(self.config.PERFORMANCE_FIELDS)
            ),
            "text_model": self.features.model,
            "attributes_sha256": self._attributes_digest(),
        }

    def _attributes_digest(self) -> str | None:
        path = self.config.attributes
        if path is None:
            return None
        try:  # read at planning time: a missing file stops the run before any work
            return sha256_hex(_attributes_bytes(path))
        except ValueError as e:
            raise ManifestError([str(e)]) from None  # the manifest names the file

    def setup(self, ctx: StageContext) -> None:
        from dgaug.models.clip import load_clip

        f = self.features
        # The text tower of the CLIP that made the features: directions must live in its space.
        # This stage declares no GPU, so "auto" finds one only where the worker has it.
        device = "cpu" if f.model == TINY or f.device == "cpu" else "auto"
        self._clip = load_clip(f.model, device=device, precision=f.precision)
        if self.config.attributes is not None:
            self._attributes = load_attributes(self.config.attributes)

    def teardown(self) -> None:
        self._clip = None

    def _text(self, texts: Any) -> Any:
        return self._clip.encode_text(list(texts)).float().cpu()


class LdfsFitStage(_LdfsBase):
    """One task that reads every committed features shard: the barrier before synthesis."""

    name = "ldfs_fit"
    output_dir = "ldfs/fit"
    upstream = ("features",)
    shard_ext = ".safetensors"

    def plan(self, ctx: StageContext) -> Plan:
        ups = ctx.upstream["features"]
        if not ups:
            return Plan([])
        task = ShardTask(
            self.name,
            0,
            inputs=tuple(ctx.upstream_url("features", u.shard_id, ".parquet") for u in ups),
            deps=tuple(("features", u.shard_id) for u in ups),
            outputs=(MAPPER, CURVE),
        )
        return Plan([task])

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        from safetensors.torch import save_file

        from dgaug.models.runtime import cpu_threads
        from dgaug.stages.ldfs.fit import fit

        data = read_source_features(task.inputs)
        t0 = time.perf_counter()
        with cpu_threads(self.features.cpu_threads, self._clip.device):
            result = fit(
                data,
                self._text,
                self.config,
                self.manifest.seed,
                attributes=self._attributes,
                logit_scale=self._clip.logit_scale,
                log=self.log.info,
            )
        seconds = time.perf_counter() - t0
        meta = {
            "stage": self.name,
            "method": self.config.method,
            "text_model": self.features.model,
            "dim": int(data.features.shape[1]),
            "config": self.config.model_dump(mode="json"),
        }
        state = {k: v.contiguous() for k, v in result.state.items()}
        # One metadata key: safetensors writes several in hash order, which changes per process,
        # and the same manifest must give the same bytes.
        save_file(
            state,
            os.path.join(task.tmp_dir, MAPPER),
            metadata={"dgaug": json.dumps(meta, sort_keys=True)},
        )
        with open(os.path.join(task.tmp_dir, CURVE), "w") as f:
            json.dump(
                {"best_epoch": result.best_epoch, "curve": result.curve, "info": result.info},
                f,
                indent=1,
                sort_keys=True,
                default=str,
            )
        best = result.curve[result.best_epoch - 1] if result.curve else {}
        return ShardResult(
            samples=len(data.keys),
            counts={"source_features": len(data.keys)},
            info={"best_epoch": result.best_epoch, "best": best, "fit_s": round(seconds, 2)},
        )


class LdfsStage(_LdfsBase):
    """Per features shard: K' synthesized features per real feature and target domain."""

    name = "ldfs"
    output_dir = "ldfs"
    upstream = ("features", "ldfs_fit")
    shard_ext = ".parquet"

    def __init__(self, manifest: Any):
        super().__init__(manifest)
        self._mapper: Any = None
        self._mapper_sha: str | None = None

    def plan(self, ctx: StageContext) -> Plan:
        # The fit's one output is not a numbered shard: named in its folder, not by upstream_url.
        mapper = ctx.storage.url(f"{ctx.output_dirs[LdfsFitStage.name]}/{MAPPER}")
        return Plan(
            [
                ShardTask(
                    self.name,
                    u.shard_id,
                    inputs=(ctx.upstream_url("features", u.shard_id, ".parquet"), mapper),
                    deps=(("features", u.shard_id), (LdfsFitStage.name, 0)),
                    outputs=(f"{self.shard_name(u.shard_id)}.parquet",),
                )
                for u in ctx.upstream["features"]
            ]
        )

    def _load_mapper(self, url: str) -> Any:
        """The committed mapper, read once per worker (again only if its bytes changed)."""
        from safetensors.torch import load

        from dgaug.stages.ldfs.mappers import load_mapper

        raw = _read_bytes(url)
        sha = sha256_hex(raw)
        if sha != self._mapper_sha:
            state = load(raw)
            dim = _mapper_dim(raw)
            self._mapper, self._mapper_sha = load_mapper(state, self.config, dim), sha
        return self._mapper

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        import pyarrow.parquet as pq

        from dgaug.models.runtime import cpu_threads
        from dgaug.stages.ldfs.synthesis import synthesize

        mapper = self._load_mapper(task.inputs[1])
        data = read_source_features(task.inputs[:1])
        with cpu_threads(self.features.cpu_threads, self._clip.device):
            rows = synthesize(
                mapper, data, self._text, self.config, self.manifest.seed, self._attributes
            )
        table = ldfs_table(rows, self.config.dtype, data.features.shape[1], self._metadata())
        pq.write_table(table, os.path.join(task.tmp_dir, task.outputs[0]), compression="zstd")
        return ShardResult(
            samples=table.num_rows,
            counts={"source_features": len(data.keys), "targets": len(self.config.targets)},
        )

    def _metadata(self) -> dict[str, str]:
        return {
            "dgaug.stage": self.name,
            "dgaug.method": self.config.method,
            "dgaug.text_model": self.features.model,
            "dgaug.mapper_sha256": self._mapper_sha or "",
            "dgaug.normalized": "l2",
        }


# -- helpers (plain functions: the tests and the trainer use them too)


def _read_bytes(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as f:
        return f.read()


def load_attributes(url: str) -> dict[str, list[str]]:
    """{label: [attribute, ...]} from a JSON file; ValueError naming what is wrong."""
    return json.loads(_attributes_bytes(url))


def _attributes_bytes(url: str) -> bytes:
    """The attributes file's bytes, once checked to be {label: [attribute, ...]}."""
    try:
        raw = _read_bytes(url)
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        raise ValueError(f"stages.ldfs.attributes: cannot read {url}: {e}") from e
    ok = isinstance(data, dict) and all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(a, str) for a in v)
        for k, v in data.items()
    )
    if not ok:
        raise ValueError(f"stages.ldfs.attributes: {url} must map each label to a list of strings")
    return raw


def _mapper_dim(raw: bytes) -> int:
    # The safetensors header: 8 bytes of length, then JSON holding our metadata.
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return int(json.loads(header["__metadata__"]["dgaug"])["dim"])


def read_source_features(urls: Any) -> Any:
    """The real rows of features Parquet files, in file and row order, as SourceFeatures."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from dgaug.core.parquet import embedding_matrix
    from dgaug.stages.ldfs.data import SourceFeatures

    keys: list[str] = []
    labels: list[Any] = []
    captions: list[Any] = []
    chunks = []
    for url in urls:
        t = pq.read_table(url, columns=["key", "origin", "label", "caption", "image_embedding"])
        t = t.filter(pc.equal(t["origin"], "real"))
        keys += t["key"].to_pylist()
        labels += t["label"].to_pylist()
        captions += t["caption"].to_pylist()
        chunks.append(embedding_matrix(t["image_embedding"]))
    feats = torch.from_numpy(np.concatenate(chunks)) if chunks else torch.empty(0, 0)
    return SourceFeatures(
        keys=keys,
        features=torch.nn.functional.normalize(feats, dim=-1),  # float16 storage: renormalize
        labels=labels if labels and all(v is not None for v in labels) else None,
        captions=captions if captions and all(v is not None for v in captions) else None,
    )


def ldfs_table(rows: list[dict[str, Any]], dtype: str, dim: int, metadata: dict[str, str]) -> Any:
    import numpy as np
    import pyarrow as pa

    from dgaug.core.parquet import embedding_column

    pa_type = pa.float16() if dtype == "float16" else pa.float32()
    emb = np.stack([r["embedding"] for r in rows]) if rows else np.empty((0, dim), np.float32)
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("domain", pa.string()),
            ("draw", pa.int32()),
            ("label", pa.string()),
            ("caption", pa.string()),
            ("embedding", pa.list_(pa_type, dim)),
        ],
        metadata=metadata,
    )
    cols = [pa.array([r[n] for r in rows], type=schema.field(n).type) for n in schema.names[:-1]]
    return pa.Table.from_arrays([*cols, embedding_column(emb, dtype)], schema=schema)
