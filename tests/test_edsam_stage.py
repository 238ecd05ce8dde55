"""The edsam stage on tiny-random models: outputs, baselines, worst-case choice, skips, determinism."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dgaug.core.storage import Storage
from dgaug.job.manifest import validate
from dgaug.job.run import run_pipeline
from dgaug.models.errors import ModelError
from dgaug.pipeline.stage import ShardTask, StageContext
from dgaug.stages.download.merge import write_deterministic_tar
from dgaug.stages.edsam.stage import EdsamStage
from tests.helpers import tiny_manifest_dict

# Small enough for CPU: 16 px images (8x8 latents), 2 samples each, 2 DDIM steps, guidance on.
TINY: dict[str, Any] = {
    "model": "tiny-random",
    "reference_clip": "tiny-random",
    "device": "cpu",
    "samples_per_image": 2,
    "steps": 2,
    "image_size": 16,
    "score_size": 16,
    "batch_size": 4,
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
JSON_FIELDS = {
    "source_key",
    "sample_index",
    "seed",
    "rho",
    "alpha",
    "start_step",
    "objective",
    "model",
    "reference_clip",
    "tiny_random",
    "sampler",
    "steps",
    "guidance",
}


def _jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size + 8, 3)) * 255).astype(np.uint8)  # not square: crop is tested
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shard(
    path: Path,
    shard: int,
    n: int,
    *,
    garbage: tuple[int, ...] = (),
    no_caption: tuple[int, ...] = (),
) -> dict[str, bytes]:
    """A shard in dgaug's real/ layout; returns each key's caption (txt) bytes."""
    samples, captions = [], {}
    for i in range(n):
        key = f"{shard:05d}{i:05d}"
        label = SHAPES[(shard + i) % len(SHAPES)]
        txt = b"" if i in no_caption else f"a drawing of a {label}, number {i}".encode()
        img = b"\xff\xd8 not a jpeg at all" if i in garbage else _jpeg(100 * shard + i)
        meta = {"key": key, "label": label, "domain": "photo", "caption": txt.decode()}
        samples.append((key, {"jpg": img, "txt": txt, "json": json.dumps(meta).encode()}))
        captions[key] = txt
    path.parent.mkdir(parents=True, exist_ok=True)
    write_deterministic_tar(str(path), samples)
    return captions


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("real") / "00000.tar"
    write_shard(path, 0, 3)
    return path


def run_stage(tmp: Path, shard: Path, name: str, seed: int = 0, **edsam: Any):
    """EdsamStage as a plain object on one shard: setup, process, teardown. (result, samples)."""
    m = validate(tiny_manifest_dict(tmp / name, seed=seed, stages={"edsam": {**TINY, **edsam}}))
    stage = EdsamStage(m)
    ctx = StageContext(m, Storage(m.output))
    out = tmp / name / "scratch"
    out.mkdir(parents=True)
    task = ShardTask("edsam", 0, inputs=(str(shard),), outputs=("00000.tar",), tmp_dir=str(out))
    stage.setup(ctx)
    try:
        result = stage.process(task, ctx)
    finally:
        stage.teardown()
    return result, read(out / "00000.tar")


def read(tar: Path) -> list[dict[str, Any]]:
    return list(wds.WebDataset(str(tar), shardshuffle=False))


def alphas(samples: list[dict[str, Any]]) -> list[float]:
    """Every number a sample's json says α took (scalar, per channel, or element min/max)."""
    out: list[float] = []
    for s in samples:
        a = json.loads(s["json"])["alpha"]
        out += [a] if isinstance(a, float) else a if isinstance(a, list) else [a["min"], a["max"]]
    return out


def _side(sample: dict[str, Any]) -> tuple[int, int]:
    return Image.open(io.BytesIO(sample["jpg"])).size


def test_samples_are_written_at_the_sources_size_unless_output_size_says(
    tmp_path: Path, shard: Path
) -> None:
    # Sources are 32x24 (short side 24); generation runs at image_size 16.
    result, samples = run_stage(tmp_path, shard, "default")
    assert {_side(s) for s in samples} == {(24, 24)}
    info = result.info
    assert info["bytes_per_sample"] == pytest.approx(
        sum(len(s["jpg"]) for s in samples) / len(samples), abs=0.1
    )
    src = read(shard)
    assert info["source_bytes_per_image"] == pytest.approx(
        sum(len(s["jpg"]) for s in src) / len(src), abs=0.1
    )
    result, small = run_stage(tmp_path, shard, "small", output_size=16, jpeg_quality=50)
    assert {_side(s) for s in small} == {(16, 16)}
    assert result.info["bytes_per_sample"] < info["bytes_per_sample"]


def test_sources_upscaled_beyond_1_25x_are_counted_and_warned_once(
    tmp_path: Path, shard: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Short side 24 to image_size 32: 1.33x, beyond the 1.25x a picture survives unblurred.
    with caplog.at_level("WARNING"):
        result, _ = run_stage(tmp_path, shard, "up", image_size=32)
    assert result.counts["upscaled_sources"] == 3
    warned = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(warned) == 1 and "stages.download.image_size >= 26" in warned[0]
    result, _ = run_stage(tmp_path, shard, "ok", image_size=24)
    assert result.counts["upscaled_sources"] == 0


def test_outputs_keys_captions_and_records(tmp_path: Path, shard: Path) -> None:
    result, samples = run_stage(tmp_path, shard, "a", samples_per_image=3)
    assert result.samples == 9
    assert result.counts == {"sources": 3, "skipped_sources": 0, "upscaled_sources": 0}
    assert [s["__key__"] for s in samples] == [
        f"00000{i:05d}_{j}" for i in range(3) for j in range(3)
    ]
    src = {s["__key__"]: s for s in read(shard)}
    for s in samples:
        meta = json.loads(s["json"])
        assert set(meta) >= JSON_FIELDS
        assert s["txt"] == src[meta["source_key"]]["txt"], "the caption is kept byte for byte"
        assert meta["label"] == json.loads(src[meta["source_key"]]["json"])["label"]
        assert meta["domain"] == "photo" and meta["tiny_random"] is True
        assert meta["objective"] == "random" and meta["start"] == "inverted"
        assert meta["start_step"] == 999  # the default reading: denoise from pure noise level
        assert meta["reference_clip"] is None and abs(meta["alpha"]) <= 0.5
        assert Image.open(io.BytesIO(s["jpg"])).size == (24, 24)  # the source's short side
    assert len({s["jpg"] for s in samples}) == 9, "each sample has its own draws"


@pytest.mark.parametrize("start", ["inverted", "latent"])
def test_rho_zero_equals_the_none_baseline(tmp_path: Path, shard: Path, start: str) -> None:
    _, zero = run_stage(tmp_path, shard, "zero", rho=0.0, start=start)
    _, none = run_stage(tmp_path, shard, "none", objective="none", start=start)
    _, half = run_stage(tmp_path, shard, "half", rho=0.5, start=start)
    assert [s["jpg"] for s in zero] == [s["jpg"] for s in none]
    assert all(a == 0 for a in alphas(zero) + alphas(none))
    assert [s["jpg"] for s in half] != [s["jpg"] for s in none]


@pytest.mark.slow  # five stage runs per sampler
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "lcm"])
def test_every_sampler_keeps_the_transport_invariants(
    tmp_path: Path, shard: Path, sampler: str
) -> None:
    """|alpha| <= rho, rho = 0 equals `none`, the same seed gives the same bytes (lcm draws its
    noise from each sample's seed), and the sampler changes the pixels."""
    _, zero = run_stage(tmp_path, shard, "zero", rho=0.0, sampler=sampler)
    _, none = run_stage(tmp_path, shard, "none", objective="none", sampler=sampler)
    assert [s["jpg"] for s in zero] == [s["jpg"] for s in none]
    _, a = run_stage(tmp_path, shard, "a", rho=0.4, sampler=sampler)
    _, b = run_stage(tmp_path, shard, "b", rho=0.4, sampler=sampler)
    assert [s["jpg"] for s in a] == [s["jpg"] for s in b]
    assert all(abs(x) <= 0.4 for x in alphas(a))
    assert all(json.loads(s["json"])["sampler"] == sampler for s in a)
    _, ddim = run_stage(tmp_path, shard, "ddim", rho=0.4)
    assert [s["jpg"] for s in a] != [s["jpg"] for s in ddim]


def test_a_tiny_decoder_from_a_folder_decodes_the_samples(tmp_path: Path, shard: Path) -> None:
    """decoder: tiny loads an AutoencoderTiny saved in diffusers' layout by path, decodes every
    sample with it (other pixels than the VAE's, the same size) and says so in the record; a
    decoder for other latents is refused in one line."""
    from diffusers import AutoencoderTiny

    from dgaug.models.ldm_addons import _tiny_random_decoder

    folder = tmp_path / "taesd"
    _tiny_random_decoder(4, 2, seed=1).save_pretrained(folder)
    _, tiny = run_stage(tmp_path, shard, "tiny", decoder="tiny", tiny_decoder=str(folder))
    _, vae = run_stage(tmp_path, shard, "vae")
    assert [json.loads(s["json"])["decoder"] for s in tiny] == [f"tiny:{folder}"] * len(tiny)
    assert [s["jpg"] for s in tiny] != [s["jpg"] for s in vae]
    sizes = {Image.open(io.BytesIO(s["jpg"])).size for s in tiny + vae}
    assert len(sizes) == 1

    wrong = tmp_path / "taesd-8ch"
    AutoencoderTiny(
        latent_channels=8,
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
    ).save_pretrained(wrong)
    with pytest.raises(ModelError, match="8-channel latents .* 4-channel"):
        run_stage(tmp_path, shard, "wrong", decoder="tiny", tiny_decoder=str(wrong))
    with pytest.raises(Exception, match="decoder tiny needs tiny_decoder"):
        run_stage(tmp_path, shard, "none", decoder="tiny")


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path, shard: Path) -> None:
    r1, a = run_stage(tmp_path, shard, "one")
    r2, b = run_stage(tmp_path, shard, "two")
    assert (tmp_path / "one/scratch/00000.tar").read_bytes() == (
        tmp_path / "two/scratch/00000.tar"
    ).read_bytes()
    _, c = run_stage(tmp_path, shard, "three", seed=1)
    assert [s["jpg"] for s in c] != [s["jpg"] for s in a]


def test_worst_keeps_the_highest_scoring_candidate(tmp_path: Path, shard: Path) -> None:
    _, samples = run_stage(
        tmp_path, shard, "worst", objective="worst", candidates=3, refine_steps=2, rho=0.5
    )
    refined = 0
    for s in samples:
        meta = json.loads(s["json"])
        scores, k = meta["candidate_scores"], meta["chosen_candidate"]
        assert len(scores) == 3 and k == int(np.argmax(scores))
        assert meta["reference_loss_kind"] == "infonce"  # 3 captions in the batch
        # Never below the first candidate, which is what `random` keeps from the same draws.
        assert scores[k] >= scores[0] and meta["reference_loss"] >= scores[k]
        if meta["refined"]:
            refined += 1
            assert meta["reference_loss"] > scores[k]
        else:
            assert meta["reference_loss"] == scores[k]
        assert meta["reference_clip"] == "tiny-random"
    assert all(abs(a) <= 0.5 for a in alphas(samples))


def test_random_uses_the_first_of_the_candidates_worst_draws() -> None:
    from dgaug.models.ldm import load_ldm
    from dgaug.stages.edsam.config import EdsamConfig
    from dgaug.stages.edsam.sampler import EdsamSampler

    ldm = load_ldm("tiny-random", device="cpu")
    rnd = EdsamSampler(ldm, EdsamConfig(**TINY), seed=3)._draw("0000000001", 0, 1, (4, 8, 8))
    worst_cfg = EdsamConfig(**{**TINY, "objective": "worst", "candidates": 4})
    worst = EdsamSampler(ldm, worst_cfg, seed=3, clip=object())._draw("0000000001", 0, 1, (4, 8, 8))
    assert torch.equal(rnd.eps, worst.eps) and len(worst.candidates) == 4
    assert torch.equal(rnd.candidates[0], worst.candidates[0])


@pytest.mark.parametrize(("start", "kind"), [("inverted", "channel"), ("latent", "element")])
def test_inverted_start_and_alpha_shapes(tmp_path: Path, shard: Path, start: str, kind: str):
    rho = 0.3
    _, samples = run_stage(tmp_path, shard, f"{start}-{kind}", start=start, alpha=kind, rho=rho)
    assert len(samples) == 6
    metas = [json.loads(s["json"]) for s in samples]
    assert all(m["start_step"] == (999 if start == "inverted" else 354) for m in metas)
    if kind == "channel":
        assert all(isinstance(m["alpha"], list) and len(m["alpha"]) == 4 for m in metas)
    else:
        assert all(set(m["alpha"]) == {"mean", "min", "max"} for m in metas)
    assert all(abs(a) <= rho for a in alphas(samples))


def test_each_source_is_encoded_once_for_its_samples(
    tmp_path: Path, shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dgaug.models.ldm import LatentDiffusion

    images, texts = [], []
    enc_i, enc_t = LatentDiffusion.encode_images, LatentDiffusion.encode_text
    monkeypatch.setattr(
        LatentDiffusion, "encode_images", lambda s, x: images.append(len(x)) or enc_i(s, x)
    )
    monkeypatch.setattr(LatentDiffusion, "encode_text", lambda s, c: texts.extend(c) or enc_t(s, c))
    result, _ = run_stage(tmp_path, shard, "count", samples_per_image=5, batch_size=2)
    assert result.samples == 15
    assert sum(images) == 3, "one VAE encode per source image, not per sample"
    assert sorted(texts) == sorted(["", *(s["txt"].decode() for s in read(shard))])


def test_bad_sources_are_skipped_and_counted(tmp_path: Path) -> None:
    bad = tmp_path / "bad/00000.tar"
    write_shard(bad, 0, 4, garbage=(1,), no_caption=(3,))
    result, samples = run_stage(tmp_path, bad, "skips")
    assert result.failures == {"undecodable_image": 1, "missing_caption": 1}
    assert result.counts == {"sources": 2, "skipped_sources": 2, "upscaled_sources": 0}
    assert result.samples == 4
    assert sorted({json.loads(s["json"])["source_key"] for s in samples}) == [
        "0000000000",
        "0000000002",
    ]


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_pipeline_shards_resume_and_rerun_byte_identical(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_shard(src / "a.tar", 0, 4, garbage=(2,))
    write_shard(src / "b.tar", 1, 3)
    out = tmp_path / "out"
    d = tiny_manifest_dict(
        out,
        source={"kind": "shards", "path": str(src / "{a,b}.tar")},
        stages={"download": {}, "edsam": TINY},
    )
    m = validate(d)
    s = run_pipeline(m)
    assert s.ok, s.stages
    ed = s.stages["edsam"]
    assert (ed.done, ed.samples, ed.failures) == (2, 12, {"undecodable_image": 1})
    marker = json.loads((out / "edsam/_state/00000.json").read_text())
    assert marker["failures"] == {"undecodable_image": 1}
    assert marker["counts"] == {"sources": 3, "skipped_sources": 1, "upscaled_sources": 0}
    assert json.loads((out / "edsam/sizes.json").read_text()) == {"00000.tar": 6, "00001.tar": 6}

    urls = [str(out / "edsam" / f"{i:05d}.tar") for i in range(2)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    real = {
        s["__key__"]: s
        for s in wds.WebDataset(
            [str(out / "real" / f"{i:05d}.tar") for i in range(2)], shardshuffle=False
        )
    }
    assert len(samples) == 12
    for smp in samples:
        meta = json.loads(smp["json"])
        assert smp["__key__"] == f"{meta['source_key']}_{meta['sample_index']}"
        assert "." not in smp["__key__"]
        assert smp["txt"] == real[meta["source_key"]]["txt"]
    tars = {p.name: p.read_bytes() for p in (out / "edsam").glob("*.tar")}

    again = run_pipeline(m)  # resume: everything is committed, nothing is redone
    assert (again.stages["edsam"].skipped, again.stages["edsam"].done) == (2, 0)
    assert {p.name: p.read_bytes() for p in (out / "edsam").glob("*.tar")} == tars

    shutil.move(out, tmp_path / "first")  # same path, from scratch: the same bytes
    assert run_pipeline(m).ok
    assert {p.name: p.read_bytes() for p in (out / "edsam").glob("*.tar")} == tars


def test_manifest_section_is_optional_and_validated(tmp_path: Path) -> None:
    from dgaug.job.graph import enabled_stage_names
    from dgaug.job.manifest import ManifestError

    assert enabled_stage_names(validate(tiny_manifest_dict(tmp_path))) == ["download"]
    d = tiny_manifest_dict(tmp_path, stages={"edsam": {"rho": -1, "alpha": "pixel"}})
    with pytest.raises(ManifestError) as exc:
        validate(d)
    assert any(p.startswith("stages.edsam.rho:") for p in exc.value.problems)
    assert any(p.startswith("stages.edsam.alpha:") for p in exc.value.problems)
    off = validate(tiny_manifest_dict(tmp_path, stages={"edsam": {"enabled": False}}))
    assert enabled_stage_names(off) == ["download"]
    stage = EdsamStage(validate(tiny_manifest_dict(tmp_path, stages={"edsam": {}})))
    assert stage.resources().num_gpus == 1 and stage.config.samples_per_image == 10
    tiny = EdsamStage(validate(tiny_manifest_dict(tmp_path, stages={"edsam": TINY})))
    assert tiny.resources().num_gpus == 0


def test_a_full_size_model_on_cpu_is_refused_in_one_line(tmp_path: Path) -> None:
    from dgaug.models.errors import ModelError

    m = validate(tiny_manifest_dict(tmp_path, stages={"edsam": {"device": "cpu"}}))
    with pytest.raises(ModelError, match="allow_cpu"):
        EdsamStage(m).setup(StageContext(m, Storage(m.output)))


def test_resources_default_to_one_worker_per_gpu_and_merge_with_the_manifest(
    tmp_path: Path,
) -> None:
    full = EdsamStage(validate(tiny_manifest_dict(tmp_path, stages={"edsam": {}}))).resources()
    assert (full.workers, full.num_gpus, full.num_cpus) == (None, 1, 4)  # null: one per GPU
    d = tiny_manifest_dict(tmp_path, stages={"edsam": {}})
    d["executor"] = {"kind": "ray", "resources": {"edsam": {"workers": 3}}}
    r = EdsamStage(validate(d)).resources()
    # The manifest's count wins; the fields it does not write keep the stage's defaults.
    assert (r.workers, r.num_gpus, r.num_cpus) == (3, 1, 4)


def _letterboxed_by_img2dataset(width: int, height: int, size: int) -> tuple[bytes, dict]:
    """A red width x height picture through img2dataset's own Resizer in `border` mode."""
    from img2dataset.resizer import Resizer

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="JPEG", quality=95)
    img, w, h, ow, oh, err = Resizer(size, "border", False)(io.BytesIO(buf.getvalue()))
    assert err is None and (w, h) == (size, size) and (ow, oh) == (width, height)
    return img, {"original_width": ow, "original_height": oh, "width": w, "height": h}


@pytest.mark.parametrize(("width", "height"), [(96, 32), (32, 96), (70, 64)])
def test_a_letterboxed_source_is_cut_back_to_its_picture(width: int, height: int) -> None:
    from dgaug.stages.edsam.io import to_source_sample

    jpg, meta = _letterboxed_by_img2dataset(width, height, 64)
    members = {"jpg": jpg, "txt": b"a red bar", "json": json.dumps(meta).encode()}
    cut = to_source_sample("k", members, 32, letterboxed=True).pixels
    whole = to_source_sample("k", members, 32, letterboxed=False).pixels
    white = lambda x: (x > 0.9).all(dim=0)  # noqa: E731 - every channel near 255
    assert not white(cut).any(), "no band of the white padding reaches the LDM"
    if max(width, height) / min(width, height) >= 2:
        assert white(whole).float().mean() > 0.2  # center crop alone keeps the bands


def test_the_fingerprint_says_how_sources_are_cut(tmp_path: Path) -> None:
    m = validate(tiny_manifest_dict(tmp_path / "o", stages={"edsam": dict(TINY)}))
    assert EdsamStage(m).fingerprint_config()["source_cut"] == "picture"  # download default: border
    d = tiny_manifest_dict(tmp_path / "o", stages={"edsam": dict(TINY)})
    d["stages"]["download"] = {**d["stages"].get("download", {}), "resize_mode": "center_crop"}
    assert EdsamStage(validate(d)).fingerprint_config()["source_cut"] == "whole"
