"""The error a source raises when it cannot be read as the manifest describes it."""

from __future__ import annotations

from dgaug.core.errors import INVALID, DgaugError


class SourceError(DgaugError):
    """The source cannot be read as the manifest describes it; `problems` lists each reason."""

    exit_code = INVALID

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))

    def lines(self) -> list[str]:
        return ["error: the source cannot be read:"] + [f"  {p}" for p in self.problems]
