"""The features stage on tiny-random CLIP: rows, columns, norms, inheritance, skips, determinism."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dgaug.job.manifest import validate
from dgaug.job.run import run_pipeline
from tests.helpers import tiny_manifest_dict
from tests.test_edsam_stage import write_shard

pytestmark = pytest.mark.slow  # every test reads a whole download + edsam + features run: e2e tier

EDSAM = {"model": "tiny-random", "device": "cpu", "samples_per_image": 2, "steps": 2}
FEATURES = {"model": "tiny-random", "device": "cpu", "batch_size": 5, "cpu_threads": 1}


def _manifest(out: Path, features: dict[str, Any] | None = None, edsam: bool = True, **kw: Any):
    d = tiny_manifest_dict(out, **kw)
    d["stages"] = {**d["stages"], "features": {**FEATURES, **(features or {})}}
    if edsam:
        d["stages"]["edsam"] = {**EDSAM, "image_size": 32}
    return validate(d)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("features") / "out"
    summary = run_pipeline(_manifest(out))
    assert summary.ok, summary.stages
    return out, summary


def _tar_samples(tar: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_one_row_per_real_and_edsam_sample_in_shard_order(run) -> None:
    out, summary = run
    st = summary.stages["features"]
    assert (st.done, st.samples) == (3, 24 + 48)
    for i in range(3):
        t = pq.read_table(out / f"features/{i:05d}.parquet")
        real = list(_tar_samples(out / f"real/{i:05d}.tar"))
        edsam = list(_tar_samples(out / f"edsam/{i:05d}.tar"))
        assert t.column("key").to_pylist() == real + edsam
        assert t.column("origin").to_pylist() == ["real"] * len(real) + ["edsam"] * len(edsam)
        marker = json.loads((out / f"features/_state/{i:05d}.json").read_text())
        assert marker["counts"] == {"edsam": len(edsam), "real": len(real)}
    assert not (out / "features/sizes.json").exists()  # sizes.json is for tars (open_clip)


def test_columns_metadata_and_inherited_fields(run) -> None:
    out, _ = run
    t = pq.read_table(out / "features/00001.parquet")
    assert t.schema.field("image_embedding").type == pa.list_(pa.float16(), 32)
    assert t.schema.field("text_embedding").type == pa.list_(pa.float16(), 32)
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    assert meta["dgaug.model"] == "tiny-random" and meta["dgaug.tiny_random"] == "true"
    rows = {r["key"]: r for r in t.to_pylist()}
    real = _tar_samples(out / "real/00001.tar")
    for key, r in rows.items():
        if r["origin"] == "real":
            src = json.loads(real[key]["json"])
            assert (r["source_key"], r["sample_index"]) == (key, None)
            assert r["caption"] == real[key]["txt"].decode()
        else:
            src = json.loads(real[r["source_key"]]["json"])
            assert key == f"{r['source_key']}_{r['sample_index']}"
            assert r["caption"] == real[r["source_key"]]["txt"].decode()
        assert (r["label"], r["domain"]) == (src["label"], src["domain"])
        for col in ("image_embedding", "text_embedding"):
            assert abs(np.linalg.norm(np.array(r[col], dtype=np.float32)) - 1) < 2e-3


def test_embeddings_are_open_clips_own(run) -> None:
    """The same numbers as open_clip's preprocess + encode on the decoded image and caption."""
    from dgaug.models.clip import load_clip

    out, _ = run
    clip = load_clip("tiny-random", device="cpu")
    t = pq.read_table(out / "features/00000.parquet").to_pylist()[:4]
    real = _tar_samples(out / "real/00000.tar")
    images = [Image.open(io.BytesIO(real[r["key"]]["jpg"])).convert("RGB") for r in t]
    want_img = clip.encode_pil(images).numpy()
    want_txt = clip.encode_text([r["caption"] for r in t]).numpy()
    got_img = np.array([r["image_embedding"] for r in t], dtype=np.float32)
    got_txt = np.array([r["text_embedding"] for r in t], dtype=np.float32)
    np.testing.assert_allclose(got_img, want_img, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(got_txt, want_txt, atol=2e-3)


def test_score_columns_match_a_direct_computation(run) -> None:
    """caption_score = cos(image, caption) for every row, source_similarity = cos(sample, its
    source image) for ED-SAM rows, alpha = the sample json's alpha: recomputed here from open_clip
    on the decoded images and captions, and from the edsam tars' json."""
    from dgaug.models.clip import load_clip

    out, _ = run
    clip = load_clip("tiny-random", device="cpu")
    t = pq.read_table(out / "features/00002.parquet").to_pylist()
    real = _tar_samples(out / "real/00002.tar")
    edsam = _tar_samples(out / "edsam/00002.tar")
    members = {**real, **edsam}
    images = [Image.open(io.BytesIO(members[r["key"]]["jpg"])).convert("RGB") for r in t]
    img = clip.encode_pil(images).numpy()
    txt = clip.encode_text([r["caption"] for r in t]).numpy()
    row = {r["key"]: i for i, r in enumerate(t)}
    for i, r in enumerate(t):
        assert abs(r["caption_score"] - float(img[i] @ txt[i])) < 2e-3
        if r["origin"] == "real":
            assert r["source_similarity"] is None and r["alpha"] is None
        else:
            want = float(img[i] @ img[row[r["source_key"]]])
            assert abs(r["source_similarity"] - want) < 2e-3
            assert r["alpha"] == pytest.approx(json.loads(edsam[r["key"]]["json"])["alpha"])
    # Samples differ from their sources, so the similarities are not all 1.
    assert min(r["source_similarity"] for r in t if r["origin"] == "edsam") < 0.999


def test_rerun_is_a_no_op_and_a_fresh_run_gives_the_same_bytes(run, tmp_path: Path) -> None:
    out, _ = run
    files = {p.name: p.read_bytes() for p in (out / "features").glob("*.parquet")}
    again = run_pipeline(_manifest(out))
    assert (again.stages["features"].skipped, again.stages["features"].done) == (3, 0)
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    shutil.rmtree(fresh / "features")
    m = _manifest(fresh)
    assert run_pipeline(m).ok
    assert {p.name: p.read_bytes() for p in (fresh / "features").glob("*.parquet")} == files


def test_float32_without_edsam_and_bad_images_counted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_shard(src / "a.tar", 0, 4, garbage=(1,))
    out = tmp_path / "out"
    m = _manifest(
        out,
        {"dtype": "float32"},
        edsam=False,
        source={"kind": "shards", "path": str(src / "a.tar")},
    )
    s = run_pipeline(m)
    assert s.ok, s.stages
    assert s.stages["features"].failures == {"undecodable_image": 1}
    t = pq.read_table(out / "features/00000.parquet")
    assert t.num_rows == 3 and set(t.column("origin").to_pylist()) == {"real"}
    assert t.schema.field("image_embedding").type == pa.list_(pa.float32(), 32)
    marker = json.loads((out / "features/_state/00000.json").read_text())
    assert marker["failures"] == {"undecodable_image": 1}


def test_manifest_section(tmp_path: Path) -> None:
    from dgaug.job.graph import build_stages
    from dgaug.job.manifest import ManifestError

    stages = build_stages(_manifest(tmp_path, edsam=False))
    assert list(stages) == ["download", "features"] and stages["features"].upstream == ("download",)
    stages = build_stages(_manifest(tmp_path))
    assert stages["features"].upstream == ("download", "edsam")
    assert stages["features"].resources().num_gpus == 0  # tiny-random runs on the CPU
    full = build_stages(
        _manifest(tmp_path, {"model": "ViT-B-16:laion2b_s34b_b88k", "device": "auto"}, edsam=False)
    )
    r = full["features"].resources()
    assert (r.workers, r.num_gpus) == (None, 1)
    with pytest.raises(ManifestError) as exc:
        _manifest(tmp_path, {"dtype": "float64", "batch_size": 0})
    assert any(p.startswith("stages.features.dtype") for p in exc.value.problems)
    assert any(p.startswith("stages.features.batch_size") for p in exc.value.problems)
