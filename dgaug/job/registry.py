"""The stages dgaug knows, in graph order; each is imported only when a run needs it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dgaug.pipeline.stage import Stage

# name -> "module:Class". Order is graph order: a stage comes after everything it reads.
STAGE_CLASSES: dict[str, str] = {
    "download": "dgaug.stages.download.stage:DownloadStage",
    "edsam": "dgaug.stages.edsam.stage:EdsamStage",
    "features": "dgaug.stages.features.stage:FeaturesStage",
    "ldfs_fit": "dgaug.stages.ldfs.stage:LdfsFitStage",
    "ldfs": "dgaug.stages.ldfs.stage:LdfsStage",
}

# The manifest section of a stage whose name differs from it: LDFS's fit and synthesis are two
# stages (the fit is a barrier over every features shard) configured by one `stages.ldfs`.
STAGE_SECTIONS: dict[str, str] = {"ldfs_fit": "ldfs"}


def section_of(name: str) -> str:
    return STAGE_SECTIONS.get(name, name)


def stage_class(name: str) -> type[Stage]:
    module, _, cls = STAGE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
