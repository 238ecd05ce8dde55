"""Manifest section of the features stage (`stages.features`); light, imported by the schema."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class FeaturesConfig(BaseModel):
    """CLIP image and caption embeddings of every real and ED-SAM sample, to Parquet."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    model: str = Field(
        "ViT-B-16:laion2b_s34b_b88k",
        description="open_clip model: ARCH:TAG, hf-hub:org/name, ARCH:/path/to/checkpoint "
        "(safetensors or a torch checkpoint), or tiny-random (demo, tests).",
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute precision: auto is bf16 (or fp16) autocast on a GPU, fp32 on CPU.",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch threads on the CPU; CPU results depend on it, so fix it where bytes "
        "must match elsewhere. null: torch's default.",
    )
    batch_size: int = Field(256, ge=1, le=65536, description="Images per forward pass.")
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage type of the embeddings in the Parquet files."
    )
    include_edsam: bool = Field(
        True, description="Also embed the ED-SAM samples (when the edsam stage is enabled)."
    )
    decode_threads: int = Field(
        4, ge=1, le=256, description="Threads decoding and preprocessing images ahead of the model."
    )

    # Cannot change a stored byte: left out of the fingerprint.
    PERFORMANCE_FIELDS: ClassVar[frozenset[str]] = frozenset({"enabled", "decode_threads"})

    def effective(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.PERFORMANCE_FIELDS))
