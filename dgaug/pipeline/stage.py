"""The stage contract: a plain object that plans shard tasks and turns one task into files."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from dgaug.core.constants import TINY

if TYPE_CHECKING:
    from dgaug.core.storage import Storage
    from dgaug.pipeline.resources import StageResources


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: small and picklable; data moves through the files it names."""

    stage: str
    shard_id: int
    inputs: tuple[str, ...] = ()  # locations (paths or URLs) of the files this shard reads
    deps: tuple[tuple[str, int], ...] = ()  # (stage, shard) that must be committed first
    outputs: tuple[str, ...] = ()  # file names, relative to the stage folder, process() must write
    tmp_dir: str = ""  # set by the executor for each attempt: process() writes outputs here

    @property
    def id(self) -> tuple[str, int]:
        return (self.stage, self.shard_id)

    def in_dir(self, tmp_dir: str) -> ShardTask:
        return replace(self, tmp_dir=tmp_dir)


@dataclass
class ShardResult:
    """What process() reports: `samples` written, other counts, and skipped samples by reason."""

    samples: int
    counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What `Stage.plan` returns: the tasks, and what it learned that the fingerprint must hold
    beyond the config (the sizes of a url list's files, an image folder's listing digest), so
    that a source replaced under the same name is never mixed with shards made from the old one."""

    tasks: list[ShardTask]
    fingerprint_inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a stage may read while planning or processing: the manifest and the output folder."""

    manifest: Any  # the job's validated manifest (dgaug.job.manifest.Manifest)
    storage: Storage
    upstream: dict[str, list[ShardTask]] = field(default_factory=dict)
    dry_run: bool = False
    output_dirs: dict[str, str] = field(default_factory=dict)  # every stage of the graph -> folder

    def upstream_url(self, stage: str, shard_id: int, suffix: str = ".tar") -> str:
        """Where shard `shard_id` of stage `stage` is committed: the one way a task names its inputs."""
        return self.storage.url(f"{self.output_dirs[stage]}/{shard_id:05d}{suffix}")

    @property
    def seed(self) -> int:
        return self.manifest.seed


class Stage:
    """Base class of every stage. Knows nothing of Ray, retries or markers: the executor does.

    Subclasses set `name`, `output_dir`, `upstream`, and implement `plan` and `process`.
    """

    name: ClassVar[str]
    output_dir: ClassVar[str]  # folder under the output root holding the shards
    upstream: ClassVar[tuple[str, ...]] = ()
    shard_ext: ClassVar[str] = ".tar"  # the main output; sizes.json counts these
    uses_gpu: ClassVar[bool] = False

    def __init__(self, manifest: Any):
        self.manifest = manifest
        self.log = logging.getLogger(f"dgaug.stages.{self.name}")

    # -- description
    @property
    def config(self) -> Any:
        return getattr(self.manifest.stages, self.name)

    def default_resources(self) -> StageResources:
        from dgaug.pipeline.resources import StageResources

        return StageResources(workers=1, num_cpus=1, num_gpus=1 if self.uses_gpu else 0)

    def resources(self) -> StageResources:
        return self.manifest.resources_for(self.name, self.default_resources())

    def fingerprint_config(self) -> dict[str, Any]:
        """The fields that decide this stage's output bytes (upstream fingerprints are added)."""
        raise NotImplementedError

    def shard_name(self, shard_id: int) -> str:
        return f"{shard_id:05d}"

    # -- work
    def plan(self, ctx: StageContext) -> Plan:
        """The shard tasks, from the upstream tasks in `ctx`; in a dry run it writes nothing."""
        raise NotImplementedError

    def setup(self, ctx: StageContext) -> None:
        """Once per worker before its first task: load models, compile. Only the executor calls
        it (and teardown); process() may assume it ran."""

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        raise NotImplementedError

    def teardown(self) -> None:
        """Once per worker after its last task: free memory."""


class ModelStage(Stage):
    """A stage that loads models once per worker (edsam, features): one worker per GPU of the
    cluster, or one on the CPU, and its models released at teardown.

    Subclasses name their models' attributes in `model_attrs` and load them in `setup`.
    """

    uses_gpu = True
    model_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, manifest: Any):
        super().__init__(manifest)
        for attr in self.model_attrs:
            setattr(self, attr, None)

    def on_cpu(self) -> bool:
        return self.config.device == "cpu" or self.config.model == TINY

    def default_resources(self) -> StageResources:
        """One worker on the CPU; else one per GPU (each loading the model once) with 4 CPUs for
        its image decoding and encoding."""
        from dgaug.pipeline.resources import StageResources

        if self.on_cpu():
            return StageResources(workers=1, num_cpus=1, num_gpus=0)
        return StageResources(workers=None, num_cpus=4, num_gpus=1)

    def teardown(self) -> None:
        from dgaug.models.runtime import release_memory

        for attr in self.model_attrs:
            setattr(self, attr, None)
        release_memory()
