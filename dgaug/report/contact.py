"""The contact sheet's content: seeded source images, each with its ED-SAM samples, α and score."""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from dgaug.core.constants import IMAGE_EXTS, MAX_ASPECT_RATIO
from dgaug.core.images import open_rgb
from dgaug.core.tars import read_tar_samples
from dgaug.report.collect import RunView

log = logging.getLogger(__name__)

# Sources are drawn among the first HEAD samples of a shard: the tar is streamed up to the last one
# drawn, so a 10,000-sample shard on object storage is not read to its end for one image.
HEAD = 256
THUMB = 192  # longest side of an embedded image, in pixels


@dataclass
class Tile:
    """One image of the sheet: a JPEG thumbnail (None when it cannot be decoded) and its labels."""

    key: str
    jpeg: bytes | None
    size: tuple[int, int] = (0, 0)  # the stored image's size, before the thumbnail
    alpha: str | None = None
    score: str | None = None
    score_kind: str | None = None


@dataclass
class ContactRow:
    shard: int
    key: str
    caption: str
    label: str | None
    domain: str | None
    original: Tile
    samples: list[Tile] = field(default_factory=list)
    note: str | None = None  # why the samples are missing


@dataclass
class ContactSheet:
    rows: list[ContactRow]
    note: str | None = None  # why the sheet is empty or has no ED-SAM samples
    problems: list[str] = field(default_factory=list)


def thumbnail(data: bytes) -> tuple[bytes | None, tuple[int, int]]:
    """JPEG bytes of the image shrunk to THUMB px at most, and its original size; (None, (0, 0))
    for bytes that do not decode (the shards hold what the internet served)."""
    try:
        with open_rgb(data, MAX_ASPECT_RATIO) as im:
            size = im.size
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            return buf.getvalue(), size
    except Exception:  # PIL raises many types for bad bytes: the tile says "undecodable"
        return None, (0, 0)


def _image(members: dict[str, bytes]) -> bytes | None:
    return next((members[e] for e in IMAGE_EXTS if e in members), None)


def _json(members: dict[str, bytes]) -> dict[str, Any]:
    try:
        meta = json.loads(members.get("json", b"{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _opt(v: Any) -> str | None:
    return None if v is None else str(v)


def format_alpha(alpha: Any) -> str | None:
    """The sample's α as its record holds it: a scalar, per channel, or per pixel (mean, range)."""
    if isinstance(alpha, int | float):
        return f"{alpha:.3g}"
    if isinstance(alpha, list) and alpha and all(isinstance(a, int | float) for a in alpha):
        return f"{sum(alpha) / len(alpha):.3g} (mean of {len(alpha)} channels)"
    if isinstance(alpha, dict) and {"mean", "min", "max"} <= set(alpha):
        try:
            return f"{alpha['mean']:.3g} [{alpha['min']:.2g}, {alpha['max']:.2g}]"
        except (TypeError, ValueError):
            return None
    return None


def sample_tile(key: str, members: dict[str, bytes]) -> Tile:
    rec = _json(members)
    jpeg, size = thumbnail(_image(members) or b"")
    score = rec.get("reference_loss")  # measured only under objective `worst`
    return Tile(
        key,
        jpeg,
        size,
        alpha=format_alpha(rec.get("alpha")),
        score=f"{score:.4g}" if isinstance(score, int | float) else None,
        score_kind=_opt(rec.get("reference_loss_kind")),
    )


def pick_sources(view: RunView, n: int, seed: int) -> dict[int, list[int]]:
    """{shard: sorted positions in its real tar}: n draws, seeded, over up to n shards.

    Shards whose ED-SAM samples are committed are preferred, so that rows are complete.
    """
    real = view.committed("download")
    edsam = view.committed("edsam")
    pool = sorted(s for s in real if s in edsam) or sorted(real)
    rng = random.Random(seed)
    shards = rng.sample(pool, min(n, len(pool)))
    candidates = [
        (s, i) for s in sorted(shards) for i in range(min(int(real[s].get("samples", 0)), HEAD))
    ]
    picks: dict[int, list[int]] = {}
    for s, i in rng.sample(candidates, min(n, len(candidates))):
        picks.setdefault(s, []).append(i)
    return {s: sorted(v) for s, v in sorted(picks.items())}


def build_sheet(view: RunView, n: int, seed: int) -> ContactSheet:
    real_dir = view.output_dir("download")
    if n <= 0:
        return ContactSheet([], "no source images asked for (--samples 0)")
    if real_dir is None or not view.committed("download"):
        return ContactSheet([], "no real shard is committed yet: there is no image to show")
    sheet = ContactSheet([])
    edsam_dir = view.output_dir("edsam")
    edsam_done = view.committed("edsam")
    for shard, positions in pick_sources(view, n, seed).items():
        name = f"{shard:05d}.tar"
        try:
            rows = _read_sources(view, f"{real_dir}/{name}", shard, positions)
        except Exception as e:  # a shard the report cannot read is shown as a problem, not a crash
            sheet.problems.append(f"{real_dir}/{name}: cannot read ({type(e).__name__}: {e})")
            continue
        if edsam_dir is None or not edsam_done:
            pass  # the sheet's note says it once
        elif shard not in edsam_done:
            for r in rows:
                r.note = f"edsam shard {shard:05d} is not committed"
        else:
            try:
                _attach_samples(view, f"{edsam_dir}/{name}", rows)
            except Exception as e:
                sheet.problems.append(f"{edsam_dir}/{name}: cannot read ({type(e).__name__}: {e})")
        sheet.rows.extend(rows)
    if edsam_dir is None:
        sheet.note = "the edsam stage is not part of this run: originals only"
    elif not edsam_done:
        sheet.note = "no edsam shard is committed yet: originals only"
    return sheet


def _read_sources(view: RunView, rel: str, shard: int, positions: list[int]) -> list[ContactRow]:
    wanted = set(positions)
    rows = []
    stream = read_tar_samples(view.storage.url(rel))
    try:
        for i, (key, members) in enumerate(stream):
            if i in wanted:
                meta = _json(members)
                jpeg, size = thumbnail(_image(members) or b"")
                caption = members.get("txt", b"").decode("utf-8", errors="replace").strip()
                rows.append(
                    ContactRow(
                        shard,
                        key,
                        caption,
                        _opt(meta.get("label")),
                        _opt(meta.get("domain")),
                        Tile(key, jpeg, size),
                    )
                )
            if i >= positions[-1]:
                break
    finally:
        stream.close()  # closes the tar and the (remote) file now, not at garbage collection
    return rows


def _attach_samples(view: RunView, rel: str, rows: list[ContactRow]) -> None:
    by_key = {r.key: r for r in rows}
    last = max(by_key)
    stream = read_tar_samples(view.storage.url(rel))
    try:
        for key, members in stream:
            # ED-SAM keys are <source key>_<j>, in source order: past the last source, stop.
            source = str(_json(members).get("source_key") or key.rpartition("_")[0])
            if source in by_key:
                by_key[source].samples.append(sample_tile(key, members))
            elif key.rpartition("_")[0] > last:
                break
    finally:
        stream.close()
    for r in rows:
        if not r.samples:
            r.note = "no ED-SAM sample of this image (its source was skipped)"
