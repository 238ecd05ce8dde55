"""The LDFS stages in a pipeline: the fit barrier, synthesized rows, inheritance, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from dgaug.core.storage import Storage
from dgaug.job.manifest import ManifestError, validate
from dgaug.job.run import plan_stages, run_pipeline
from tests.helpers import tiny_manifest_dict

FEATURES = {"model": "tiny-random", "device": "cpu", "batch_size": 16, "cpu_threads": 1}
LDFS = {"targets": ["sketch", "cartoon"], "epochs": 3, "batch_size": 8, "draws": 2}


def _manifest(out: Path, **ldfs: Any):
    d = tiny_manifest_dict(out)
    d["stages"] = {**d["stages"], "features": FEATURES, "ldfs": {**LDFS, **ldfs}}
    return validate(d)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("ldfs") / "out"
    summary = run_pipeline(_manifest(out))
    assert summary.ok, summary.stages
    return out, summary


def test_fit_is_one_task_after_every_features_shard(tmp_path: Path) -> None:
    m = _manifest(tmp_path / "out")
    plans = plan_stages(m, Storage(m.output), dry_run=True)
    assert list(plans) == ["download", "features", "ldfs_fit", "ldfs"]
    (fit,) = plans["ldfs_fit"].tasks
    assert fit.deps == (("features", 0), ("features", 1), ("features", 2))
    assert [t.deps for t in plans["ldfs"].tasks] == [
        (("features", i), ("ldfs_fit", 0)) for i in range(3)
    ]


def test_synthesized_rows_inherit_keys_and_labels(run) -> None:
    out, summary = run
    assert summary.stages["ldfs_fit"].done == 1
    assert summary.stages["ldfs"].samples == 24 * 2 * 2  # rows x targets x draws
    for i in range(3):
        feats = pq.read_table(out / f"features/{i:05d}.parquet").to_pylist()
        t = pq.read_table(out / f"ldfs/{i:05d}.parquet")
        assert t.schema.field("embedding").type == pa.list_(pa.float16(), 32)
        rows = t.to_pylist()
        want = [
            (f["key"], dom, j, f["label"]) for f in feats for dom in LDFS["targets"] for j in (0, 1)
        ]
        assert [(r["key"], r["domain"], r["draw"], r["label"]) for r in rows] == want
        emb = np.array([r["embedding"] for r in rows], dtype=np.float32)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
        # Noisy conditioning (sigma > 0): the two draws of a row differ.
        assert not np.allclose(emb[0], emb[1])
    meta = pq.read_schema(out / "ldfs/00000.parquet").metadata
    assert meta[b"dgaug.method"] == b"ldfs" and meta[b"dgaug.text_model"] == b"tiny-random"


def test_mapper_and_curve_are_written(run) -> None:
    out, _ = run
    with safe_open(str(out / "ldfs/fit/mapper.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["dgaug"])
        assert (meta["method"], meta["dim"], meta["text_model"]) == ("ldfs", 32, "tiny-random")
        assert list(f.keys())
    curve = json.loads((out / "ldfs/fit/curve.json").read_text())
    assert [row["epoch"] for row in curve["curve"]] == [1, 2, 3]
    assert 1 <= curve["best_epoch"] <= 3
    marker = json.loads((out / "ldfs/fit/_state/00000.json").read_text())
    assert marker["counts"] == {"source_features": 24}


def test_rerun_is_a_no_op_and_a_fresh_run_gives_the_same_bytes(run, tmp_path: Path) -> None:
    out, _ = run
    files = {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in [*(out / "ldfs").glob("*.parquet"), out / "ldfs/fit/mapper.safetensors"]
    }
    again = run_pipeline(_manifest(out))
    assert again.stages["ldfs"].done == 0 and again.stages["ldfs_fit"].done == 0
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    shutil.rmtree(fresh / "ldfs")
    assert run_pipeline(_manifest(fresh)).ok
    for rel, data in files.items():
        assert (fresh / rel).read_bytes() == data, rel


def test_lads_baseline_and_a_changed_target_is_refused(run, tmp_path: Path) -> None:
    from dgaug.pipeline.run import FingerprintMismatch

    out, _ = run
    with pytest.raises(FingerprintMismatch, match="targets"):
        run_pipeline(_manifest(out, targets=["sketch", "painting"]))
    lads = run_pipeline(_manifest(tmp_path / "lads", method="lads", draws=1))
    assert lads.ok and lads.stages["ldfs"].samples == 24 * 2


def test_attributes_file_is_checked_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="stages.ldfs.attributes"):
        plan_stages(
            m := _manifest(tmp_path / "out", attributes=str(tmp_path / "none.json")),
            Storage(m.output),
            dry_run=True,
        )
    bad = tmp_path / "bad.json"
    bad.write_text('{"circle": "round"}')
    with pytest.raises(ManifestError, match="list of strings"):
        m = _manifest(tmp_path / "out", attributes=str(bad))
        plan_stages(m, Storage(m.output), dry_run=True)
    good = tmp_path / "attrs.json"
    good.write_text(json.dumps({"circle": ["red", "small"], "square": ["blue"]}))
    m = _manifest(tmp_path / "out2", attributes=str(good), epochs=1)
    assert run_pipeline(m).ok
