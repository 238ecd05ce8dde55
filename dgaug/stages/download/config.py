"""Manifest section of the download stage (`stages.download`); light, imported by the schema."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class DownloadConfig(BaseModel):
    """How img2dataset fetches and resizes each shard's URLs."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    image_size: int = Field(256, ge=8, le=8192, description="Side of the output images in pixels.")
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
        "border", description="img2dataset's resize_mode."
    )
    resize_only_if_bigger: bool = False
    encode_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the written images.")
    min_image_size: int = Field(
        0, ge=0, description="Skip images whose smaller side is below this."
    )
    max_aspect_ratio: float | None = Field(None, gt=0, description="null: no limit.")
    timeout: float = Field(10, gt=0, description="Seconds before one URL's request is abandoned.")
    retries: int = Field(0, ge=0, le=10, description="img2dataset's retries of a failed URL.")
    processes: int = Field(
        1, ge=1, le=256, description="Processes per worker; a shard is split among them."
    )
    threads: int = Field(32, ge=1, le=1024, description="Download threads per process.")
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] | None = Field(
        None, description="X-Robots-Tag directives that forbid use; null keeps img2dataset's list."
    )

    # Fields that change how fast a shard is made, not what is in it: left out of the fingerprint,
    # so they can be tuned between a killed run and its resume.
    PERFORMANCE_FIELDS: ClassVar[frozenset[str]] = frozenset({"processes", "threads", "enabled"})
