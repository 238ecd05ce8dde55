"""The shards source: existing webdataset shards, taken in one per dgaug shard."""

from __future__ import annotations

import os
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from dgaug.core.storage import Storage
from dgaug.core.values import check_protocols
from dgaug.sources.base import SourceConfig, SourceItems
from dgaug.sources.errors import SourceError
from dgaug.sources.paths import expand_paths, file_sizes


class ShardsSource(SourceConfig):
    """Existing webdataset shards (jpg/png/webp + txt per sample), re-keyed into dgaug's layout."""

    kind: Literal["shards"]
    path: str = Field(
        description="Glob or brace pattern of .tar files, e.g. /data/{00000..00099}.tar"
    )

    fetched: ClassVar[bool] = False

    @field_validator("path")
    @classmethod
    def _braces(cls, v: str) -> str:
        from braceexpand import braceexpand

        if not v.strip():
            raise ValueError("must not be empty")
        try:
            braceexpand(v)  # a generator: checks the braces without expanding the pattern
        except ValueError as e:
            raise ValueError(f"not a brace pattern: {e}") from None
        return check_protocols(v)

    def fetch_schemes(self) -> tuple[str, ...]:
        return ()  # nothing is fetched: the tars are read as they are

    def tars(self) -> list[str]:
        """The tar files, in order: one dgaug shard each (their count is the shard count)."""
        return expand_shards(self.path)

    def check(self) -> None:
        self.tars()

    def items(self, storage: Storage, seed: int, *, dry_run: bool) -> SourceItems:
        paths = self.tars()
        return SourceItems(files=file_sizes(paths), tars=tuple(paths))


def expand_shards(pattern: str) -> list[str]:
    """`/d/{00000..00009}.tar`, a glob, or a list -> the tar files, in order.

    Every local file must exist: a brace pattern names files, it does not search for them.
    """
    from braceexpand import braceexpand

    paths: list[str] = []
    for p in braceexpand(pattern):
        paths.extend(expand_paths(p))
    if not paths:
        raise SourceError([f"source.path: no shard matches {pattern!r}"])
    missing = [
        p
        for p in paths
        if ("://" not in p or p.startswith("file://"))
        and not os.path.isfile(p.removeprefix("file://"))
    ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SourceError(
            [
                f"source.path: {len(missing)} of {len(paths)} shard(s) not found: "
                f"{', '.join(missing[:3])}{more}"
            ]
        )
    return paths
