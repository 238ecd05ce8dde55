"""What every source kind gives the download stage: its items, fingerprint, schemes and checks."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from dgaug.core.hashing import record_hash
from dgaug.core.storage import DGAUG_DIR, Storage
from dgaug.sources.errors import SourceError

if TYPE_CHECKING:
    from dgaug.sources.url_list import UrlListSource

SOURCE_DIR = f"{DGAUG_DIR}/source"

# dgaug writes the url lists of generated sources itself, of its own files: file:// is the only
# scheme they hold.
GENERATED_SCHEMES = ("file",)


@dataclass(frozen=True)
class SourceItems:
    """What the download stage plans from: a url list to fetch, a count, or existing tars."""

    # What the fingerprint knows of the source beyond its settings (file sizes, a listing's
    # digest), so that a source replaced under the same name is never mixed with the old one.
    files: Any = None
    url_list: UrlListSource | None = None  # the rows img2dataset fetches
    count: int = 0  # the rows, when known without a url list (a dry run of a generated source)
    tars: tuple[str, ...] = ()  # existing shards, taken in one per dgaug shard


class SourceConfig(BaseModel):
    """The base of every source kind's manifest section (`source:`)."""

    model_config = ConfigDict(extra="forbid")

    # Whether img2dataset fetches this source's rows; False: existing shards are taken in.
    fetched: ClassVar[bool] = True

    def fingerprint_record(self, seed: int) -> dict[str, Any]:
        """The fields of the source that decide the run's data; the seed where it draws any."""
        return {"source": self.model_dump(mode="json"), "seed": None}

    def fetch_schemes(self) -> tuple[str, ...]:
        """The URL schemes the download stage may fetch for this source."""
        return GENERATED_SCHEMES

    def check(self) -> None:
        """Raise SourceError if the source cannot be read as described."""

    def problems(self) -> list[str]:
        """Problems that stop the source from being read; empty when it can be."""
        try:
            self.check()
        except SourceError as e:
            return e.problems
        return []

    def items(self, storage: Storage, seed: int, *, dry_run: bool) -> SourceItems:
        """What to plan from; a dry run writes nothing."""
        raise NotImplementedError


def generated_dir(storage: Storage, name: str, record: dict[str, Any]) -> str:
    """A local folder for generated source files: in the output if local, else a temp folder.

    img2dataset reads them through `file://` URLs, so they must be on this machine.
    """
    fp = record_hash(record, 12)
    if storage.is_local:
        return storage.path(f"{SOURCE_DIR}/{name}-{fp}")
    return os.path.join(tempfile.gettempdir(), f"dgaug-source-{name}-{fp}")
