"""Kills: SIGKILL the driver in the middle of stages, `dgaug train` in the middle of training, and a
Ray worker in the middle of a shard. Each rerun completes, every data file is byte-identical to an
uninterrupted run's, and no sample key is lost or duplicated.

The harness is tests/soak.py; `python tests/soak.py --kills 50` runs it with many seeded-random
kills. Here: a few kills, each aimed by what the output folder shows (a shard's scratch folder
appears, a stage's setup begins, a checkpoint is written), never by asserting a timing.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from tests.soak import (
    NUM_IMAGES,
    SHARDS,
    TRAIN_DIR,
    KillSpec,
    Reference,
    compare,
    kill_round,
    make_reference,
    only,
    partial_files,
    ray_manifest,
    ray_worker_round,
    snapshot,
    temporaries,
)

# Every test here drives whole runs and kills them: the slow tier.
pytestmark = pytest.mark.slow

# Keys in the reference: N real samples (in the tar and the status parquet), 2N ED-SAM samples,
# 3N feature rows (real + ED-SAM), 3N LDFS rows (N real x 3 target domains).
DOWNLOAD_EDSAM_KEYS = NUM_IMAGES + NUM_IMAGES + 2 * NUM_IMAGES
REFERENCE_KEYS = DOWNLOAD_EDSAM_KEYS + 3 * NUM_IMAGES + 3 * NUM_IMAGES


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One uninterrupted `dgaug run` (every stage, 4 shards, tiny models on the CPU) and
    `dgaug train` (clip, 18 steps); each test below reuses its output path, one at a time."""
    return make_reference(tmp_path_factory.mktemp("kills"))


def _plant_temporaries(command: str, out: Path) -> None:
    """What a kill inside an atomic write leaves (a hidden `.tmp`): the next run removes it."""
    if command == "run":
        inputs = next((out / "_dgaug/inputs/download").iterdir())
        for p in (
            out / "real/_state/.00001.json.0badc0de.tmp",
            out / "ldfs/fit/_state/.00000.json.0badc0de.tmp",
            inputs / ".00002.parquet.0badc0de.tmp",
        ):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"half")
    else:
        (out / TRAIN_DIR / ".model.safetensors.4242.tmp").write_bytes(b"half")


def test_reference_has_every_stage_and_every_key_once(reference: Reference) -> None:
    files = reference.snapshot.files
    for folder, ext in [("real", "tar"), ("edsam", "tar"), ("features", "parquet")]:
        assert sum(1 for f in files if f.startswith(f"{folder}/0") and f.endswith(ext)) == 4
    assert sum(1 for f in files if f.startswith("ldfs/0")) == SHARDS["ldfs"] == 4
    assert {"ldfs/fit/mapper.safetensors", f"{TRAIN_DIR}/model.safetensors"} <= set(files)
    ids = reference.snapshot.ids
    assert sum(sum(c.values()) for c in ids.values()) == REFERENCE_KEYS
    assert all(n == 1 for c in ids.values() for n in c.values())


def test_the_comparison_sees_a_changed_byte_a_lost_and_a_duplicated_sample(
    reference: Reference, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "copy"
    shutil.copytree(reference.kept, out, symlinks=True)
    tar = out / "edsam/00002.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    real = pq.read_table(out / "real/00003.parquet")
    pq.write_table(real.slice(1), out / "real/00003.parquet")  # one status row lost
    feats = pq.read_table(out / "features/00001.parquet")
    pq.write_table(pa.concat_tables([feats, feats.slice(0, 1)]), out / "features/00001.parquet")
    c = compare(reference.snapshot, snapshot(out))
    assert not c.ok and (c.lost, c.duplicated) == (1, 1)
    assert set(c.differing) == {
        "edsam/00002.tar",
        "real/00003.parquet",
        "features/00001.parquet",
    }
    # A visible shard that is not whole, and a marker vouching for other bytes, are seen.
    (out / "real/00001.tar").write_bytes(b"partial")
    assert set(partial_files(out, reference.snapshot)) >= {
        "real/00001.tar",
        "real/_state/00001.json vouches for 00001.tar",
        "edsam/00002.tar",
    }


def test_driver_killed_in_stages_then_rerun_gives_identical_bytes(reference: Reference) -> None:
    # Mid-shard in download (img2dataset's launcher and child must die with the driver) and in
    # ED-SAM, and in the setup before the LDFS fit (the barrier). tests/soak.py kills every
    # stage, many times.
    specs = [
        KillSpec("download", "shard", 0.5, 2),
        KillSpec("edsam", "shard", 0.5, 1),
        KillSpec("ldfs_fit", "setup", 0.5),
    ]
    r = kill_round(reference, specs, commands=("run",), before_rerun=_plant_temporaries)
    assert [(e.killed, e.returncode) for e in r.events] == [(True, -9)] * len(specs), r.events
    assert not any(e.partial for e in r.events), "a visible shard was partial after a kill"
    assert not any(e.orphans_left for e in r.events), "a process outlived the killed driver"
    assert r.final_rc == {"run": 0}
    c = r.comparison
    pipeline_files = [f for f in reference.snapshot.files if not f.startswith("train/")]
    assert c.files_compared == len(pipeline_files) and not (c.differing or c.missing or c.extra)
    assert (c.keys_checked, c.lost, c.duplicated) == (REFERENCE_KEYS, 0, 0)
    assert not c.marker_problems
    assert r.leftovers == [] and r.problems == []


def test_training_killed_then_rerun_gives_identical_weights(reference: Reference) -> None:
    start = reference.work / "pipeline-only"
    shutil.rmtree(start, ignore_errors=True)
    shutil.copytree(reference.kept, start, symlinks=True)
    shutil.rmtree(start / "train")
    # After the 2nd of 9 checkpoints: the rerun resumes from step 4 (or 6).
    specs = [KillSpec("train", "checkpoint", 0.5, 1)]
    r = kill_round(
        reference, specs, commands=("train",), start_from=start, before_rerun=_plant_temporaries
    )
    assert [(e.killed, e.returncode) for e in r.events] == [(True, -9)] * len(specs), r.events
    assert r.final_rc == {"train": 0}
    c = r.comparison
    assert f"{TRAIN_DIR}/model.safetensors" in reference.snapshot.files
    assert c.files_compared == len(reference.snapshot.files) and c.ok, c.describe()
    assert r.leftovers == [] and r.problems == []
    assert json.loads((reference.out / TRAIN_DIR / "train.json").read_text())["resumed_from"] >= 4


@pytest.mark.ray
def test_ray_worker_killed_mid_shard_is_retried_to_identical_bytes(
    reference: Reference, ray_session
) -> None:
    from dgaug.job.run import run_pipeline

    # Download and ED-SAM only (their bytes do not depend on the later stages): a download
    # worker (its img2dataset launcher must go with it) and an ED-SAM worker are killed.
    stages = ("download", "edsam")
    m = ray_manifest(reference, stages)
    kills, summaries = ray_worker_round(
        reference, list(stages), random.Random(0), lambda: run_pipeline(m)
    )
    assert [k.stage for k in kills] == list(stages) and all(k.killed for k in kills), kills
    # The lost worker's shard is retried in the same run (max_attempts 2) by a new actor.
    first = summaries[0]
    assert first.ok, {n: s.errors for n, s in first.stages.items() if s.errors}
    assert len(summaries) == 1
    assert all(first.stages[s].done == SHARDS[s] for s in stages)
    want = only(reference.snapshot, stages)
    c = compare(want, snapshot(reference.out, train=False))
    assert c.files_compared == len(want.files) and c.ok, c.describe()
    assert (c.keys_checked, c.lost, c.duplicated) == (DOWNLOAD_EDSAM_KEYS, 0, 0)
    assert not c.marker_problems
    assert temporaries(reference.out) == [], "the killed workers' scratch folders are removed"
