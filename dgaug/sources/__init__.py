"""Where samples come from: one class per source kind (url_list, image_folder, shards, synthetic)."""

from typing import Annotated

from pydantic import Field

from dgaug.sources.base import SourceConfig, SourceItems
from dgaug.sources.errors import SourceError
from dgaug.sources.image_folder import ImageFolderSource
from dgaug.sources.paths import expand_paths
from dgaug.sources.shards import ShardsSource
from dgaug.sources.synthetic import SyntheticSource
from dgaug.sources.url_list import DEFAULT_SCHEMES, FETCHABLE_SCHEMES, UrlListSource

# The manifest's `source:` section: the `kind` field picks the class.
Source = Annotated[
    UrlListSource | ImageFolderSource | ShardsSource | SyntheticSource,
    Field(discriminator="kind"),
]

__all__ = [
    "DEFAULT_SCHEMES",
    "FETCHABLE_SCHEMES",
    "ImageFolderSource",
    "ShardsSource",
    "Source",
    "SourceConfig",
    "SourceError",
    "SourceItems",
    "SyntheticSource",
    "UrlListSource",
    "expand_paths",
]
