"""Exit codes scripts can branch on, and the error base that carries one to the CLI."""

from __future__ import annotations

OK = 0
FAILED = 1  # some shards failed after their retries; `dgaug status` lists them
INVALID = 2  # the manifest, the source or the arguments are wrong; nothing was done
REFUSED = 3  # another run holds the output, or committed shards were made with another config
PENDING = 4  # `status`: work remains (not started, or shards not yet committed)
INTERRUPTED = 130


class DgaugError(Exception):
    """An error the user can fix. The CLI prints `lines()` and exits with `exit_code`, never a
    traceback; every layer raises a subclass of it for what the user must change."""

    exit_code: int = INVALID

    def lines(self) -> list[str]:
        return [f"error: {self}"]
