"""User errors turned into one clear message and an exit code, instead of a traceback."""

from __future__ import annotations

from dgaug.cli import exitcodes
from dgaug.job.manifest import ManifestError


def user_error_message(e: BaseException) -> tuple[int, list[str]] | None:
    """(exit code, lines) for an error the user can fix; None for a bug (let it raise)."""
    from dgaug.core.storage import StorageError, disk_full, store_problem
    from dgaug.models.errors import ModelError
    from dgaug.pipeline.lock import LockHeld
    from dgaug.pipeline.run import FingerprintMismatch
    from dgaug.stages.download.urls import SourceError

    if isinstance(e, ModelError):
        return exitcodes.INVALID, [f"error: {e}"]
    if isinstance(e, ManifestError):
        return exitcodes.INVALID, [f"error: {e}"]
    if isinstance(e, SourceError):
        return exitcodes.INVALID, ["error: the source cannot be read:"] + [
            f"  {p}" for p in e.problems
        ]
    if isinstance(e, StorageError):
        return exitcodes.INVALID, [f"error: {e}"]
    problem = store_problem(e, "")
    if problem is not None:  # an object store failing after the start-up check passed
        return exitcodes.FAILED, [f"error: {problem.removeprefix('output : ')}"]
    if isinstance(e, LockHeld):
        return exitcodes.REFUSED, [f"error: {e}"]
    if isinstance(e, FingerprintMismatch):
        return exitcodes.REFUSED, [f"error: {e}"]
    if disk_full(e):
        where = e.filename if isinstance(e, OSError) and e.filename else "output"
        return exitcodes.FAILED, [
            f"error: no space left on the output device ({where}). Committed "
            "shards are intact; free some space and run the same command again."
        ]
    if isinstance(e, PermissionError):
        return exitcodes.INVALID, [f"error: permission denied: {e.filename or e}"]
    if isinstance(e, FileNotFoundError) and e.filename:
        return exitcodes.INVALID, [f"error: file not found: {e.filename}"]
    return None
