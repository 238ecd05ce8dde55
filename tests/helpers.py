"""Helpers shared by test modules (importable, unlike conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RAY_TOY_SLOTS = 4  # the `toy` custom resource of the session Ray (see conftest)
RAY_GPU_SLOTS = 2  # logical GPUs of the session Ray: scheduling only, nothing runs on them

REPO = Path(__file__).resolve().parent.parent


def tiny_manifest_dict(output: Path | str, **overrides: Any) -> dict[str, Any]:
    """A synthetic-source manifest of 3 shards of 8 images at 32 px: the smallest real run."""
    data: dict[str, Any] = {
        "name": "tiny",
        "output": str(output),
        "seed": 0,
        "shard_size": 8,
        "source": {"kind": "synthetic", "num_images": 24, "image_size": 32},
        "executor": {"kind": "local", "max_attempts": 2},
        "stages": {"download": {"image_size": 32, "threads": 4, "timeout": 5}},
    }
    data.update(overrides)
    return data
