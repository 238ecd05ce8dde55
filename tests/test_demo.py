"""The embedded demo end to end: `dgaug run manifests/demo.yaml` offline, then again as a no-op."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from typer.testing import CliRunner, Result

from dgaug.cli.app import app
from tests.helpers import REPO

pytestmark = pytest.mark.slow

DEMO = REPO / "manifests/demo.yaml"


@dataclass
class DemoRun:
    out: Path
    result: Result  # the first `dgaug run`


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One local `dgaug run` of the demo (the costly part: minutes on 2 cores), shared by the
    tests below; each leaves its output folder as the run left it, apart from train/."""
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    r = CliRunner().invoke(app, ["run", str(DEMO), "--set", f"output={out}"])
    return DemoRun(out, r)


def test_demo_runs_end_to_end_then_is_a_no_op(demo_run: DemoRun) -> None:
    out = demo_run.out
    runner = CliRunner()
    r = demo_run.result
    assert r.exit_code == 0, r.output
    assert f"{out}/real/" in r.output, "the demo says where its shards are"
    bill = r.output[r.output.index("the bill") :]  # printed once the run has planned
    assert bill.index("edsam") < bill.index("features") and "GPU-hours: assumed" in bill
    assert f"{out}/edsam/" in r.output
    mix = f"'{out}/mix/real-{{00000..00003}}.tar::{out}/mix/edsam-{{00000..00003}}.tar'"
    assert f"--train-data {mix}" in r.output, "the demo says how open_clip reads every shard"
    paper = "--dataset-resampled --train-data-upsampling-factors '1::0.5' --train-num-samples 384"
    assert f"--train-data {mix} {paper}" in r.output, "and how it draws one ED-SAM per real pair"

    sizes = json.loads((out / "real/sizes.json").read_text())
    assert len(sizes) == 4 and sum(sizes.values()) == 192
    urls = [str(out / "real" / name) for name in sorted(sizes)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 192
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 192 and all(k.isdigit() for k in keys)
    meta = json.loads(samples[0]["json"])
    assert meta["domain"] in {"photo", "sketch", "cartoon", "painting"} and meta["label"]
    assert samples[0]["txt"].decode().strip()

    # ED-SAM: 2 samples per real image, keyed <source key>_<j>, the caption kept, a record each.
    ed_sizes = json.loads((out / "edsam/sizes.json").read_text())
    assert ed_sizes == {name: 2 * n for name, n in sizes.items()}
    ed = list(
        wds.WebDataset([str(out / "edsam" / n) for n in sorted(ed_sizes)], shardshuffle=False)
    )
    assert [s["__key__"] for s in ed] == [f"{k}_{j}" for k in keys for j in (0, 1)]
    captions = {s["__key__"]: s["txt"] for s in samples}
    for s in ed:
        rec = json.loads(s["json"])
        assert s["txt"] == captions[rec["source_key"]]
        assert rec["tiny_random"] is False and rec["model"] == "toy-ldm"
        assert abs(rec["alpha"]) <= rec["rho"] == 0.5 and rec["objective"] == "random"
        assert rec["domain"] in {"photo", "sketch", "cartoon", "painting"} and rec["label"]
        assert s["jpg"][:2] == b"\xff\xd8"

    # Features: one row per real and ED-SAM sample, unit-norm embeddings of the toy CLIP.
    feats = [pq.read_table(p) for p in sorted((out / "features").glob("*.parquet"))]
    assert len(feats) == 4 and sum(t.num_rows for t in feats) == 192 + 384
    assert sorted(feats[0].column("origin").unique().to_pylist()) == ["edsam", "real"]
    # LDFS: one synthetic feature per real sample and target domain, and the mapper.
    ldfs = [pq.read_table(p) for p in sorted((out / "ldfs").glob("*.parquet"))]
    assert len(ldfs) == 4 and sum(t.num_rows for t in ldfs) == 192 * 3
    assert (out / "ldfs/fit/mapper.safetensors").is_file()

    tars = {
        f"{d}/{p.name}": p.read_bytes()
        for d in ("real", "edsam", "features", "ldfs")
        for p in (out / d).glob("0*")
    }
    r = runner.invoke(app, ["run", str(DEMO), "--set", f"output={out}"])
    assert r.exit_code == 0, r.output
    again = {
        f"{d}/{p.name}": p.read_bytes()
        for d in ("real", "edsam", "features", "ldfs")
        for p in (out / d).glob("0*")
    }
    assert again == tars
    r = runner.invoke(app, ["status", str(DEMO), "--set", f"output={out}"])
    assert r.exit_code == 0 and r.output.count("4/4") >= 4, r.output

    # `make demo` ends with the trainer: photo only in training, the other styles held out.
    r = runner.invoke(app, ["train", str(DEMO), "--set", f"output={out}"])
    assert r.exit_code == 0, r.output
    assert "| photo (train) |" in r.output and "| sketch (held out) |" in r.output
    result = json.loads((out / "train/clip/eval.json").read_text())
    assert result["train_domains"] == ["photo"] and result["held_out_mean"]["images"] == 144
    train = json.loads((out / "train/clip/train.json").read_text())
    assert train["losses"][-1] < train["losses"][0]


def test_demo_edsam_samples_are_drawn_from_their_caption_not_copied(demo_run: DemoRun) -> None:
    """What a user reads in the report, measured with the toy CLIP: the demo's samples (start
    inverted) keep their source's shape above chance by nearest centroid (about 0.34; chance 1/6:
    a random LDM gives noise, which scores at chance) and fit their caption (cos about 0.3; noise
    about 0), while they are not copies: far from their source in pixels and in CLIP space. The
    features files' score columns give the same numbers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from PIL import Image

    from dgaug.report.retention import from_table

    out = demo_run.out
    assert demo_run.result.exit_code == 0, demo_run.result.output
    table = pa.concat_tables(
        [pq.read_table(p) for p in sorted((out / "features").glob("*.parquet"))]
    )
    r = from_table(table)
    assert r.classes == 6 and r.real == 192 and r.edsam == 384
    assert r.edsam_accuracy >= 0.25, r
    assert r.edsam_to_caption >= 0.15, r
    assert r.edsam_to_source < 0.9, r  # a copy would be 1.0
    ed = table.filter(pc.equal(table["origin"], "edsam"))
    assert np.mean(ed["caption_score"].to_numpy()) == pytest.approx(r.edsam_to_caption, abs=5e-3)
    assert all(
        json.loads(s["json"])["start"] == "inverted"
        for s in wds.WebDataset(str(out / "edsam/00000.tar"))
    )

    real = {s["__key__"]: s["jpg"] for s in wds.WebDataset(str(out / "real/00000.tar"))}
    diffs = []
    for s in wds.WebDataset(str(out / "edsam/00000.tar")):
        src = json.loads(s["json"])["source_key"]
        a = np.asarray(Image.open(io.BytesIO(real[src])).convert("RGB"), dtype=np.float32)
        b = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.float32)
        diffs.append(np.abs(a - b).mean())
    # JPEG round trips alone differ by about 1-2 grey levels; these are redrawn pictures.
    assert float(np.median(diffs)) > 8.0, diffs

    # At default output settings a sample costs at most 1.5x the bytes of its real source.
    for marker in sorted((out / "edsam/_state").glob("0*.json")):
        info = json.loads(marker.read_text())["info"]
        assert info["bytes_per_sample"] <= 1.5 * info["source_bytes_per_image"], info


@pytest.mark.ray
def test_demo_on_ray_gives_the_same_bytes_as_local(tmp_path: Path, ray_session) -> None:
    """The demo's graph (its toy models, every stage) on the Ray executor writes the same bytes
    as the local one. One shard of it (48 images): the executors meet the same code per shard,
    and a quarter of the demo twice costs half the whole demo once on Ray."""
    out = tmp_path / "demo-output"  # both runs write here: json members may name the path
    one_shard = ["--set", f"output={out}", "--set", "source.num_images=48"]
    files = {}
    for executor in ("local", "ray"):
        shutil.rmtree(out, ignore_errors=True)
        args = ["run", str(DEMO), *one_shard, "--executor", executor]
        if executor == "ray":
            args += ["--set", "executor.resources.download={workers: 2, num_cpus: 0.5}"]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        files[executor] = {
            f"{d}/{p.name}": p.read_bytes()
            for d in ("real", "edsam", "features", "ldfs")
            for p in (out / d).glob("*")
            if p.is_file()
        }
    assert files["ray"] == files["local"]
    assert len([n for n in files["ray"] if n.endswith(".tar")]) == 2
    assert len([n for n in files["ray"] if n.startswith("features/0")]) == 1
