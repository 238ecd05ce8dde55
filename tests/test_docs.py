"""The README documents what the code does: its first lines, and every manifest field."""

from __future__ import annotations

from pydantic import BaseModel

from dgaug.pipeline.manifest import (
    ExecutorConfig,
    ImageFolderSource,
    Manifest,
    ShardsSource,
    StageResources,
    SyntheticSource,
    UrlListSource,
)
from dgaug.stages.download.config import DownloadConfig
from dgaug.stages.edsam.config import EdsamConfig
from dgaug.stages.features.config import FeaturesConfig
from dgaug.stages.ldfs.config import LdfsConfig
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    head = "\n".join(README.splitlines()[:12])
    assert "make demo" in head and "make test" in head


def test_every_manifest_field_is_documented() -> None:
    models: list[type[BaseModel]] = [
        Manifest,
        UrlListSource,
        ImageFolderSource,
        ShardsSource,
        SyntheticSource,
        ExecutorConfig,
        StageResources,
        DownloadConfig,
        EdsamConfig,
        FeaturesConfig,
        LdfsConfig,
    ]
    missing = [
        f"{m.__name__}.{name}"
        for m in models
        for name in m.model_fields
        if f"`{name}`" not in README and f"{name}:" not in README
    ]
    assert not missing, f"README's manifest reference lacks {missing}"
