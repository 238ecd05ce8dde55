"""The run's log file, OUTPUT/_dgaug/logs/run-<time>.log, open while `dgaug run` works."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dgaug.cli.common import console


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
        console().print(
            f"warning: cannot write the run log {self.baseFilename} ({err}); "
            "it stops here, the terminal goes on",
            markup=False,
        )

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)


def _open(output: str) -> _RunLogFile:
    """An object store output gets its log written locally and uploaded when the run ends."""
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


def _close(h: _RunLogFile) -> None:
    logging.getLogger("dgaug").removeHandler(h)
    h.close()
    if h.upload_to is None:
        return
    storage, rel = h.upload_to
    try:
        storage.commit_file(h.baseFilename, rel)
    except Exception as e:  # the run's own result is what matters; the log is a convenience
        console().print(f"warning: could not upload the run log to {storage.url(rel)}: {e}")
    finally:
        shutil.rmtree(os.path.dirname(h.baseFilename), ignore_errors=True)


@contextlib.contextmanager
def run_log(output: str) -> Iterator[None]:
    """The dgaug loggers also write to the run's log while the block runs; closed (and uploaded,
    for an object store) at its end, whatever happened."""
    from dgaug.core.storage import StorageError, store_problem

    h = _open(output)
    try:
        yield
    except Exception as e:
        if isinstance(e, StorageError) or store_problem(e, ""):
            h.upload_to = None  # the store is what failed: nowhere to put the log
        raise
    finally:
        _close(h)
