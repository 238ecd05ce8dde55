"""The `dgaug` command: parse, call the pipeline, print. Heavy libraries are imported only when used."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dgaug.cli.common import RESUME, console, fail, load, setup_logging, user_errors
from dgaug.cli.options import ManifestArg, SetOpt
from dgaug.cli.report import report
from dgaug.core.errors import FAILED, INVALID, OK, PENDING

app = typer.Typer(
    name="dgaug",
    help=(
        "Domain-generalization data augmentation for CLIP-style models.\n\n"
        "A manifest (YAML) describes a batch job: a source of image-text pairs, the stages to run "
        "(download -> edsam -> features -> ldfs) and an output folder. `dgaug run` does the work "
        "shard by shard; running the same command again after a failure or a kill redoes only the "
        "shards that are not committed.\n\n"
        "Start with:  dgaug run manifests/demo.yaml   (offline, CPU, a few minutes)\n\n"
        "Exit codes: 0 done; 1 some shards failed (see `dgaug status`); 2 invalid manifest, "
        "source or arguments; 3 refused (another run holds the folder, or committed shards were "
        "made with another config); 4 `status`: work remains; 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.command()
def run(
    manifest: ManifestArg,
    set_: SetOpt = None,
    executor: Annotated[
        str | None,
        typer.Option(
            help="local (in this process) or ray; overrides executor.kind.", show_default=False
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Redo committed shards that were made with another config."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Run the manifest's stages, or resume them: committed shards are skipped.

    Validates the manifest and the source first and stops on any problem. Work is done per shard;
    each shard is written to a temporary name and committed with a marker, so a killed run is
    finished by running the same command again. Exits 1 if any shard failed after its retries.
    """
    if executor not in (None, "local", "ray"):
        raise fail(INVALID, f"error: --executor must be local or ray, not {executor!r}")
    m = load(manifest, set_, executor)
    setup_logging(verbose)
    from dgaug.cli.bill import bill_printer
    from dgaug.cli.progress import RichProgress, print_run_summary
    from dgaug.cli.runlog import run_log
    from dgaug.job.run import run_pipeline

    # Innermost first on the way out: the progress display stops, the run log is closed (and
    # uploaded), then the error's lines are printed. The bill is printed once the download
    # stage is planned.
    out = console()
    with (
        user_errors(RESUME),
        run_log(m.output),
        RichProgress(out, on_first_plan=bill_printer(m, out)) as listener,
    ):
        summary = run_pipeline(m, force=force, listener=listener)
    print_run_summary(summary)
    raise typer.Exit(OK if summary.ok else FAILED)


@app.command()
def status(
    manifest: ManifestArg,
    set_: SetOpt = None,
    errors: Annotated[
        int, typer.Option(help="Show up to this many failed shards with their errors.")
    ] = 10,
) -> None:
    """Per stage: shards done / failed / pending, samples, and skipped samples by reason.

    Reads the markers' index and lists each stage folder (no read per shard), so it is fast and
    works while a run is going (on any executor). A committed shard whose file is missing or of
    another size than its marker says is shown as damaged: the next `dgaug run` redoes it.
    Exits 0 when every shard is committed and whole, 1 if some failed, 4 if work remains
    (pending or damaged shards).
    """
    m = load(manifest, set_)
    from dgaug.cli.progress import print_status
    from dgaug.pipeline.status import read_status

    with user_errors():
        st = read_status(m.output)
    print_status(st, max_errors=errors)
    if not st.started:
        raise typer.Exit(PENDING)
    if st.any_failed:
        raise typer.Exit(FAILED)
    raise typer.Exit(OK if st.complete else PENDING)


@app.command()
def verify(
    manifest: ManifestArg,
    set_: SetOpt = None,
    repair: Annotated[
        bool,
        typer.Option(
            help="Drop the markers of damaged shards (and their mix/ links) so that the next "
            "`dgaug run` remakes them."
        ),
    ] = False,
    threads: Annotated[int, typer.Option(help="Shards read at once.", min=1, max=256)] = 8,
    errors: Annotated[int, typer.Option(help="Show up to this many damaged shards.")] = 20,
) -> None:
    """Read every committed shard in full and compare its sha256 with its marker: finds the
    damage `dgaug status` cannot see (same size, other bytes) as well as missing or truncated
    files. Local folders and object stores; parallel, with memory bounded whatever the size.

    Exits 0 when every committed shard matches its marker; 1 when some are damaged (listed,
    nothing changed); 4 when --repair dropped damaged shards' markers (run the same manifest
    again to remake them) or no run has started.
    """
    m = load(manifest, set_)
    from dgaug.cli.progress import print_verify, verify_progress
    from dgaug.pipeline.verify import verify_output

    with user_errors(), verify_progress(console()) as (on_start, on_shard):
        result = verify_output(
            m.output, repair=repair, threads=threads, on_start=on_start, on_shard=on_shard
        )
    print_verify(result, max_shown=errors)
    if not result.started or result.repaired:
        raise typer.Exit(PENDING)
    raise typer.Exit(FAILED if result.damaged else OK)


@app.command()
def plan(
    manifest: ManifestArg,
    set_: SetOpt = None,
    rates: Annotated[
        str | None,
        typer.Option(
            help="A bench/edsam.py JSON: its measured ED-SAM samples/s replaces the assumed "
            "GPU utilisation in the GPU-hours."
        ),
    ] = None,
) -> None:
    """Show what `run` would do and what it costs: shards per stage, how many are committed,
    how many to do; then FLOPs and bytes per sample, totals and GPU-hours per stage.

    Writes nothing (the FLOP counts are cached per architecture in ~/.cache/dgaug). A url list
    is read once: then the split a run made, or the count an earlier plan kept in
    ~/.cache/dgaug/splits, is reused while the files' sizes and stamps stay the same.
    """
    m = load(manifest, set_)
    setup_logging(False)
    from dgaug.cli.bill import print_bill
    from dgaug.cli.progress import print_plan
    from dgaug.core.storage import Storage
    from dgaug.job.bill import build_bill
    from dgaug.job.run import plan_stages

    with user_errors():
        plans = plan_stages(m, Storage(m.output), dry_run=True)
    print_plan(m, plans)
    with user_errors():
        shards = len(plans["download"].tasks) if "download" in plans else 0
        print_bill(build_bill(m, shards, list(plans), rates))


@app.command()
def validate(manifest: ManifestArg, set_: SetOpt = None) -> None:
    """Check a manifest: every field, every problem at once with its path; and that the source
    can be read (files exist, columns present). Exits 0 when valid, 2 otherwise."""
    m = load(manifest, set_)
    problems = m.source.problems()
    if problems:
        raise fail(
            INVALID,
            [f"error: {manifest}: source problems:"] + [f"  {p}" for p in problems],
        )
    stages = [n for n, s in m.stages if getattr(s, "enabled", False)]
    print(
        f"{manifest}: valid. source {m.source.kind}, stages {', '.join(stages)}, output {m.output}"
    )


PathOpt = Annotated[str | None, typer.Option(show_default=False)]


@app.command()
def train(
    manifest: Annotated[
        Path | None,
        typer.Argument(
            help="Manifest whose `train:` section and outputs to use; omit to give paths.",
            show_default=False,
        ),
    ] = None,
    set_: SetOpt = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="clip: contrastive training on real + ED-SAM shards; probe: a linear probe on "
            "features (+ LDFS); coop: learned prompt context on features (+ LDFS); cocoop: "
            "CoOp plus a meta-net shifting the context per image.",
            show_default=False,
        ),
    ] = None,
    real: Annotated[
        str | None, typer.Option(help="Folder of real shards.", show_default=False)
    ] = None,
    edsam: Annotated[
        str | None, typer.Option(help="Folder of ED-SAM shards.", show_default=False)
    ] = None,
    features: Annotated[
        str | None, typer.Option(help="Folder of features Parquet files.", show_default=False)
    ] = None,
    ldfs: Annotated[
        str | None, typer.Option(help="Folder of LDFS Parquet files.", show_default=False)
    ] = None,
    eval_path: Annotated[
        str | None,
        typer.Option(
            "--eval", help="Evaluation image folder (<domain>/<class>/*.jpg).", show_default=False
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="Folder of checkpoints and results.", show_default=False
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
) -> None:
    """Train on dgaug's outputs and evaluate on held-out domains; prints a results table.

    With a MANIFEST, its `train:` section is used and unset paths point at the run's outputs
    (real/, edsam/, features/, ldfs/; results in OUTPUT/train/<mode>/). `--set train.epochs=5`
    overrides a field. Without one, give the paths: `dgaug train --mode probe --features F
    --ldfs L --eval E -o OUT`. Checkpoints are written every `checkpoint_every` steps; running the
    same command again resumes from the newest. Exits 2 on a bad config or data, 3 when the
    output holds another config's checkpoints.
    """
    options = {
        "mode": mode,
        "data.real": real,
        "data.edsam": edsam,
        "data.features": features,
        "data.ldfs": ldfs,
        "eval.path": eval_path,
        "output": output,
    }
    from dgaug.cli.train import config_from_manifest, config_from_options

    with user_errors():
        if manifest is not None:
            cfg = config_from_manifest(load(manifest, set_), options)
        else:
            cfg = config_from_options(list(set_ or []), options)
    setup_logging(verbose)
    from dgaug.cli.progress import print_train_result, train_progress
    from dgaug.trainer.run import train as run_training

    with user_errors(RESUME), train_progress(console(), cfg.mode) as (on_step, on_phase):
        result = run_training(cfg, on_step=on_step, on_phase=on_phase)
    print_train_result(result)


@app.command()
def dg(
    manifest: ManifestArg,
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
) -> None:
    """Domain-generalization sweep: single-source and leave-one-domain-out training over arms
    (zero-shot, probe, CoOp, CoCoOp) x augmentations (none, LADS, LDFS) x seeds; prints
    DomainBed-style tables (mean ± std over seeds per target domain) and writes them to
    OUTPUT/dg/table.json and table.md.

    The manifest's `dg:` section chooses protocols, arms, augmentations and seeds; its `train:`
    section the trainer's settings; its features and ldfs stages are run per split. Running the
    same command again redoes only what is not finished.
    """
    from dgaug.job.dg import sweep
    from dgaug.job.dg_table import markdown

    with user_errors():
        m = load(manifest, set_)
    setup_logging(verbose)
    out = console()
    with user_errors(RESUME):
        record = sweep(m, on_event=lambda line: out.print(line, markup=False, highlight=False))
    out.print(markdown(record), markup=False, highlight=False)


app.command()(report)


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
