"""Progress bars and tables for the terminal; fed by executor events and by markers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from dgaug.pipeline.executors.base import RunListener

if TYPE_CHECKING:
    from dgaug.job.manifest import Manifest
    from dgaug.pipeline.attempt import Outcome
    from dgaug.pipeline.run import RunSummary, StagePlan
    from dgaug.pipeline.stage import ShardTask
    from dgaug.pipeline.status import OutputStatus
    from dgaug.pipeline.verify import VerifyResult


class RichProgress(RunListener):
    """One bar per stage: shards committed out of planned, with samples and failures so far."""

    def __init__(self, console: Console, on_first_plan: Callable[[str, int], None] | None = None):
        self.console = console
        # Called once, with the first stage planned and its shard count (the run prints its bill).
        self.on_first_plan = on_first_plan
        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards  {task.fields[samples]} samples  {task.fields[note]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal,
        )
        self.tasks: dict[str, Any] = {}
        self.samples: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage_planned(self, stage: str, total: int, already_done: int) -> None:
        if self.on_first_plan is not None:
            first, self.on_first_plan = self.on_first_plan, None
            first(stage, total)
        self.samples[stage] = 0
        self.failed[stage] = 0
        note = f"({already_done} already committed)" if already_done else ""
        self.tasks[stage] = self.progress.add_task(
            stage, total=total, completed=already_done, samples=0, note=note
        )
        if not self.console.is_terminal:
            self.console.print(f"{stage}: {total} shard(s), {already_done} already committed")

    def task_finished(self, outcome: Outcome, final: bool) -> None:
        tid = self.tasks.get(outcome.stage)
        if tid is None:
            return
        if outcome.ok:
            self.samples[outcome.stage] += outcome.samples
            self.progress.update(tid, advance=1, samples=self.samples[outcome.stage])
        elif final:
            self.failed[outcome.stage] += 1
            self.progress.update(tid, note=f"[{self.failed[outcome.stage]} failed]")
        if not self.console.is_terminal and (outcome.ok or final):
            state = "ok" if outcome.ok else ("blocked" if outcome.blocked else "FAILED")
            self.console.print(
                f"{outcome.stage} {outcome.shard_id:05d} {state} "
                f"{outcome.samples} samples {outcome.duration_s:.1f}s"
                + (f"  {outcome.error}" if outcome.error and not outcome.ok else "")
            )

    def task_started(self, task: ShardTask) -> None:
        pass

    def message(self, text: str) -> None:
        self.console.print(text)


def _reasons(failures: dict[str, int], top: int = 4) -> str:
    items = sorted(failures.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} {v}" for k, v in items[:top])
    return text + (f", +{len(items) - top} more" if len(items) > top else "")


def print_run_summary(summary: RunSummary) -> None:
    out = Console()
    t = Table(title=f"dgaug run: {summary.output}  ({summary.seconds:.1f}s)")
    for col in (
        "stage",
        "shards",
        "skipped (done before)",
        "done now",
        "failed",
        "samples now",
        "skipped samples",
    ):
        t.add_column(col, justify="left" if col in ("stage", "skipped samples") else "right")
    for s in summary.stages.values():
        t.add_row(
            s.name,
            str(s.planned),
            str(s.skipped),
            str(s.done),
            str(s.failed + s.blocked),
            str(s.samples),
            _reasons(s.failures),
        )
    out.print(t)
    for s in summary.stages.values():
        for shard, err in sorted(s.errors.items())[:5]:
            out.print(
                f"  {s.name} shard {shard:05d} failed: {err.splitlines()[0]}",
                markup=False,
                soft_wrap=True,
            )
        if s.redone:
            out.print(
                f"{s.name}: {s.redone} shard(s) were missing or damaged and have been redone",
                markup=False,
            )
        for shard, why in sorted(s.damaged.items())[:5]:
            out.print(
                f"  {s.name} shard {shard:05d} is missing or damaged ({why}): not in the mix/ "
                "view; run the same command again to redo it",
                markup=False,
                soft_wrap=True,
            )
    if summary.ok:
        for s in summary.stages.values():
            # soft_wrap: a path broken over two lines cannot be copied (or found by a test).
            out.print(
                f"{s.name}: shards in {summary.output.rstrip('/')}/{s.output_dir}/",
                markup=False,
                soft_wrap=True,
            )
        if summary.mix:
            from dgaug.pipeline.mix import balanced_mix_args, train_data_pattern

            order = [s.output_dir.rstrip("/").rsplit("/", 1)[-1] for s in summary.stages.values()]
            pattern = train_data_pattern(summary.output.rstrip("/"), list(summary.mix), order)
            out.print(
                f"open_clip, every shard: --train-data '{pattern}' (no --train-num-samples)",
                markup=False,
                soft_wrap=True,
            )
            dirs = {
                name: s.output_dir.rstrip("/").rsplit("/", 1)[-1]
                for name, s in summary.stages.items()
            }
            if "download" in dirs and "edsam" in dirs:
                paired = balanced_mix_args(
                    summary.output.rstrip("/"), summary.mix, dirs["download"], dirs["edsam"]
                )
                if paired:
                    out.print(
                        f"open_clip, the paper's mix (one ED-SAM sample per real one): {paired}",
                        markup=False,
                        soft_wrap=True,
                    )
    else:
        out.print(
            "some shards failed: `dgaug status MANIFEST` shows why; run the same command "
            "again to retry them."
        )


def print_status(st: OutputStatus, max_errors: int = 10) -> None:
    out = Console()
    if not st.started:
        out.print(f"{st.output}: no run yet.", markup=False)
        return
    t = Table(title=f"dgaug status: {st.output}")
    cols = ("stage", "done", "failed", "damaged", "pending", "samples", "skipped samples by reason")
    for col in cols:
        t.add_column(
            col, justify="left" if col in ("stage", "skipped samples by reason") else "right"
        )
    for s in st.stages.values():
        t.add_row(
            s.name,
            f"{s.done}/{s.planned}",
            str(s.failed),
            str(len(s.damaged)),
            str(s.pending),
            str(s.samples),
            _reasons(dict(s.failures), top=6),
        )
    out.print(t)
    if st.lock:
        out.print(
            f"running: pid {st.lock.get('pid')} on {st.lock.get('host')} since "
            f"{st.lock.get('started_at')}",
            markup=False,
        )
    shown = 0
    for s in st.stages.values():
        if s.stale:
            out.print(
                f"{s.name}: {s.stale} shard(s) made with another config (rerun with --force)",
                markup=False,
            )
        for shard, why in sorted(s.damaged.items()):
            if shown >= max_errors:
                break
            out.print(
                f"  {s.name} {shard:05d}: damaged: {why} (the next `dgaug run` redoes it)",
                markup=False,
                soft_wrap=True,
            )
            shown += 1
        for shard, rec in sorted(s.errors.items()):
            if shown >= max_errors:
                break
            # Where it failed: several Ray nodes of one machine or pod share a host name.
            where = rec.get("host") or "?"
            if rec.get("node"):
                where += f", node {str(rec['node'])[:12]}"
            out.print(
                f"  {s.name} {shard:05d}: {rec.get('error')} (attempts {rec.get('attempts')}, "
                f"{rec.get('failed_at')}, on {where})",
                markup=False,
            )
            shown += 1


def print_plan(m: Manifest, plans: dict[str, StagePlan]) -> None:
    out = Console()
    t = Table(title=f"dgaug plan: {m.output}")
    for col in ("stage", "output", "shards", "committed", "to do", "other config", "fingerprint"):
        t.add_column(col)
    for name, p in plans.items():
        t.add_row(
            name,
            f"{p.stage.output_dir}/",
            str(len(p.tasks)),
            str(len(p.committed)),
            str(len(p.todo)),
            str(len(p.mismatched)),
            p.fingerprint,
        )
    out.print(t)
    for name, p in plans.items():
        if p.mismatched:
            out.print(f"{name}: committed shards differ in:", markup=False)
            for line in p.mismatched[min(p.mismatched)][:10]:
                out.print(f"    {line}", markup=False)


@contextlib.contextmanager
def train_progress(console: Console, mode: str) -> Iterator[tuple[Callable, Callable]]:
    """(on_step, on_phase) for the trainer: a bar of optimizer steps with the last loss, and a
    line per phase (indexing, training, evaluating)."""
    progress = Progress(
        TextColumn(f"train {mode:<6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    bar: list[Any] = []

    def on_step(step: int, total: int, loss: float) -> None:
        if not bar:
            bar.append(progress.add_task("", total=total, completed=step - 1, loss="-"))
        progress.update(bar[0], completed=step, loss=f"{loss:.4f}")

    def on_phase(text: str) -> None:
        progress.console.print(f"[{mode}] {text}", markup=False, highlight=False)

    with progress:
        yield on_step, on_phase


def print_train_result(result: Any) -> None:
    """The evaluation table (markdown, so it pastes into a report) and where the files are."""
    out = Console(highlight=False)
    if result.resumed_from:
        out.print(f"resumed from step {result.resumed_from} of {result.steps}", markup=False)
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        out.print(
            f"{result.mode}: {result.steps} steps, loss {first:.4f} -> {last:.4f}", markup=False
        )
    if result.table:
        out.print(result.table, markup=False, soft_wrap=True)
    out.print(f"results in {result.output}", markup=False, soft_wrap=True)


@contextlib.contextmanager
def verify_progress(console: Console) -> Iterator[tuple[Callable, Callable]]:
    """(on_start, on_shard) for `dgaug verify`: one bar of bytes read, with shards counted."""
    progress = Progress(
        TextColumn("verify"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[shards]} shard(s)"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    state: dict[str, Any] = {}

    def on_start(shards: int, nbytes: int) -> None:
        state["task"] = progress.add_task("verify", total=nbytes, shards=f"0/{shards}")
        state["total"], state["done"] = shards, 0

    def on_shard(stage: str, nbytes: int) -> None:
        state["done"] += 1
        progress.update(state["task"], advance=nbytes, shards=f"{state['done']}/{state['total']}")

    with progress:
        yield on_start, on_shard


def print_verify(result: VerifyResult, max_shown: int = 20) -> None:
    out = Console()
    if not result.started:
        out.print(f"{result.output}: no run yet: nothing to verify.", markup=False)
        return
    t = Table(title=f"dgaug verify: {result.output}")
    for col in ("stage", "shards checked", "ok", "damaged", "bytes read", "markers dropped"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in result.stages.values():
        t.add_row(
            s.name, str(s.shards), str(s.ok), str(len(s.damaged)), str(s.bytes), str(s.repaired)
        )
    out.print(t)
    shown = 0
    for s in result.stages.values():
        for shard, why in sorted(s.damaged.items()):
            if shown < max_shown:
                out.print(f"  {s.name} {shard:05d}: {why}", markup=False, soft_wrap=True)
            shown += 1
    if shown > max_shown:
        out.print(f"  ... {shown - max_shown} more", markup=False)
    if result.repaired:
        out.print(
            f"{result.repaired} damaged shard(s) dropped: run the same manifest again "
            "(`dgaug run`) to remake them byte for byte.",
            markup=False,
        )
    elif result.damaged:
        out.print(
            f"{result.damaged} damaged shard(s): `dgaug verify --repair MANIFEST` drops their "
            "markers, then `dgaug run MANIFEST` remakes them. Nothing was changed.",
            markup=False,
        )
    else:
        out.print("every committed shard matches its marker.", markup=False)
