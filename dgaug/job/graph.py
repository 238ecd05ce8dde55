"""The stage graph a manifest declares: enabled stages in dependency order."""

from __future__ import annotations

from dgaug.job.manifest import Manifest, ManifestError
from dgaug.job.registry import STAGE_CLASSES, section_of, stage_class
from dgaug.pipeline.stage import Stage


def enabled_stage_names(manifest: Manifest) -> list[str]:
    # A stage whose section is absent (None) is off, like one with enabled: false.
    return [
        n
        for n in STAGE_CLASSES
        if getattr(getattr(manifest.stages, section_of(n)), "enabled", False)
    ]


def build_stages(manifest: Manifest) -> dict[str, Stage]:
    """Instantiate the enabled stages in graph order; every enabled stage's inputs must be enabled."""
    names = enabled_stage_names(manifest)
    stages = {n: stage_class(n)(manifest) for n in names}
    problems = [
        f"stages.{section_of(n)}.enabled: needs stages.{section_of(up)} enabled too"
        for n, s in stages.items()
        for up in s.upstream
        if up not in stages
    ]
    if problems:
        raise ManifestError(problems)
    return stages
