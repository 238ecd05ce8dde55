"""The Ray executor's driver cost per task: a chain of no-op stages of N shards on a local Ray."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (bench/ is not a package: the path above makes it importable)
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine_line,
    write_json,
)

from dgaug.core.storage import Storage  # noqa: E402
from dgaug.job.manifest import StageResources, validate  # noqa: E402
from dgaug.pipeline.executors.base import RunListener  # noqa: E402
from dgaug.pipeline.executors.ray import RayExecutor  # noqa: E402
from dgaug.pipeline.stage import ShardResult, ShardTask, Stage, StageContext  # noqa: E402


class NoOp(Stage):
    """Writes no file: an attempt is the executor's work and the marker (the commit) only."""

    name = "noop0"
    output_dir = "noop0"

    def __init__(self, manifest: Any, name: str, workers: int):
        super().__init__(manifest)
        self.name = name  # type: ignore[misc]  (one class, several stages of the chain)
        self.output_dir = name  # type: ignore[misc]
        self.workers = workers

    def default_resources(self) -> StageResources:
        return StageResources(workers=self.workers, num_cpus=0.01)

    def fingerprint_config(self) -> dict[str, Any]:
        return {}

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        return ShardResult(samples=0)


class Counter(RunListener):
    """What the CLI's progress listener does per event, at its cheapest."""

    def __init__(self) -> None:
        self.finished = 0

    def task_finished(self, outcome: Any, final: bool) -> None:
        self.finished += final


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # the driver: its Python and Ray's threads
    return r.ru_utime + r.ru_stime


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import ray

    m = validate(
        {
            "output": str(out),
            "source": {"kind": "synthetic", "num_images": 8},
            "executor": {"kind": "ray", "max_attempts": 2},
        }
    )
    names = [f"noop{k}" for k in range(args.stages)]
    stages = {n: NoOp(m, n, args.workers) for n in names}
    tasks = [
        ShardTask(n, i, deps=((names[k - 1], i),) if k else ())
        for k, n in enumerate(names)
        for i in range(args.shards)
    ]
    storage = Storage(str(out))
    fp = {n: {"stage": n, "config": {"pad": "x" * args.fp_bytes}} for n in names}
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    listener = Counter()
    profile = cProfile.Profile() if args.profile else None
    cpu0, t0 = _cpu_s(), time.perf_counter()
    if profile:
        profile.enable()
    outcomes = RayExecutor(m.executor).execute(
        stages, tasks, fp, StageContext(m, storage), set(), listener
    )
    if profile:
        profile.disable()
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    assert len(outcomes) == len(tasks) and all(o.ok for o in outcomes)
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    return {
        "tasks": len(tasks),
        "wall_s": wall,
        "driver_cpu_s": cpu,
        "wall_us_per_task": 1e6 * wall / len(tasks),
        "driver_cpu_us_per_task": 1e6 * cpu / len(tasks),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shards", type=int, default=41_000, help="shards per stage")
    p.add_argument("--stages", type=int, default=1, help="stages in the chain")
    p.add_argument("--workers", type=int, default=2, help="actors per stage")
    p.add_argument("--fp-bytes", type=int, default=2000, help="size of each fingerprint record")
    p.add_argument("--profile", action="store_true", help="cProfile the driver")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "ray_sched.json")
    args = p.parse_args(argv)
    machine = describe_machine(("dgaug", "ray"))
    print(machine_line(machine), flush=True)
    with tempfile.TemporaryDirectory(prefix="dgaug-ray-sched-") as tmp:
        r = run(args, Path(tmp) / "out")
    print(
        format_table(
            ["shards/stage", "stages", "tasks", "wall s", "µs/task (wall)", "driver CPU µs/task"],
            [
                [
                    args.shards,
                    args.stages,
                    r["tasks"],
                    f"{r['wall_s']:.1f}",
                    f"{r['wall_us_per_task']:.0f}",
                    f"{r['driver_cpu_us_per_task']:.0f}",
                ]
            ],
        )
    )
    write_json(args.json, {"machine": machine, "args": vars(args) | {"json": None}, **r})
    return 0


if __name__ == "__main__":
    sys.exit(main())
