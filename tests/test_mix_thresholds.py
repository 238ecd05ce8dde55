"""`mix:` thresholds: the open_clip view leaves low-scoring ED-SAM samples out, by the features
files' scores, while the shards keep every sample; the printed 1:1 arguments count what is kept."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgaug.job.manifest import validate
from dgaug.job.run import run_pipeline
from dgaug.pipeline.mix import balanced_mix_args
from tests.helpers import tiny_manifest_dict

pytestmark = pytest.mark.slow  # whole pipeline runs: e2e tier

EDSAM = {"model": "tiny-random", "device": "cpu", "samples_per_image": 2, "steps": 2}
FEATURES = {"model": "tiny-random", "device": "cpu", "batch_size": 16, "cpu_threads": 1}


def _manifest(out: Path, mix: dict | None):
    d = tiny_manifest_dict(out)
    d["stages"]["edsam"] = {**EDSAM, "image_size": 32}
    d["stages"]["features"] = FEATURES
    if mix is not None:
        d["mix"] = mix
    return validate(d)


def _keys(tar: Path) -> list[str]:
    with tarfile.open(tar) as tf:
        return sorted({m.name.split(".", 1)[0] for m in tf if m.isfile()})


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixf") / "out"
    assert run_pipeline(_manifest(out, None)).ok
    return out


def test_thresholds_filter_the_view_not_the_shards(out: Path) -> None:
    table = pa.concat_tables(
        [pq.read_table(p) for p in sorted((out / "features").glob("*.parquet"))]
    )
    ed = [r for r in table.to_pylist() if r["origin"] == "edsam"]
    bound = sorted(r["caption_score"] for r in ed)[len(ed) // 2]
    want = {r["key"] for r in ed if r["caption_score"] >= bound}
    shards = {p.name: p.read_bytes() for p in (out / "edsam").glob("*.tar")}

    summary = run_pipeline(_manifest(out, {"min_caption_score": bound}))
    assert summary.ok and all(s.done == 0 for s in summary.stages.values())  # nothing remade
    mix = out / "mix"
    copies = sorted(mix.glob("edsam-*.tar"))
    assert copies and all(p.is_file() and not p.is_symlink() for p in copies)
    assert all((mix / f"real-{p.name}").is_symlink() for p in (out / "real").glob("*.tar"))
    kept = {k for p in copies for k in _keys(p)}
    assert kept == want
    sizes = json.loads((mix / "sizes.json").read_text())
    assert sum(n for name, n in sizes.items() if name.startswith("edsam-")) == len(want)
    record = json.loads((mix / "filtered.json").read_text())
    assert record["rule"] == f"caption_score >= {bound:g}"
    assert sum(r["left_out"] for r in record["shards"].values()) == len(ed) - len(want)
    # The shards keep every sample, byte for byte.
    assert {p.name: p.read_bytes() for p in (out / "edsam").glob("*.tar")} == shards
    # The paper's 1:1 arguments weigh the kept samples against the real ones.
    args = balanced_mix_args(str(out), sizes, "real", "edsam")
    n_real = sum(n for name, n in sizes.items() if name.startswith("real-"))
    assert f"'1::{n_real / len(want):.6g}'" in args

    # A rerun keeps the copies as they are; without thresholds the view links every shard again.
    mtimes = {p.name: os.stat(p).st_mtime_ns for p in copies}
    assert run_pipeline(_manifest(out, {"min_caption_score": bound})).ok
    assert {p.name: os.stat(p).st_mtime_ns for p in copies} == mtimes
    assert run_pipeline(_manifest(out, None)).ok
    assert all(p.is_symlink() for p in mix.glob("*.tar"))
    assert not (mix / "filtered.json").exists()
    sizes = json.loads((mix / "sizes.json").read_text())
    assert sum(n for name, n in sizes.items() if name.startswith("edsam-")) == len(ed)


def test_thresholds_need_the_scores(tmp_path: Path) -> None:
    d = tiny_manifest_dict(tmp_path / "o")
    d["stages"]["edsam"] = {**EDSAM, "image_size": 32}
    d["mix"] = {"max_source_similarity": 0.9}
    with pytest.raises(Exception, match="features stage"):
        validate(d)
