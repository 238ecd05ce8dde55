"""The lightweight trainer on a tiny real run: each mode learns, resumes exactly, and evaluates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dgaug.job.manifest import validate
from dgaug.job.run import run_pipeline
from dgaug.trainer.checkpoint import CheckpointMismatch, list_checkpoints
from dgaug.trainer.config import TrainConfig
from dgaug.trainer.data import DataError, index_shards, read_features, read_synthetic
from dgaug.trainer.run import train
from tests.helpers import REPO, tiny_manifest_dict

TARGETS = ["sketch", "cartoon", "painting"]


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """download (48 images: 6 shapes x 4 styles x 2) + edsam + features + ldfs, and 48 eval images."""
    out = tmp_path_factory.mktemp("trainer") / "out"
    d = tiny_manifest_dict(out, shard_size=16)
    d["source"].update(num_images=48, eval_images=48)
    d["stages"]["edsam"] = {
        "model": "tiny-random",
        "device": "cpu",
        "samples_per_image": 2,
        "steps": 2,
        "image_size": 32,
    }
    d["stages"]["features"] = {"model": "tiny-random", "device": "cpu", "batch_size": 32}
    d["stages"]["ldfs"] = {"source_domain": "photo", "targets": TARGETS, "epochs": 2}
    assert run_pipeline(validate(d)).ok
    return out


def _cfg(run_out: Path, output: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "model": "tiny-random",
        "device": "cpu",
        "cpu_threads": 1,
        "output": str(output),
        "data": {
            "real": str(run_out / "real"),
            "edsam": str(run_out / "edsam"),
            "features": str(run_out / "features"),
            "ldfs": str(run_out / "ldfs"),
        },
        "eval": {"path": str(run_out / "eval" / "images")},
        "batch_size": 8,
        "checkpoint_every": 4,
    }
    for k, v in kw.items():
        if isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        else:
            base[k] = v
    return TrainConfig.model_validate(base)


def _first_last(losses: list[float], n: int = 3) -> tuple[float, float]:
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_clip_mode_loss_falls_and_writes_a_loadable_model(run_out: Path, tmp_path: Path) -> None:
    cfg = _cfg(run_out, tmp_path / "clip", mode="clip", epochs=8, lr=2e-3, warmup_steps=2)
    r = train(cfg)
    assert r.steps == 8 * (48 // 8)
    first, last = _first_last(r.losses)
    assert last < first - 0.3, r.losses
    # The saved model loads as an open_clip checkpoint and is the trained one, not the start.
    from dgaug.models.clip import load_clip

    trained = load_clip(f"dgaug-tiny:{tmp_path / 'clip' / 'model.safetensors'}", device="cpu")
    start = load_clip("tiny-random", device="cpu")
    probe = trained.tokenizer(["a photo of a circle"])
    assert not torch.allclose(trained.model.encode_text(probe), start.model.encode_text(probe))
    results = json.loads((tmp_path / "clip" / "eval.json").read_text())
    assert set(results["domains"]) == {"photo", "sketch", "cartoon", "painting"}
    assert results["classes"] == sorted(results["classes"]) and len(results["classes"]) == 6
    assert (tmp_path / "clip" / "eval.md").read_text().startswith("| domain |")


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_clip_batches_pair_real_samples_with_their_own_edsam_samples(run_out: Path) -> None:
    from dgaug.models.clip import load_clip
    from dgaug.trainer.modes import ClipTask

    real, edsam = index_shards(run_out / "real"), index_shards(run_out / "edsam")
    task = ClipTask(
        load_clip("tiny-random", device="cpu"),
        real,
        edsam,
        batch_size=8,
        edsam_ratio=0.5,
        seed=0,
        decode_threads=2,
    )
    try:
        rows = task._rows(0, 0)
        partners = task.partners(rows, 0, 0)
        assert len(partners) == 4  # half the batch
        for (sample, caption), source in zip(partners, rows[:4], strict=True):
            assert sample.source_key == source.key and caption == source.caption
        # Same (epoch, index): same batch and partners; another epoch: another order.
        assert [p.key for p in task._rows(0, 0)] == [p.key for p in rows]
        assert task.partners(rows, 0, 0) == partners
        assert [p.key for p in task._rows(1, 0)] != [p.key for p in rows]
    finally:
        task.close()


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_probe_mode_trains_on_real_plus_ldfs_rows(run_out: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        run_out,
        tmp_path / "probe",
        mode="probe",
        epochs=30,
        lr=0.05,
        weight_decay=0.0,
        data={"domains": ["photo"]},
    )
    r = train(cfg)
    real = read_features(run_out / "features", domains=["photo"])
    # LDFS maps every real row; training on photo takes only what it made from photo rows.
    assert len(read_synthetic(run_out / "ldfs")) == 48 * len(TARGETS)
    synthetic = read_synthetic(run_out / "ldfs", sources=set(real.keys))
    assert len(synthetic) == len(real) * len(TARGETS)
    assert r.steps == 30 * ((len(real) + len(synthetic)) // 8)
    first, last = _first_last(r.losses)
    assert last < first * 0.8, r.losses
    weights = load_file(str(tmp_path / "probe" / "model.safetensors"))
    assert weights["weight"].shape == (6, real.embeddings.shape[1])
    assert json.loads((tmp_path / "probe" / "eval.json").read_text())["probe"] == "trained"


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_score_thresholds_leave_samples_out_of_training_not_of_the_files(run_out: Path) -> None:
    """min_caption_score / max_source_similarity leave ED-SAM samples out, by the features files'
    score columns; the shards and features files keep every sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dgaug.trainer.run import _train_set

    table = pa.concat_tables(
        [pq.read_table(p) for p in sorted((run_out / "features").glob("*.parquet"))]
    )
    ed = table.filter(pa.compute.equal(table["origin"], "edsam")).to_pylist()
    median_caption = sorted(r["caption_score"] for r in ed)[len(ed) // 2]
    max_source = sorted(r["source_similarity"] for r in ed)[len(ed) // 4]
    want = {
        r["key"]
        for r in ed
        if r["caption_score"] >= median_caption and r["source_similarity"] <= max_source
    }
    assert 0 < len(want) < len(ed) // 2
    data = {"min_caption_score": median_caption, "max_source_similarity": max_source}
    cfg = _cfg(run_out, run_out / "unused", mode="probe", data={**data, "edsam_features": True})
    phases: list[str] = []
    got, weights = _train_set(cfg, phases.append)
    assert weights is None  # synthetic_weight 1: every row counts the same
    n_real = table.num_rows - len(ed)
    assert len(got) == n_real + len(want) + 48 * 3  # + LDFS rows
    assert {k for k in got.keys if "_" in k and "@" not in k} == want
    assert f"{len(ed) - len(want)} of {len(ed)} ED-SAM samples left out" in phases[0]
    assert pq.read_table(run_out / "features/00000.parquet").num_rows == 16 * 3  # untouched
    # clip mode needs the features files to read the scores from.
    no_features = _cfg(run_out, run_out / "unused", mode="clip", data=data)
    no_features.data.features = None
    assert any("min_caption_score" in p for p in no_features.missing_inputs())


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_coop_mode_learns_only_the_context(run_out: Path, tmp_path: Path) -> None:
    cfg = _cfg(run_out, tmp_path / "coop", mode="coop", epochs=10, lr=0.02, weight_decay=0.0)
    r = train(cfg)
    first, last = _first_last(r.losses)
    assert last < first - 0.05, r.losses
    weights = load_file(str(tmp_path / "coop" / "model.safetensors"))
    assert list(weights) == ["ctx"] and weights["ctx"].shape[0] == cfg.n_ctx
    result = json.loads((tmp_path / "coop" / "eval.json").read_text())
    assert all("zero_shot_start" in v for v in result["domains"].values())


@pytest.mark.parametrize("mode", ["probe", "coop"])
def test_interrupted_training_resumes_to_the_uninterrupted_result(
    run_out: Path, tmp_path: Path, mode: str
) -> None:
    kw = {"mode": mode, "epochs": 4, "lr": 0.02, "weight_decay": 0.01, "warmup_steps": 3}
    whole = train(_cfg(run_out, tmp_path / "whole", **kw))

    def stop_at_7(step: int, total: int, loss: float) -> None:
        if step == 7:  # between the checkpoints of steps 4 and 8: steps 5-7 are lost
            raise KeyboardInterrupt

    cut = _cfg(run_out, tmp_path / "cut", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(cut, on_step=stop_at_7)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [4]
    resumed = train(cut)
    assert resumed.resumed_from == 4
    assert resumed.losses == whole.losses
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_clip_training_killed_with_sigkill_resumes_to_the_same_weights(
    run_out: Path, tmp_path: Path
) -> None:
    args = [
        "--mode",
        "clip",
        "--real",
        str(run_out / "real"),
        "--edsam",
        str(run_out / "edsam"),
        "--set",
        "train.model=tiny-random",
        "--set",
        "train.device=cpu",
        "--set",
        "train.cpu_threads=1",
        "--set",
        "train.epochs=3",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.checkpoint_every=3",
        "--set",
        "train.lr=0.001",
    ]
    dgaug = [sys.executable, "-m", "dgaug.cli.app", "train"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    whole = subprocess.run([*dgaug, *args, "-o", str(tmp_path / "whole")], env=env, cwd=REPO)
    assert whole.returncode == 0

    cut_dir = tmp_path / "cut"
    proc = subprocess.Popen([*dgaug, *args, "-o", str(cut_dir)], env=env, cwd=REPO)
    deadline = time.time() + 300
    while not list_checkpoints(cut_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (cut_dir / "model.safetensors").exists()
    again = subprocess.run([*dgaug, *args, "-o", str(cut_dir)], env=env, cwd=REPO)
    assert again.returncode == 0
    assert json.loads((cut_dir / "train.json").read_text())["resumed_from"] >= 3
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(cut_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_a_changed_config_is_refused_on_the_same_output(run_out: Path, tmp_path: Path) -> None:
    train(_cfg(run_out, tmp_path / "p", mode="probe", epochs=1))
    with pytest.raises(CheckpointMismatch, match="another training config"):
        train(_cfg(run_out, tmp_path / "p", mode="probe", epochs=1, lr=0.5))
    # Evaluation and checkpoint settings are not part of the training: changing them is a resume.
    again = train(_cfg(run_out, tmp_path / "p", mode="probe", epochs=1, checkpoint_every=9))
    assert again.resumed_from == again.steps


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_unusable_inputs_are_one_line_errors(run_out: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder of shards"):
        train(_cfg(run_out, tmp_path / "x", data={"real": str(tmp_path / "nowhere")}))
    with pytest.raises(DataError, match="train.data.features"):
        train(TrainConfig(mode="probe", output=str(tmp_path / "y")))
    with pytest.raises(ValueError, match="ctx_init"):
        TrainConfig(mode="coop", n_ctx=2, ctx_init="a photo of a")


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_trainer_imports_nothing_from_the_pipeline() -> None:
    code = (
        "import sys, dgaug.trainer.run, dgaug.trainer.evaluate, dgaug.trainer.modes, "
        "dgaug.trainer.prompts; "
        "bad = sorted(m for m in sys.modules if m.startswith('dgaug.pipeline')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_dgaug_train_from_a_manifest_prints_the_table(run_out: Path, tmp_path: Path) -> None:
    manifest = yaml_manifest(run_out, tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "dgaug.cli.app", "train", str(manifest)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode == 0, out.stderr
    assert "| photo (train) |" in out.stdout and "**held-out mean**" in out.stdout
    assert (run_out / "train" / "probe" / "eval.json").exists()  # OUTPUT/train/<mode>
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "dgaug.cli.app",
            "train",
            str(manifest),
            "--set",
            "train.lr=-1",
            "--set",
            "train.mode=nope",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2
    assert "train.lr" in bad.stderr and "train.mode" in bad.stderr
    assert "Traceback" not in bad.stderr


def yaml_manifest(run_out: Path, tmp_path: Path) -> Path:
    import yaml

    d = yaml.safe_load((run_out / "_dgaug" / "manifest.yaml").read_text())
    d["train"] = {
        "mode": "probe",
        "model": "tiny-random",
        "device": "cpu",
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.01,
        "data": {"domains": ["photo"]},
        "eval": {"path": str(run_out / "eval" / "images")},
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_an_undecodable_image_costs_only_itself(tmp_path: Path) -> None:
    from PIL import Image

    from dgaug.models.clip import load_clip
    from dgaug.trainer.data import ImageRef, Pair
    from dgaug.trainer.evaluate import embed_eval_set
    from dgaug.trainer.modes import ClipTask

    pairs = []
    for i in range(8):
        path = tmp_path / f"{i}.jpg"
        if i == 3:
            path.write_bytes(b"<html>not an image</html>")
        else:
            Image.new("RGB", (40, 40), (30 * i, 10, 200 - 20 * i)).save(path)
        pairs.append(Pair(str(i), f"caption {i}", ImageRef(str(path)), "cat", "photo"))
    clip = load_clip("tiny-random", device="cpu")
    task = ClipTask(clip, pairs, [], batch_size=8, edsam_ratio=0, seed=0, decode_threads=2)
    try:
        assert torch.isfinite(task.loss(0, 0))
        assert task.skipped == {"undecodable_image": 1}
    finally:
        task.close()
    data = embed_eval_set(clip, pairs, batch_size=4, threads=2)
    assert [p.key for p in data.pairs] == ["0", "1", "2", "4", "5", "6", "7"]
    assert data.images.shape[0] == 7 and data.skipped == {"undecodable_image": 1}
