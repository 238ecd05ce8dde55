"""The url_list source: a url list as published for CC3M / CC12M (tsv) or LAION (parquet)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from dgaug.core.storage import Storage
from dgaug.core.values import check_protocols
from dgaug.sources.base import GENERATED_SCHEMES, SourceConfig, SourceItems
from dgaug.sources.paths import expand_paths, file_sizes

if TYPE_CHECKING:
    import pyarrow as pa

# What img2dataset's fetcher (urllib) can open; a url list allows a subset.
FETCHABLE_SCHEMES = ("http", "https", "ftp", "file", "data")
DEFAULT_SCHEMES = ("http", "https")


class UrlListSource(SourceConfig):
    """A url list as published for CC3M / CC12M (tsv) or LAION (parquet)."""

    kind: Literal["url_list"]
    path: str | list[str] = Field(
        description="File, glob or list of files (local or fsspec URL); read in order."
    )
    input_format: Literal["tsv", "csv", "parquet", "txt"] = "tsv"
    url_col: str = "url"
    caption_col: str | None = "caption"
    label_col: str | None = None
    domain_col: str | None = None
    column_names: list[str] | None = Field(
        None, description="tsv/csv without a header line: the names of its columns, in order."
    )
    save_columns: list[str] = Field(
        default_factory=list, description="Extra columns copied into each sample's json."
    )
    allowed_schemes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SCHEMES),
        description="URL schemes img2dataset may fetch; a row with any other (file, ftp, data, "
        "s3...) is skipped and counted as scheme_not_allowed.",
    )

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if not v:
            raise ValueError("must name at least one file")
        for p in [v] if isinstance(v, str) else v:
            check_protocols(p)
        return v

    @field_validator("allowed_schemes")
    @classmethod
    def _schemes(cls, v: list[str]) -> list[str]:
        schemes = [s.strip().lower().removesuffix("://").removesuffix(":") for s in v]
        if not schemes:
            raise ValueError(f"must name at least one scheme, e.g. {list(DEFAULT_SCHEMES)}")
        unknown = sorted({s for s in schemes if s not in FETCHABLE_SCHEMES})
        if unknown:
            raise ValueError(
                f"{unknown}: img2dataset fetches only {', '.join(FETCHABLE_SCHEMES)} URLs"
            )
        return sorted(set(schemes), key=schemes.index)

    @model_validator(mode="after")
    def _txt_has_only_urls(self) -> UrlListSource:
        if self.input_format == "txt":
            if "caption_col" in self.model_fields_set and self.caption_col:
                raise ValueError("caption_col: a txt url list has one url per line, no captions")
            self.caption_col = None
        return self

    @classmethod
    def generated(cls, path: str) -> UrlListSource:
        """The url list dgaug writes for a generated source (synthetic images, an image folder)."""
        return cls(
            kind="url_list",
            path=path,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            label_col="label",
            domain_col="domain",
            allowed_schemes=list(GENERATED_SCHEMES),
        )

    def fetch_schemes(self) -> tuple[str, ...]:
        """What the manifest allows (http and https unless it says otherwise)."""
        return tuple(self.allowed_schemes)

    def checked_paths(self) -> list[str]:
        """The concrete files, each checked to exist and to have every column named."""
        from dgaug.sources.tabular import check_source

        return check_source(self)

    def check(self) -> None:
        self.checked_paths()

    def rows(self, paths: list[str]) -> Iterator[pa.Table]:
        """The rows of `paths` in batches, with dgaug's column names (url, caption, label...)."""
        from dgaug.sources.tabular import iter_rows

        return iter_rows(self, paths)

    def source_files(self) -> list[dict[str, Any]]:
        return file_sizes(expand_paths(self.path))

    def items(self, storage: Storage, seed: int, *, dry_run: bool) -> SourceItems:
        return SourceItems(files=self.source_files(), url_list=self)
