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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests (LDFS fits): a second OpenMP thread only
    adds waits, multiplied on a busy 2-core machine, and float64 sums keep one fixed order.
    Restored for the modules that follow. Use: pytestmark = usefixtures("one_torch_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_manifest(tmp_path: Path):
    from dgaug.job.manifest import validate

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
        # Torch's OpenMP threads spin while they wait; with several actors on 2 cores each
        # spinning pool stalls the others (the toy-model demo on Ray ran 10x slower than local).
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
    )
    return ray


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server on 127.0.0.1 for the session, and the environment that points
    dgaug (and every process it starts, Ray workers included) at it."""
    from tests.helpers import S3_ENV, s3_server

    with s3_server() as endpoint:
        saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        try:
            yield endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A new, empty bucket on the session's S3 server; yields its name."""
    from tests.helpers import new_bucket

    return new_bucket(request.node.name)
