"""Scale-out: `dgaug run` joins an existing multi-node Ray cluster (`executor.address`), places
its model stages on the nodes that declare the resource they ask for, passes shards between
stages through an S3 bucket, and survives losing a worker node in the middle of a shard.

The cluster is real: a head and two worker nodes, each its own raylet and object store, started
by the test on this machine (ray.cluster_utils). The worker nodes declare a custom `fake_gpu`
resource standing in for GPUs; the model stages ask for it, as they would ask for `num_gpus` on
GPU nodes. The S3 store is the moto server of the session (conftest.s3_endpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    REPO,
    TINY_EDSAM,
    TINY_FEATURES,
    TINY_LDFS,
    new_bucket,
    s3_objects,
    tiny_manifest_dict,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SHARDS = 3  # of 6 images: one more than the two ED-SAM workers, so a lost node leaves work
MODEL_STAGES = ("edsam", "features")
DATA_SUFFIXES = (".tar", ".parquet", ".safetensors", "sizes.json")
# Marker fields that say what was committed (the rest says when, where and how often).
MARKER_FIELDS = ("status", "samples", "counts", "failures", "outputs", "fingerprint")


def _manifest(output: str, executor: dict[str, Any]) -> dict[str, Any]:
    d = tiny_manifest_dict(output, shard_size=6)
    d["source"]["num_images"] = 6 * SHARDS
    d["executor"] = {"max_attempts": 3, **executor}
    # 12 steps: an ED-SAM shard lasts seconds, so the node is lost while one is running.
    d["stages"]["edsam"] = {**TINY_EDSAM, "steps": 12}
    d["stages"]["features"] = dict(TINY_FEATURES)
    d["stages"]["ldfs"] = dict(TINY_LDFS)
    return d


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """A head node (CPUs only) and two worker nodes with 2 `fake_gpu` each. Node loss is
    detected within seconds instead of Ray's default half minute."""
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 0,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    workers = [c.add_node(num_cpus=2, num_gpus=0, resources={"fake_gpu": 2}) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def reference(s3_endpoint) -> dict[str, bytes]:
    """The same manifest run uninterrupted by the local executor, into the same store."""
    from dgaug.job.manifest import validate
    from dgaug.job.run import run_pipeline

    prefix = f"{new_bucket('cluster-reference')}/out"
    assert run_pipeline(validate(_manifest(f"s3://{prefix}", {"kind": "local"}))).ok
    return s3_objects(prefix)


def _node_of(pid: int, nodes: list[Any]) -> Any | None:
    """The cluster node whose raylet started process `pid`."""
    import psutil

    try:
        parents = {p.pid for p in psutil.Process(pid).parents()}
    except psutil.NoSuchProcess:
        return None
    for node in nodes:
        raylet = node.all_processes.get("raylet")
        if raylet and raylet[0].process.pid in parents:
            return node
    return None


def _edsam_shard_in_flight(nodes: list[Any]) -> tuple[int, Any] | None:
    """(shard, node) of an ED-SAM attempt running now: its scratch folder names shard and pid
    (Storage.scratch_dir: `dgaug-edsam-<shard>.<pid>.<hex>-*` in the node's temp folder)."""
    for name in os.listdir(tempfile.gettempdir()):
        if name.startswith("dgaug-edsam-"):
            shard, pid = name.removeprefix("dgaug-edsam-").split(".")[:2]
            node = _node_of(int(pid), nodes)
            if node is not None:
                return int(shard), node
    return None


def test_run_on_a_cluster_survives_losing_a_worker_node(cluster, reference, tmp_path: Path):
    c, workers = cluster
    prefix = f"{new_bucket('cluster-run')}/out"
    executor = {
        "kind": "ray",
        "address": c.address,
        "resources": {
            # The synthetic source's files are on the driver's machine: download runs on the
            # head node (docs/cluster.md says so for sources that are local files).
            "download": {
                "workers": 1,
                "num_cpus": 0.5,
                "custom": {"node:__internal_head__": 0.001},
            },
            # Stand-ins for GPUs: only the worker nodes have `fake_gpu`.
            **{s: {"workers": 2, "num_cpus": 0.5, "custom": {"fake_gpu": 1}} for s in MODEL_STAGES},
        },
    }
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(f"s3://{prefix}", executor)))
    run = subprocess.Popen(
        [sys.executable, "-m", "dgaug.cli.app", "run", str(manifest)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    # Lose the worker node that is in the middle of an ED-SAM shard: its raylet, object store
    # and workers are SIGKILLed, as when a spot instance goes away.
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and run.poll() is None and time.monotonic() < deadline:
        victim = _edsam_shard_in_flight(workers)
        time.sleep(0.005)
    assert victim is not None, "no ED-SAM shard was seen running on a worker node"
    lost_shard, lost_node = victim
    c.remove_node(lost_node, allow_graceful=False)
    survivor = next(n for n in workers if n is not lost_node)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out

    got = s3_objects(prefix)
    markers = {k: json.loads(v) for k, v in got.items() if "/_state/" in k}
    assert not [k for k in markers if k.endswith(".error.json")], "every failure was retried"
    # Placement: model stages only ever ran on nodes with the resource they declared.
    worker_ids = {n.node_id for n in workers}
    for stage in MODEL_STAGES:
        nodes = [markers[f"{stage}/_state/{i:05d}.json"]["node"] for i in range(SHARDS)]
        assert set(nodes) <= worker_ids, (stage, nodes)
    # Every real shard was made on the head and every ED-SAM shard on a worker node: each one
    # crossed nodes through the bucket (and the bytes below match).
    downloads = {markers[f"real/_state/{i:05d}.json"]["node"] for i in range(SHARDS)}
    assert downloads == {c.head_node.node_id}
    # The lost shard was retried, on the node that is left.
    lost = markers[f"edsam/_state/{lost_shard:05d}.json"]
    assert lost["attempts"] >= 2 and lost["node"] == survivor.node_id, lost
    # Same bytes as the uninterrupted single-process run, shard for shard, marker for marker.
    data = sorted(k for k in reference if k.endswith(DATA_SUFFIXES))
    assert data == sorted(k for k in got if k.endswith(DATA_SUFFIXES))
    assert len([k for k in data if k.startswith(("edsam/0", "features/0", "ldfs/0"))]) == 3 * SHARDS
    for k in data:
        assert got[k] == reference[k], k
    for k, marker in markers.items():
        want = json.loads(reference[k])
        assert {f: marker.get(f) for f in MARKER_FIELDS} == {f: want.get(f) for f in MARKER_FIELDS}

    status = subprocess.run(
        [sys.executable, "-m", "dgaug.cli.app", "status", str(manifest)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert status.returncode == 0, status.stdout + status.stderr
