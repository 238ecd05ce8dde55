"""Shared fixtures: small manifests, offline settings. No network, no GPU, no model hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import RAY_GPU_SLOTS, RAY_TOY_SLOTS, tiny_manifest_dict

# Nothing in the tests may reach the network: libraries that phone home are told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def tiny_manifest(tmp_path: Path):
    from dgaug.pipeline.manifest import validate

    return validate(tiny_manifest_dict(tmp_path / "out"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: 2 CPUs, 2 logical GPUs (Ray only counts them; no
    test stage touches CUDA) and a custom `toy` resource for executor tests.

    Library code never shuts Ray down; it goes down with the test process.
    """
    import ray

    ray.init(
        num_cpus=2,
        num_gpus=RAY_GPU_SLOTS,
        resources={"toy": RAY_TOY_SLOTS},
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,
    )
    return ray
