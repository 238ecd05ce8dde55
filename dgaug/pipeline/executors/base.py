"""What every executor offers, and the listener through which it reports progress."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dgaug.pipeline.attempt import Outcome
    from dgaug.pipeline.resources import ExecutorConfig
    from dgaug.pipeline.stage import ShardTask, Stage, StageContext


class RunListener:
    """Receives progress events from the driver; the CLI draws bars from them. Defaults do nothing."""

    def stage_planned(self, stage: str, total: int, already_done: int) -> None:
        pass

    def task_started(self, task: ShardTask) -> None:
        pass

    def task_finished(self, outcome: Outcome, final: bool) -> None:
        """`final` is False when the shard failed but will be tried again."""

    def message(self, text: str) -> None:
        pass


class Executor(ABC):
    """Runs tasks whose dependencies are committed, retries failures up to a limit, reports outcomes.

    The commit itself (scratch, rename, marker) happens in `run_attempt`, wherever the task runs.
    """

    def __init__(self, config: ExecutorConfig):
        self.config = config

    @abstractmethod
    def execute(
        self,
        stages: dict[str, Stage],
        tasks: list[ShardTask],
        fp_records: dict[str, dict[str, Any]],
        ctx: StageContext,
        satisfied: set[tuple[str, int]],
        listener: RunListener,
    ) -> list[Outcome]:
        """Run `tasks` (in dependency order); `satisfied` are dependencies committed before the run."""
