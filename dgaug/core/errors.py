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


class ManifestError(DgaugError):
    """A manifest that cannot be used; `problems` lists every `field.path: message` found.

    It lives here, not beside the Manifest, so that a stage checking its own section's files
    (LDFS's attributes) reports in the same words without importing the job layer."""

    exit_code = INVALID

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(
            f"{len(problems)} problem(s){where}:\n" + "\n".join(f"  {p}" for p in problems)
        )
