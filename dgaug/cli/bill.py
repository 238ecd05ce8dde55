"""Prints the bill of a job (FLOPs, bytes, GPU-hours per stage) before any work is done."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table


def _si(v: float | None, unit: str) -> str:
    if v is None:
        return "?"
    for scale, prefix in (
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def print_bill(bill: Any, console: Console | None = None) -> None:
    out = console or Console()
    t = Table(title="the bill (estimates before any work)")
    for col in (
        "stage",
        "samples",
        "FLOP each",
        "bytes each",
        "FLOP",
        "bytes",
        "GPU-hours",
    ):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in bill.stages:
        hours = bill.gpu_hours(s)
        t.add_row(
            s.stage,
            f"{s.samples:,}",
            _si(s.flops_per_sample, "FLOP") if s.gpu else "-",
            _si(s.bytes_per_sample, "B"),
            _si(s.total_flops, "FLOP") if s.gpu else "-",
            _si(s.total_bytes, "B"),
            "-" if hours is None else f"{hours:,.3g}",
        )
    out.print(t)
    out.print(f"GPU-hours: {bill.rate_source}.", markup=False, soft_wrap=True)
    out.print(
        "Bytes: JPEG q95 at about 0.25 bytes per pixel of the written size (bench/download_size.py); "
        "FLOPs: PyTorch's counter on the models' shapes, cached per architecture.",
        markup=False,
        soft_wrap=True,
    )
    for s in bill.stages:
        for note in s.notes:
            out.print(f"  {s.stage}: {note}", markup=False, soft_wrap=True)


def bill_printer(manifest: Any, console: Console) -> Callable[[str, int], None]:
    """For `dgaug run`: print the bill once the download stage is planned. A bill that cannot be
    made (an unknown model offline, say) is a log line: it never stops a run."""

    def on_first_plan(stage: str, shards: int) -> None:
        if stage != "download":
            return
        from dgaug.job.bill import build_bill
        from dgaug.job.graph import build_stages

        try:
            print_bill(build_bill(manifest, shards, list(build_stages(manifest))), console)
        except Exception as e:  # the bill is advice; the run goes on
            logging.getLogger(__name__).warning("no bill for this run: %s", e)

    return on_first_plan
