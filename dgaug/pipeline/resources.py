"""What a stage's workers need and how the executor runs them: the manifest's `executor` section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageResources(_Strict):
    """What one worker of a stage needs, and how many workers the Ray executor starts."""

    workers: int | None = Field(
        1,
        ge=1,
        le=4096,
        description="Actors of the stage (Ray); null: one per GPU of the cluster (GPU stages).",
    )
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    custom: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources, e.g. {accelerator_type:H100: 1}."
    )


class ExecutorConfig(_Strict):
    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(
        None, description="Ray cluster address ('auto', 'ray://host:10001'); null starts one here."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Tries per shard within one run.")
    resources: dict[str, StageResources] = Field(default_factory=dict)
