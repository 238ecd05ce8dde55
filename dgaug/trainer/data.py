"""Read dgaug's formats for training: webdataset shards as an indexed pair list, features Parquet."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dgaug.core.errors import INVALID, DgaugError
from dgaug.core.parquet import embedding_matrix
from dgaug.core.scores import ScoreFilter, left_out_keys, read_score_table

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what open_clip's loader takes as the image member


class DataError(DgaugError):
    """Training or evaluation data that cannot be used (missing folder, no samples, no labels)."""

    exit_code = INVALID


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a file, or a member's byte range inside a tar."""

    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class Pair:
    """One image-caption sample of a shard, with what its json says about it."""

    key: str
    caption: str
    image: ImageRef
    label: str | None = None
    domain: str | None = None
    source_key: str | None = None  # ED-SAM samples: the real sample they were made from


def decode_image(data: bytes):
    """8-bit RGB as the pipeline's stages decode it (16-bit scaled, alpha on white)."""
    from dgaug.core.images import open_rgb

    return open_rgb(data)


def _files(folder: str | Path, ext: str, kind: str, noun: str) -> list[Path]:
    """The folder's *.ext files, sorted; a missing folder or none in it is a DataError."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of {kind}")
    found = sorted(root.glob(f"*.{ext}"))
    if not found:
        raise DataError(f"{root}: no .{ext} {noun} in it")
    return found


def shard_paths(folder: str | Path) -> list[Path]:
    return _files(folder, "tar", "shards", "shards")


def index_shards(folder: str | Path) -> list[Pair]:
    """Every sample with an image and a caption in the folder's tars, in shard and key order.

    Reads the tar headers and the small txt/json members; image bytes stay on disk and are read
    by byte range when a batch needs them, so the index of a large folder is small.
    """
    pairs: list[Pair] = []
    for tar in shard_paths(folder):
        pairs.extend(_index_tar(tar))
    return pairs


def _index_tar(path: Path) -> list[Pair]:
    samples: dict[str, dict] = {}
    order: list[str] = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
            ext = ext.lower()
            if key not in samples:
                samples[key] = {}
                order.append(key)
            s = samples[key]
            if ext in IMAGE_EXTS and "image" not in s:
                s["image"] = ImageRef(str(path), m.offset_data, m.size)
            elif ext == "txt":
                # Shards from elsewhere may hold any bytes: a caption is never worth a crash.
                s["caption"] = tf.extractfile(m).read().decode("utf-8", errors="replace").strip()
            elif ext == "json":
                s["json"] = _json_object(tf.extractfile(m).read())
    out = []
    for key in order:
        s = samples[key]
        if "image" not in s or not s.get("caption"):
            continue  # open_clip drops these too
        meta = s.get("json", {})
        out.append(
            Pair(
                key=key,
                caption=s["caption"],
                image=s["image"],
                label=_str_or_none(meta.get("label")),
                domain=_str_or_none(meta.get("domain")),
                source_key=_str_or_none(meta.get("source_key")),
            )
        )
    return out


def _json_object(data: bytes) -> dict:
    """A json member as a dict; unreadable or not an object: {} (the sample keeps no metadata)."""
    try:
        meta = json.loads(data)
    except ValueError:  # also UnicodeDecodeError
        return {}
    return meta if isinstance(meta, dict) else {}


def _str_or_none(v) -> str | None:
    return None if v is None else str(v)


def filter_domains(pairs: Sequence[Pair], domains: Sequence[str] | None) -> list[Pair]:
    if domains is None:
        return list(pairs)
    keep = set(domains)
    return [p for p in pairs if p.domain in keep]


# ------------------------------------------------------------------------------------- features


@dataclass
class FeatureSet:
    """Rows of unit-norm embeddings with their labels and domains (float32, CPU)."""

    embeddings: torch.Tensor  # [N, D]
    labels: list[str | None]
    domains: list[str | None]
    keys: list[str]
    model: str | None = None  # the CLIP that made them (features files' metadata)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: Sequence[int]) -> FeatureSet:
        return FeatureSet(
            self.embeddings[list(idx)],
            [self.labels[i] for i in idx],
            [self.domains[i] for i in idx],
            [self.keys[i] for i in idx],
            self.model,
        )

    @staticmethod
    def concat(parts: Sequence[FeatureSet]) -> FeatureSet:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise DataError("no feature rows to train on")
        return FeatureSet(
            torch.cat([p.embeddings for p in parts]),
            [x for p in parts for x in p.labels],
            [x for p in parts for x in p.domains],
            [x for p in parts for x in p.keys],
            parts[0].model,
        )


def _parquet_files(folder: str | Path) -> list[Path]:
    return _files(folder, "parquet", "Parquet files", "files")


def _matrix(column) -> torch.Tensor:
    """A fixed-size-list column -> [rows, width] float32 (an empty column keeps its width)."""
    return torch.from_numpy(embedding_matrix(column).copy())


def read_features(
    folder: str | Path, *, origins: Sequence[str] = ("real",), domains: Sequence[str] | None = None
) -> FeatureSet:
    """Image embeddings of the features stage's files: rows of the given origins and domains."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = []
    model = None
    for path in _parquet_files(folder):
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        model = model or (meta.get(b"dgaug.model") or b"").decode() or None
        mask = pc.is_in(table["origin"], value_set=_pa_strings(origins))
        if domains is not None:
            mask = pc.and_(mask, pc.is_in(table["domain"], value_set=_pa_strings(domains)))
        table = table.filter(mask)
        parts.append(
            FeatureSet(
                _matrix(table["image_embedding"]),
                table["label"].to_pylist(),
                table["domain"].to_pylist(),
                table["key"].to_pylist(),
                model,
            )
        )
    out = FeatureSet.concat(parts) if any(len(p) for p in parts) else parts[0]
    out.model = model
    return out


def edsam_left_out(folder: str | Path, flt: ScoreFilter) -> tuple[set[str], int]:
    """(keys of the ED-SAM samples `flt` leaves out, ED-SAM samples scored) over the features
    files of `folder`; nothing is left out when no threshold is set."""
    if not flt.active:
        return set(), 0
    out: set[str] = set()
    scored = 0
    for path in _parquet_files(folder):
        left_out, n = left_out_keys(read_score_table(path), flt)
        out |= left_out
        scored += n
    return out, scored


def read_synthetic(folder: str | Path, *, sources: set[str] | None = None) -> FeatureSet:
    """LDFS synthetic rows, `domain` being the target they were synthesized for; with `sources`,
    only rows made from those real keys (the training rows: LDFS maps every real row)."""
    import pyarrow.parquet as pq

    parts = []
    for path in _parquet_files(folder):
        table = pq.read_table(path)
        keys = table["key"].to_pylist()
        if sources is not None:
            rows = [i for i, k in enumerate(keys) if k in sources]
            table, keys = table.take(_pa_indices(rows)), [keys[i] for i in rows]
        names = zip(keys, table["domain"].to_pylist(), table["draw"].to_pylist(), strict=True)
        parts.append(
            FeatureSet(
                _matrix(table["embedding"]),
                table["label"].to_pylist(),
                table["domain"].to_pylist(),
                [f"{k}@{d}#{n}" for k, d, n in names],
            )
        )
    return FeatureSet.concat(parts)


def _pa_indices(rows: Sequence[int]):
    import pyarrow as pa

    return pa.array(list(rows), type=pa.int64())


def _pa_strings(values: Sequence[str]):
    import pyarrow as pa

    return pa.array(list(values), type=pa.string())


# ------------------------------------------------------------------------------------ eval sets


def list_image_folder(
    root: str | Path, domains: Sequence[str] | None, caption_template: str
) -> list[Pair]:
    """root/<domain>/<class>/<image> as pairs (caption from the template), in sorted order."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{base}: the evaluation image folder does not exist")
    found = sorted(d.name for d in base.iterdir() if d.is_dir())
    wanted = found if domains is None else list(domains)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise DataError(f"{base}: no folder for domain(s) {missing}; found {found}")
    pairs = []
    for domain in wanted:
        for cls in sorted(d for d in (base / domain).iterdir() if d.is_dir()):
            for f in sorted(cls.iterdir()):
                if f.suffix.lower().lstrip(".") in IMAGE_EXTS:
                    caption = caption_template.format(domain=domain, label=cls.name)
                    pairs.append(Pair(f.stem, caption, ImageRef(str(f)), cls.name, domain))
    if not pairs:
        raise DataError(f"{base}: no images under <domain>/<class>/")
    return pairs
