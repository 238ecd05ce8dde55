"""Make the report: read the run, draw its figures, write index.html and the PNGs through Storage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dgaug import __version__
from dgaug.core.storage import Storage
from dgaug.core.values import url_secret
from dgaug.report.collect import NothingToReport, read_run

log = logging.getLogger(__name__)

REPORT_DIR = "report"  # OUTPUT/report/ unless another destination is given
INDEX = "index.html"
FIXED_FIGURES = ("contact.png", "projection.png", "throughput.png", "scores.png")

__all__ = ["NothingToReport", "ReportResult", "build_report"]


@dataclass
class ReportResult:
    index: str  # where index.html is: a local path or protocol://path
    figures: list[str] = field(default_factory=list)  # PNG names written beside it


def build_report(
    output: str,
    read_status: Callable[[str], Any],
    stage_order: Sequence[str],
    *,
    dest: str | None = None,
    title: str | None = None,
    samples: int = 8,
    max_points: int = 5000,
    seed: int = 0,
    use_umap: bool = True,
) -> ReportResult:
    """Write the report of the run in `output` to `dest` (default OUTPUT/report/).

    `read_status` and `stage_order` come from the caller (dgaug.job.report): the report reads
    outputs, not the pipeline. Works on a partial run: a section with nothing to show says so. Raises NothingToReport when
    `output` does not exist, StorageError when it cannot be opened.
    """
    from dgaug.report import figures as fig
    from dgaug.report.contact import build_sheet
    from dgaug.report.page import render_page
    from dgaug.report.projection import project
    from dgaug.report.retention import measure

    view = read_run(output, read_status, stage_order)
    t0 = time.perf_counter()
    sheet = build_sheet(view, samples, seed)
    points = project(view, max_points, seed, use_umap=use_umap)
    retention = measure(view, seed=seed)
    log.info(
        "report: read %d images, %d points, %d rows for class retention in %.1fs",
        len(sheet.rows),
        points.n,
        retention.real + retention.edsam,
        time.perf_counter() - t0,
    )

    figures: dict[str, bytes] = {}
    for name, make in (
        ("contact.png", lambda: fig.contact_png(sheet)),
        ("projection.png", lambda: fig.projection_png(points)),
        ("throughput.png", lambda: fig.throughput_png(view)),
        ("scores.png", lambda: fig.scores_png(retention.scores)),
    ):
        png = make()
        if png is not None:
            figures[name] = png
    for t in view.trainings:
        png = fig.loss_png(t)
        if png is not None:
            figures[f"loss-{t.mode}.png"] = png

    root = view.storage.root
    shown = (
        f"{root.split('://', 1)[0]}://… (a URL holding credentials)" if url_secret(root) else root
    )
    page = render_page(
        title=title or f"dgaug report: {shown}",
        output=shown,
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        version=__version__,
        seed=seed,
        view=view,
        sheet=sheet,
        projection=points,
        retention=retention,
        figures=figures,
    )
    target = Storage(dest) if dest is not None else Storage(view.storage.url(REPORT_DIR))
    target.makedirs("")
    for name, png in figures.items():
        target.write_bytes(name, png)
    # A figure an earlier report wrote but this one has not (a section now empty) would be stale.
    for name in target.list(""):
        ours = name in FIXED_FIGURES or (name.startswith("loss-") and name.endswith(".png"))
        if ours and name not in figures:
            target.remove(name)
    target.write_text(INDEX, page)  # last: the page appears once its figures are there
    return ReportResult(target.url(INDEX), sorted(figures))
