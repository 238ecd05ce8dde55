"""The feature space in 2-D: a bounded, seeded subsample of real, ED-SAM and LDFS features; PCA, UMAP."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgaug.core.parquet import embedding_matrix
from dgaug.report.collect import RunView

log = logging.getLogger(__name__)

ORIGINS = ("real", "edsam", "ldfs")
# Points are drawn from at least this many files (when there are that many), so that one shard's
# slice of the source does not stand for the whole run.
MIN_FILES = 8


@dataclass
class Projection:
    """Sampled points with their origin, domain and class, and their 2-D coordinates per method."""

    origin: list[str] = field(default_factory=list)
    domain: list[str | None] = field(default_factory=list)
    label: list[str | None] = field(default_factory=list)
    coords: dict[str, np.ndarray] = field(default_factory=dict)  # "PCA" / "UMAP" -> [n, 2]
    explained: tuple[float, float] | None = None  # PCA's share of variance per axis
    files_read: dict[str, tuple[int, int]] = field(default_factory=dict)  # origin -> (read, all)
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.origin)

    def counts(self) -> dict[str, int]:
        return {o: self.origin.count(o) for o in ORIGINS if o in self.origin}


@dataclass
class _Rows:
    """Rows of one origin gathered so far."""

    emb: list[np.ndarray] = field(default_factory=list)
    domain: list[str | None] = field(default_factory=list)
    label: list[str | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(len(e) for e in self.emb)


def _read_table(view: RunView, rel: str, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    # Through the output's own filesystem; reading only the needed columns of a remote file.
    with view.storage.fs.open(view.storage.path(rel), "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def _take(table: Any, column: str, cap: int, rng: random.Random) -> tuple[Any, np.ndarray]:
    """At most `cap` rows of `table` (seeded draw, file order kept) and their embeddings as float32."""
    rows = sorted(rng.sample(range(table.num_rows), cap)) if table.num_rows > cap else None
    if rows is not None:
        table = table.take(rows)
    return table, embedding_matrix(table[column])


def _gather(
    view: RunView, stage: str, files_origin: str | None, max_points: int, rng: random.Random
) -> tuple[dict[str, _Rows], tuple[int, int], list[str]]:
    """Rows per origin from the committed files of `stage`, read in a seeded order until each
    origin has max_points rows (or the files run out). `files_origin`: the origin of every row
    (ldfs files have no origin column); None: the features files' `origin` column."""
    problems: list[str] = []
    out: dict[str, _Rows] = {}
    folder = view.output_dir(stage)
    shards = sorted(view.committed(stage))
    if folder is None or not shards:
        return out, (0, 0), problems
    rng.shuffle(shards)
    cap = math.ceil(max_points / min(len(shards), MIN_FILES))  # rows per origin per file
    column = "embedding" if files_origin else "image_embedding"
    columns = [column, "label", "domain"] + ([] if files_origin else ["origin"])
    read = 0
    for shard in shards:
        rel = f"{folder}/{shard:05d}.parquet"
        try:
            table = _read_table(view, rel, columns)
        except Exception as e:  # an unreadable file is reported on the page; the rest is drawn
            problems.append(f"{rel}: cannot read ({type(e).__name__}: {e})")
            continue
        read += 1
        origins = [files_origin] if files_origin else sorted(set(table["origin"].to_pylist()))
        for origin in origins:
            if files_origin:
                part = table
            else:
                import pyarrow.compute as pc

                part = table.filter(pc.equal(table["origin"], origin))
            part, emb = _take(part, column, cap, rng)
            rows = out.setdefault(str(origin), _Rows())
            rows.emb.append(emb)
            rows.domain += part["domain"].to_pylist()
            rows.label += part["label"].to_pylist()
        if out and all(r.n >= max_points for r in out.values()):
            break
    return out, (read, len(shards)), problems


def _share(available: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` points evenly over origins; what a small origin cannot use goes to the others."""
    left, share = total, dict.fromkeys(available, 0)
    open_ = sorted(available, key=lambda o: available[o])
    while open_ and left > 0:
        each = left // len(open_)
        if each == 0:
            break
        o = open_[0]
        if available[o] <= each:
            share[o] = available[o]
            left -= available[o]
            open_.pop(0)
        else:
            for o in open_:
                share[o] = each
            left -= each * len(open_)
            open_ = []
    return share


def pca(x: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The first two principal components of `x` (numpy only), signs fixed for stable figures."""
    xc = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    comps = vt[:2]
    # An SVD's signs are arbitrary: make each axis's largest loading positive.
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1, signs)[:, None]
    xy = xc @ comps.T
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    var = s**2
    total = float(var.sum()) or 1.0
    ratios = [float(v / total) for v in var[:2]] + [0.0, 0.0]
    return xy.astype(np.float32), (ratios[0], ratios[1])


def _umap(x: np.ndarray, seed: int) -> np.ndarray | None:
    try:
        import umap  # optional: used when installed, never a dependency
    except ImportError:
        return None
    n_neighbors = min(15, len(x) - 1)
    return umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed).fit_transform(x)


def project(view: RunView, max_points: int, seed: int, *, use_umap: bool = True) -> Projection:
    p = Projection()
    if max_points <= 0:
        p.notes.append("no points asked for (--max-points 0)")
        return p
    rng = random.Random(seed)
    rows, read, problems = _gather(view, "features", None, max_points, rng)
    p.files_read["features"] = read
    ldfs, read, more = _gather(view, "ldfs", "ldfs", max_points, rng)
    p.files_read["ldfs"] = read
    p.notes += problems + more
    dims = {o: r.emb[0].shape[1] for o, r in rows.items() if r.emb}
    for o, r in ldfs.items():
        if r.emb and dims and r.emb[0].shape[1] not in dims.values():
            p.notes.append(
                f"LDFS features have {r.emb[0].shape[1]} dimensions, the CLIP features "
                f"{sorted(set(dims.values()))}: LDFS not shown"
            )
            continue
        rows[o] = r
    share = _share({o: r.n for o, r in rows.items()}, max_points)
    xs = []
    for origin in [o for o in ORIGINS if o in rows] + sorted(set(rows) - set(ORIGINS)):
        r, k = rows[origin], share.get(origin, 0)
        if k == 0:
            continue
        emb = np.concatenate(r.emb)
        idx = sorted(rng.sample(range(len(emb)), k))
        xs.append(emb[idx])
        p.origin += [origin] * k
        p.domain += [r.domain[i] for i in idx]
        p.label += [r.label[i] for i in idx]
    if not xs:
        return p
    x = np.concatenate(xs)
    # float16 storage leaves them slightly off the unit sphere: renormalize, as the trainer does.
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    p.coords["PCA"], p.explained = pca(x)
    if use_umap and len(x) >= 20:
        try:
            xy = _umap(x, seed)
        except Exception as e:  # umap is optional; its failure costs only its panel
            p.notes.append(f"UMAP failed ({type(e).__name__}: {e}); PCA only")
            xy = None
        if xy is not None:
            p.coords["UMAP"] = np.asarray(xy, dtype=np.float32)
    return p
