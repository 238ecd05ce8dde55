"""The `dgaug` command: parse, call the pipeline, print. Heavy libraries are imported only when used."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from dgaug.cli import exitcodes
from dgaug.cli.options import ManifestArg, SetOpt
from dgaug.cli.report import report

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


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _fail(code: int, lines: list[str] | str) -> typer.Exit:
    con = _console()
    for line in [lines] if isinstance(lines, str) else lines:
        con.print(line, markup=False)
    return typer.Exit(code)


def _load(manifest: Path, overrides: list[str] | None, executor: str | None = None):
    from dgaug.job.manifest import ManifestError, load_manifest

    extra = list(overrides or [])
    if executor:
        extra.append(f"executor.kind={executor}")
    try:
        return load_manifest(manifest, extra)
    except ManifestError as e:
        raise _fail(exitcodes.INVALID, [f"error: {manifest}: {e}"]) from None


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=_console(), show_path=False, show_time=False, markup=False)
    # The terminal shows warnings (info with -v); the run's log file gets info either way.
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("dgaug").setLevel(logging.INFO)


class _RunLogFile(logging.FileHandler):
    """The run's log file. When it cannot be written (a full disk), it says so once and stops,
    instead of printing a traceback for every record."""

    broken = False
    upload_to: tuple[Any, str] | None = None  # (Storage, rel): where the local file goes at the end

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802  (logging's name)
        if self.broken:
            return
        self.broken = True
        err = sys.exc_info()[1]
        _console().print(
            f"warning: cannot write the run log {self.baseFilename} ({err}); "
            "it stops here, the terminal goes on",
            markup=False,
        )

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)


def _file_log(output: str) -> _RunLogFile:
    """The run's log, OUTPUT/_dgaug/logs/run-<time>.log. An object store output gets it written
    locally and uploaded when the run ends (_close_file_log)."""
    import tempfile

    from dgaug.core.storage import DGAUG_DIR, Storage

    storage = Storage(output)
    name = time.strftime("run-%Y%m%d-%H%M%S.log")
    if storage.is_local:
        logs = Path(storage.path(f"{DGAUG_DIR}/logs"))
        logs.mkdir(parents=True, exist_ok=True)
        h = _RunLogFile(logs / name)
    else:
        h = _RunLogFile(Path(tempfile.mkdtemp(prefix="dgaug-log-")) / name)
        h.upload_to = (storage, f"{DGAUG_DIR}/logs/{name}")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h.setLevel(logging.INFO)
    lg = logging.getLogger("dgaug")
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    return h


def _close_file_log(h: _RunLogFile) -> None:
    logging.getLogger("dgaug").removeHandler(h)
    h.close()
    if h.upload_to is None:
        return
    storage, rel = h.upload_to
    try:
        storage.commit_file(h.baseFilename, rel)
    except Exception as e:  # the run's own result is what matters; the log is a convenience
        _console().print(f"warning: could not upload the run log to {storage.url(rel)}: {e}")
    finally:
        shutil.rmtree(os.path.dirname(h.baseFilename), ignore_errors=True)


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
        raise _fail(exitcodes.INVALID, f"error: --executor must be local or ray, not {executor!r}")
    m = _load(manifest, set_, executor)
    _setup_logging(verbose)
    from dgaug.cli.errors import user_error_message
    from dgaug.cli.progress import RichProgress, print_run_summary

    handler = None
    try:
        handler = _file_log(m.output)
        from dgaug.pipeline.run import run_pipeline

        with RichProgress(_console()) as listener:
            summary = run_pipeline(m, force=force, listener=listener)
    except KeyboardInterrupt:
        raise _fail(exitcodes.INTERRUPTED, "interrupted: run the same command to resume") from None
    except Exception as e:
        from dgaug.core.storage import StorageError, store_problem

        if handler is not None and (isinstance(e, StorageError) or store_problem(e, "")):
            handler.upload_to = None  # the store is what failed: nowhere to put the log
        msg = user_error_message(e)
        if msg is None:
            raise
        code, text = msg
        raise _fail(code, text) from None
    finally:
        if handler:
            _close_file_log(handler)
    print_run_summary(summary)
    raise typer.Exit(exitcodes.OK if summary.ok else exitcodes.FAILED)


@app.command()
def status(
    manifest: ManifestArg,
    set_: SetOpt = None,
    errors: Annotated[
        int, typer.Option(help="Show up to this many failed shards with their errors.")
    ] = 10,
) -> None:
    """Per stage: shards done / failed / pending, samples, and skipped samples by reason.

    Reads only the markers, so it is fast and works while a run is going (on any executor).
    Exits 0 when every shard is committed, 1 if some failed, 4 if work remains.
    """
    m = _load(manifest, set_)
    from dgaug.cli.errors import user_error_message
    from dgaug.cli.progress import print_status
    from dgaug.pipeline.status import read_status

    try:
        st = read_status(m.output)
    except Exception as e:
        msg = user_error_message(e)
        if msg is None:
            raise
        raise _fail(*msg) from None
    print_status(st, max_errors=errors)
    if not st.started:
        raise typer.Exit(exitcodes.PENDING)
    if st.any_failed:
        raise typer.Exit(exitcodes.FAILED)
    raise typer.Exit(exitcodes.OK if st.complete else exitcodes.PENDING)


@app.command()
def plan(manifest: ManifestArg, set_: SetOpt = None) -> None:
    """Show what `run` would do: shards per stage, how many are committed, how many to do.

    Writes nothing. Counting a large tsv url list reads it once.
    """
    m = _load(manifest, set_)
    _setup_logging(False)
    from dgaug.cli.errors import user_error_message
    from dgaug.cli.progress import print_plan
    from dgaug.core.storage import Storage
    from dgaug.pipeline.run import plan_stages

    try:
        plans = plan_stages(m, Storage(m.output), dry_run=True)
    except Exception as e:
        msg = user_error_message(e)
        if msg is None:
            raise
        raise _fail(*msg) from None
    print_plan(m, plans)


@app.command()
def validate(manifest: ManifestArg, set_: SetOpt = None) -> None:
    """Check a manifest: every field, every problem at once with its path; and that the source
    can be read (files exist, columns present). Exits 0 when valid, 2 otherwise."""
    m = _load(manifest, set_)
    problems = m.source.problems()
    if problems:
        raise _fail(
            exitcodes.INVALID,
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
            "features (+ LDFS); coop: learned prompt context on features (+ LDFS).",
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
    from dgaug.job.manifest import ManifestError

    options = {
        "mode": mode,
        "data.real": real,
        "data.edsam": edsam,
        "data.features": features,
        "data.ldfs": ldfs,
        "eval.path": eval_path,
        "output": output,
    }
    try:
        from dgaug.cli.train import config_from_manifest, config_from_options

        if manifest is not None:
            cfg = config_from_manifest(_load(manifest, set_), options)
        else:
            cfg = config_from_options(list(set_ or []), options)
    except ManifestError as e:
        raise _fail(exitcodes.INVALID, [f"error: {e}"]) from None
    _setup_logging(verbose)
    from dgaug.cli.progress import print_train_result, train_progress
    from dgaug.models.errors import ModelError
    from dgaug.trainer.checkpoint import CheckpointMismatch
    from dgaug.trainer.data import DataError
    from dgaug.trainer.run import train as run_training

    try:
        with train_progress(_console(), cfg.mode) as (on_step, on_phase):
            result = run_training(cfg, on_step=on_step, on_phase=on_phase)
    except KeyboardInterrupt:
        raise _fail(exitcodes.INTERRUPTED, "interrupted: run the same command to resume") from None
    except (DataError, ModelError) as e:
        raise _fail(exitcodes.INVALID, f"error: {e}") from None
    except CheckpointMismatch as e:
        raise _fail(exitcodes.REFUSED, f"error: {e}") from None
    print_train_result(result)


app.command()(report)


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
