"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas (no display, no pyplot)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from dgaug.report.collect import RunView, Training
from dgaug.report.contact import ContactSheet
from dgaug.report.projection import Projection
from dgaug.report.retention import SampleScores

ORIGIN_COLORS = {"real": "#1f77b4", "edsam": "#ff7f0e", "ldfs": "#2ca02c"}
ORIGIN_NAMES = {"real": "real", "edsam": "ED-SAM", "ldfs": "LDFS"}
MAX_CATEGORIES = 12  # a legend longer than this is unreadable: the rest is drawn as "other"
STYLE = {
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@contextmanager
def _figure(width: float, height: float) -> Iterator[Any]:
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig


def _png(fig: Any) -> bytes:
    import matplotlib as mpl

    buf = io.BytesIO()
    with mpl.rc_context(STYLE):
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plain(text: str) -> str:
    """Text from the data (domains, classes, stage names) drawn as written: an unescaped "$" pair
    would be parsed as mathtext (and fail on a stray brace)."""
    return text.replace("$", r"\$")


def _legend_name(name: Any) -> str:
    # matplotlib hides legend entries whose label starts with "_".
    text = "(none)" if name is None else plain(str(name))
    return f" {text}" if text.startswith("_") else text


def contact_png(sheet: ContactSheet) -> bytes | None:
    """Originals in the first column, their ED-SAM samples beside them, α (and score) as titles."""
    from PIL import Image

    rows = [r for r in sheet.rows if r.original.jpeg is not None]
    if not rows:
        return None
    cols = 1 + max(len(r.samples) for r in rows)
    with _figure(1.45 * cols + 0.6, 1.6 * len(rows) + 0.2) as fig:
        axes = fig.subplots(len(rows), cols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for i, r in enumerate(rows):
            for j, tile in enumerate([r.original, *r.samples]):
                ax = axes[i, j]
                if tile.jpeg is None:
                    ax.text(0.5, 0.5, "undecodable", ha="center", va="center", fontsize=7)
                    continue
                with Image.open(io.BytesIO(tile.jpeg)) as im:
                    ax.imshow(np.asarray(im.convert("RGB")), interpolation="nearest")
                if j == 0:
                    title = " / ".join(x for x in (r.domain, r.label) if x) or r.key
                else:
                    title = f"α {tile.alpha}" if tile.alpha else tile.key
                    if tile.score:
                        title += f"\nscore {tile.score}"
                ax.set_title(plain(title[:40]), fontsize=7)
        return _png(fig)


def _category_colors(values: list[str | None]) -> tuple[list[str], dict[str, Any]]:
    """A legend name per point (rare ones as "other") and a colour per name."""
    import matplotlib as mpl

    counts = Counter(_legend_name(v) for v in values)
    keep = {name for name, _ in counts.most_common(MAX_CATEGORIES)}
    names = [_legend_name(v) if _legend_name(v) in keep else "other" for v in values]
    order = sorted(set(names) - {"other"}) + (["other"] if "other" in names else [])
    # Not tab10: the origin panel beside uses its first colours, and the same colour must not
    # mean "LDFS" on the left and "photo" on the right. tab20 (paired shades) only beyond 8.
    cmap = mpl.colormaps["Dark2" if len(order) <= 8 else "tab20"]
    return names, {
        n: ("#999999" if n == "other" else cmap(i % cmap.N)) for i, n in enumerate(order)
    }


def second_key(p: Projection) -> tuple[str, list[str | None]] | None:
    """Colour the second panel by domain when the points span several, else by class."""
    for title, values in (("domain", p.domain), ("class", p.label)):
        if len({v for v in values if v is not None}) > 1:
            return title, values
    return None


def projection_png(p: Projection) -> bytes | None:
    """Per method (PCA, UMAP) a row of two panels: by origin, then by domain or class."""
    if not p.coords:
        return None
    second = second_key(p)
    ncols = 2 if second else 1
    with _figure(5.2 * ncols + 1.6, 4.4 * len(p.coords)) as fig:
        axes = fig.subplots(len(p.coords), ncols, squeeze=False)
        origins = np.array(p.origin)
        for row, (method, xy) in enumerate(p.coords.items()):
            ax = axes[row, 0]
            for o in [o for o in ORIGIN_COLORS if o in p.origin]:
                m = origins == o
                ax.scatter(
                    xy[m, 0],
                    xy[m, 1],
                    s=8,
                    alpha=0.6,
                    c=ORIGIN_COLORS[o],
                    label=f"{ORIGIN_NAMES[o]} ({int(m.sum())})",
                    linewidths=0,
                )
            ax.set_title(f"{method}: by origin")
            _axis_labels(ax, method, p)
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=2)
            if second:
                title, values = second
                names, colors = _category_colors(values)
                arr = np.array(names, dtype=object)
                ax = axes[row, 1]
                for name, color in colors.items():
                    m = arr == name
                    ax.scatter(
                        xy[m, 0], xy[m, 1], s=8, alpha=0.6, color=color, label=name, linewidths=0
                    )
                ax.set_title(f"{method}: by {title}")
                _axis_labels(ax, method, p)
                ax.legend(
                    loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=2
                )
        return _png(fig)


def _axis_labels(ax: Any, method: str, p: Projection) -> None:
    if method == "PCA" and p.explained:
        ax.set_xlabel(f"PC1 ({100 * p.explained[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * p.explained[1]:.1f}%)")
    else:
        ax.set_xlabel(f"{method} 1")
        ax.set_ylabel(f"{method} 2")


def _time_unit(span_s: float) -> tuple[float, str]:
    if span_s < 120:
        return 1.0, "seconds"
    if span_s < 120 * 60:
        return 60.0, "minutes"
    return 3600.0, "hours"


def throughput_png(view: RunView) -> bytes | None:
    """Per stage, from the markers: samples committed over time, and each shard's samples per
    second (over its last attempt) at the time it was committed."""
    series = {s: sorted(view.timings(s), key=lambda t: t.finished) for s in view.plan}
    series = {s: ts for s, ts in series.items() if ts}
    if not series:
        return None
    t0 = min(t.started for ts in series.values() for t in ts)
    scale, unit = _time_unit(max(t.finished for ts in series.values() for t in ts) - t0)
    with _figure(11.0, 3.6) as fig:
        left, right = fig.subplots(1, 2)
        for stage, ts in series.items():
            # Each curve starts when its stage's first shard started.
            x = [(ts[0].started - t0) / scale] + [(t.finished - t0) / scale for t in ts]
            y = np.cumsum([0] + [t.samples for t in ts])
            (line,) = left.step(x, y, where="post", label=f"{plain(stage)} ({len(ts)} shards)")
            rates = [(t, t.samples / t.duration_s) for t in ts if t.duration_s > 0]
            if rates:
                right.plot(
                    [(t.finished - t0) / scale for t, _ in rates],
                    [r for _, r in rates],
                    marker="o",
                    ms=3,
                    lw=0.8,
                    color=line.get_color(),
                )
        left.set_xlabel(f"{unit} since the first shard started")
        left.set_ylabel("samples committed")
        left.set_title("Samples committed over time")
        right.set_xlabel(f"{unit} since the first shard started")
        right.set_ylabel("samples/s of the shard")
        right.set_yscale("log")
        right.set_title("Each shard's throughput when committed")
        fig.legend(loc="outside right center", frameon=False)
        return _png(fig)


def scores_png(sc: SampleScores | None) -> bytes | None:
    """Each ED-SAM sample's caption score and source similarity against its alpha; the real
    images' median caption score as the reference line."""
    if sc is None or not np.any(~np.isnan(sc.alpha)):
        return None
    with _figure(11.0, 3.4) as fig:
        left, right = fig.subplots(1, 2, sharex=True)
        color = ORIGIN_COLORS["edsam"]
        left.scatter(sc.alpha, sc.caption_score, s=6, alpha=0.5, color=color, lw=0)
        if len(sc.real_caption_score):
            left.axhline(
                float(np.median(sc.real_caption_score)),
                color=ORIGIN_COLORS["real"],
                ls="--",
                lw=1,
                label="real images (median)",
            )
            left.legend(frameon=False, loc="lower right")
        left.set_ylabel("cos(sample, its caption)")
        left.set_title("Caption score against alpha")
        right.scatter(sc.alpha, sc.source_similarity, s=6, alpha=0.5, color=color, lw=0)
        right.axhline(1.0, color="grey", ls=":", lw=1)
        right.set_ylabel("cos(sample, its source image)")
        right.set_title("Source similarity against alpha (1 = a copy)")
        for ax in (left, right):
            ax.set_xlabel("alpha (the transport shift)")
        return _png(fig)


def loss_png(t: Training) -> bytes | None:
    losses = (t.train or {}).get("losses")
    if not isinstance(losses, list):
        return None
    values = [float(v) for v in losses if isinstance(v, int | float)]
    if len(values) < 2:
        return None
    with _figure(6.0, 2.8) as fig:
        ax = fig.subplots()
        ax.plot(range(1, len(values) + 1), values, lw=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(plain(f"dgaug train --mode {t.mode}: training loss"))
        return _png(fig)
