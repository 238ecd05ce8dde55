"""Executors run shard tasks: `local` in this process, `ray` on an actor pool per stage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dgaug.pipeline.executors.base import Executor, RunListener

if TYPE_CHECKING:
    from dgaug.pipeline.resources import ExecutorConfig


def make_executor(config: ExecutorConfig) -> Executor:
    """The executor the manifest's `executor` section asks for; Ray is imported only when chosen."""
    if config.kind == "ray":
        from dgaug.pipeline.executors.ray import RayExecutor

        return RayExecutor(config)
    from dgaug.pipeline.executors.local import LocalExecutor

    return LocalExecutor(config)


__all__ = ["Executor", "RunListener", "make_executor"]
