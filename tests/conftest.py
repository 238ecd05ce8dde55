"""Shared fixtures: small manifests, offline settings. No network, no GPU, no model hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import tiny_manifest_dict

# Nothing in the tests may reach the network: libraries that phone home are told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

@pytest.fixture
def tiny_manifest(tmp_path: Path):
    from dgaug.pipeline.manifest import validate

    return validate(tiny_manifest_dict(tmp_path / "out"))
