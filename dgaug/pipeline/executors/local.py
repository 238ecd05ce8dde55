"""The local executor: every task in this process, one after another; for tests, debugging, demos."""

from __future__ import annotations

from typing import Any

from dgaug.pipeline.attempt import Outcome, run_attempt
from dgaug.pipeline.executors.base import Executor, RunListener
from dgaug.pipeline.stage import ShardTask, Stage, StageContext


class LocalExecutor(Executor):
    def execute(
        self,
        stages: dict[str, Stage],
        tasks: list[ShardTask],
        fp_records: dict[str, dict[str, Any]],
        ctx: StageContext,
        satisfied: set[tuple[str, int]],
        listener: RunListener,
    ) -> list[Outcome]:
        committed = set(satisfied)
        outcomes: list[Outcome] = []
        # Stage by stage, so only one stage's models are in memory at a time.
        for name, stage in stages.items():
            stage_tasks = [t for t in tasks if t.stage == name]
            if not stage_tasks:
                continue
            set_up = False
            try:
                for task in stage_tasks:
                    if not all(d in committed for d in task.deps):
                        outcome = Outcome(
                            name,
                            task.shard_id,
                            False,
                            blocked=True,
                            attempts=0,
                            error="an upstream shard is not committed",
                        )
                        outcomes.append(outcome)
                        listener.task_finished(outcome, final=True)
                        continue
                    if not set_up:
                        stage.setup(ctx)
                        set_up = True
                    outcome = self._run_with_retries(stage, task, ctx, fp_records[name], listener)
                    outcomes.append(outcome)
                    if outcome.ok:
                        committed.add(task.id)
            finally:
                if set_up:
                    stage.teardown()
        return outcomes

    def _run_with_retries(
        self,
        stage: Stage,
        task: ShardTask,
        ctx: StageContext,
        fp_record: dict[str, Any],
        listener: RunListener,
    ) -> Outcome:
        for attempt in range(1, self.config.max_attempts + 1):
            listener.task_started(task)
            outcome = run_attempt(stage, task, ctx, fp_record)
            final = outcome.ok or attempt == self.config.max_attempts
            listener.task_finished(outcome, final=final)
            if outcome.ok:
                break
        return outcome
