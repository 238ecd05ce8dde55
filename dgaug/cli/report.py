"""`dgaug report`: the run's augmentations, feature space and progress as an HTML page and PNGs."""

from __future__ import annotations

from typing import Annotated

import typer

from dgaug.cli.common import fail, load, setup_logging, user_errors
from dgaug.cli.options import ManifestArg, SetOpt
from dgaug.core.errors import INVALID


def report(
    manifest: ManifestArg,
    set_: SetOpt = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder for index.html and the PNGs (local or fsspec URL); default OUTPUT/report.",
            show_default=False,
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option(min=0, help="Source images in the contact sheet, each with its samples.")
    ] = 8,
    max_points: Annotated[
        int, typer.Option(min=0, help="Points in the feature-space projection, at most.")
    ] = 5000,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Seed of the drawn images and points; default the manifest's.",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
) -> None:
    """Write a self-contained HTML page and PNG figures about the run: originals beside their ED-SAM
    samples (with α and score), a 2-D projection of real, ED-SAM and LDFS features, shards and
    throughput per stage, failures, and the training and evaluation results.

    Works on a partial or running run (a section with nothing yet says so) and on object storage:
    everything is read and written through the output's filesystem. Prints the page's path.
    Exits 2 when the manifest is invalid or its output does not exist.
    """
    m = load(manifest, set_)
    setup_logging(verbose)
    from dgaug.job.report import report_run
    from dgaug.report.build import NothingToReport

    with user_errors(interrupted="interrupted"):
        try:
            result = report_run(
                m.output,
                dest=output,
                title=f"dgaug report: {m.name}" if m.name else None,
                samples=samples,
                max_points=max_points,
                seed=m.seed if seed is None else seed,
            )
        except NothingToReport as e:  # the line names the command that makes the run
            raise fail(INVALID, f"error: {e}; run `dgaug run {manifest}` first") from None
    print(result.index)
