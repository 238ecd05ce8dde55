"""Executors run shard tasks: `local` in this process, `ray` on an actor pool per stage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dgaug.pipeline.executors.base import Executor, RunListener

if TYPE_CHECKING:
    from dgaug.job.manifest import Manifest


def make_executor(manifest: Manifest) -> Executor:
    """The executor the manifest asks for; Ray is imported only when it is chosen."""
    if manifest.executor.kind == "ray":
        from dgaug.pipeline.executors.ray import RayExecutor

        return RayExecutor(manifest.executor)
    from dgaug.pipeline.executors.local import LocalExecutor

    return LocalExecutor(manifest.executor)


__all__ = ["Executor", "RunListener", "make_executor"]
