"""What every `dgaug` command shares: the stderr console, logging, the manifest, and user errors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import typer

from dgaug.core.errors import FAILED, INTERRUPTED, INVALID, DgaugError

RESUME = "interrupted: run the same command to resume"


def console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def fail(code: int, lines: list[str] | str) -> typer.Exit:
    """Print `lines` on stderr; the Exit to raise with `code`."""
    con = console()
    for line in [lines] if isinstance(lines, str) else lines:
        con.print(line, markup=False)
    return typer.Exit(code)


def load(manifest: Path, overrides: list[str] | None, executor: str | None = None):
    """The validated manifest with --set (and --executor) applied; exits with its problems."""
    from dgaug.job.manifest import ManifestError, load_manifest

    extra = list(overrides or [])
    if executor:
        extra.append(f"executor.kind={executor}")
    try:
        return load_manifest(manifest, extra)
    except ManifestError as e:
        raise fail(e.exit_code, [f"error: {manifest}: {e}"]) from None


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=console(), show_path=False, show_time=False, markup=False)
    # The terminal shows warnings (info with -v); the run's log file gets info either way.
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("dgaug").setLevel(logging.INFO)


def user_error(e: BaseException) -> tuple[int, list[str]] | None:
    """(exit code, lines) for an error the user can fix; None for a bug (let it raise).

    A DgaugError says both itself. The rest are errors of the OS or of a store's library that
    reach us unwrapped, recognised here because no dgaug layer raised them.
    """
    # storage imports fsspec: only once an error needs it, so that `--help` stays light.
    from dgaug.core.storage import DiskFull, disk_full, store_problem

    if isinstance(e, DgaugError):
        return e.exit_code, e.lines()
    problem = store_problem(e, "")
    if problem is not None:  # an object store failing after the start-up check passed
        return FAILED, [f"error: {problem.removeprefix('output : ')}"]
    if disk_full(e):
        full = DiskFull(e.filename if isinstance(e, OSError) and e.filename else "output")
        return full.exit_code, full.lines()
    if isinstance(e, PermissionError):
        return INVALID, [f"error: permission denied: {e.filename or e}"]
    if isinstance(e, FileNotFoundError) and e.filename:
        return INVALID, [f"error: file not found: {e.filename}"]
    return None


@contextlib.contextmanager
def user_errors(interrupted: str | None = None) -> Iterator[None]:
    """Turn an error the user can fix into its lines on stderr and its exit code, never a
    traceback; a bug still raises. Ctrl-C exits INTERRUPTED printing `interrupted`, if given."""
    try:
        yield
    except typer.Exit:
        raise  # a command's own exit: already said what it had to
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        raise fail(INTERRUPTED, interrupted) from None
    except Exception as e:
        found = user_error(e)
        if found is None:
            raise
        raise fail(*found) from None
