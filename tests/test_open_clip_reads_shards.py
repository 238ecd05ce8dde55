"""open_clip's own training loader reads dgaug's real and ED-SAM shards, every sample, as they are,
and its trainer trains on both joined through the mix/ view with no sample count given."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from argparse import Namespace
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dgaug.core.storage import Storage
from dgaug.job.manifest import Manifest, validate
from dgaug.job.run import run_pipeline
from dgaug.pipeline.mix import write_mix
from tests.helpers import tiny_manifest_dict

pytestmark = pytest.mark.slow  # open_clip reading and training on whole pipeline outputs: e2e tier

EDSAM = {"model": "tiny-random", "device": "cpu", "samples_per_image": 2, "steps": 2}


def _manifest(out: Path) -> Manifest:
    d = tiny_manifest_dict(out)
    d["stages"]["edsam"] = {**EDSAM, "image_size": 32}
    return validate(d)


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("oc") / "out"
    assert run_pipeline(_manifest(out)).ok
    return out


def _captions(folder: Path) -> Counter[str]:
    """Every txt member of the folder's shards, read with tarfile (no webdataset involved)."""
    out: Counter[str] = Counter()
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".txt"):
                    out[tf.extractfile(m).read().decode()] += 1
    return out


def _captions_of(*folders: Path) -> Counter[str]:
    return sum((_captions(f) for f in folders), Counter())


def _shards(folder: Path, prefix: str = "") -> str:
    """Brace pattern of the folder's shards named `{prefix}NNNNN.tar` ({00000..0000N})."""
    sizes = json.loads((folder / "sizes.json").read_text())
    n = sum(1 for name in sizes if name.startswith(prefix))
    return str(folder / f"{prefix}{{00000..{n - 1:05d}}}.tar")


def _mix_train_data(output: Path) -> str:
    """Real and ED-SAM shards joined with `::` through mix/, as the README says to train."""
    return f"{_shards(output / 'mix', 'real-')}::{_shards(output / 'mix', 'edsam-')}"


def _tokenizer():
    import open_clip

    return open_clip.get_tokenizer("RN50")


def _one_epoch(train_data: str) -> tuple[int, Counter[tuple[int, ...]]]:
    """open_clip's own train loader on `train_data` without --train-num-samples: the sample count
    it derives from sizes.json, and the captions (as tokens) of one epoch."""
    from open_clip_train.data import get_wds_dataset

    args = Namespace(
        train_data=train_data,
        train_num_samples=None,  # open_clip reads sizes.json beside the first shard
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        seed=0,
        batch_size=1,  # no rounding of the epoch to whole batches
        workers=0,
        world_size=1,
    )

    def to_tensor(im) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im).copy())

    info = get_wds_dataset(args, to_tensor, is_train=True, tokenizer=_tokenizer())
    seen: Counter[tuple[int, ...]] = Counter()
    for images, texts in info.dataloader:
        assert images.shape == (1, 32, 32, 3)
        seen[tuple(texts[0].tolist())] += 1
    return info.dataloader.num_samples, seen


def _tokens(captions: Counter[str]) -> Counter[tuple[int, ...]]:
    """Captions as the loader yields them: tokenized, so they compare with what it saw."""
    tokenizer = _tokenizer()
    return Counter(tuple(tokenizer([c])[0].tolist()) for c in captions.elements())


def _sizes_total(*folders: Path) -> int:
    return sum(sum(json.loads((f / "sizes.json").read_text()).values()) for f in folders)


@pytest.mark.parametrize("folder", ["real", "edsam"])
def test_open_clip_train_loader_gets_every_sample(output: Path, folder: str) -> None:
    num_samples, seen = _one_epoch(_shards(output / folder))
    expected = _captions(output / folder)
    assert num_samples == _sizes_total(output / folder) == sum(expected.values())
    # One epoch is every sample once: the same captions (as tokens), as many times each.
    assert seen == _tokens(expected)


def test_stage_folders_joined_directly_are_miscounted(output: Path) -> None:
    # Why mix/ exists: open_clip looks edsam's 00000.tar up in real/sizes.json by base name.
    from open_clip_train.data import get_dataset_size

    joined = f"{_shards(output / 'real')}::{_shards(output / 'edsam')}"
    total, _ = get_dataset_size(joined)
    assert total != _sizes_total(output / "real", output / "edsam")


def test_open_clip_train_loader_gets_every_sample_of_the_mix(output: Path) -> None:
    num_samples, seen = _one_epoch(_mix_train_data(output))
    real, edsam = output / "real", output / "edsam"
    expected = _captions_of(real, edsam)
    assert num_samples == _sizes_total(real, edsam) == sum(expected.values())
    assert seen == _tokens(expected)


# A tiny CLIP that open_clip builds from this config through its `local-dir:` schema (random
# weights, none read). A built-in one (ViT-S-32 at 32 px) trains as well, but takes about a minute
# on 2 cores and writes a 750 MB checkpoint; this one writes 40 MB.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
BATCH = 8


def _train(train_data: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """open_clip's trainer for one epoch on CPU, as a user runs it: no --train-num-samples."""
    model = tmp_path / "tiny-clip"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    cmd = [
        sys.executable, "-m", "open_clip_train.main",
        "--dataset-type", "webdataset", "--train-data", train_data,
        "--model", f"local-dir:{model}", "--precision", "fp32",
        "--batch-size", str(BATCH), "--epochs", "1", "--workers", "1",
        "--lr", "1e-4", "--warmup", "1", "--log-every-n-steps", "1",
        "--logs", str(tmp_path / "logs"), "--name", "t", "--save-frequency", "1",
        "--report-to", "",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    # The timeout only keeps a hung trainer from hanging the suite.
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_open_clip_trains_on_the_mix_without_a_sample_count(output: Path, tmp_path: Path) -> None:
    total = _sizes_total(output / "real", output / "edsam")
    # open_clip rounds an epoch up to whole batches; a multiple keeps its count exactly the total.
    assert total % BATCH == 0
    proc = _train(_mix_train_data(output), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = tmp_path / "logs" / "t"
    checkpoint = run / "checkpoints" / "epoch_1.pt"
    assert checkpoint.is_file()
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 1
    # "Train Epoch: 0 [ 8/72 (11%)] ...": samples so far / samples of the epoch, every step.
    progress = re.findall(r"Train Epoch: 0 \[\s*(\d+)/(\d+)", (run / "out.log").read_text())
    assert {int(per_epoch) for _, per_epoch in progress} == {total}
    assert [int(done) for done, _ in progress] == list(range(BATCH, total + 1, BATCH))


def _view(mix: Path) -> dict[str, str]:
    """mix/ as it stands: each link's target, and sizes.json's text."""
    view = {p.name: os.readlink(p) for p in mix.iterdir() if p.is_symlink()}
    return {**view, "sizes.json": (mix / "sizes.json").read_text()}


def test_mix_view_links_every_committed_shard(output: Path) -> None:
    mix = output / "mix"
    want = {
        f"{stage}-{shard}": n
        for stage in ("real", "edsam")
        for shard, n in json.loads((output / stage / "sizes.json").read_text()).items()
    }
    assert json.loads((mix / "sizes.json").read_text()) == want
    view = _view(mix)
    assert view.pop("sizes.json") and set(view) == set(want)
    # Relative links into the stage folders: no tar data copied, the folder moves as a whole.
    assert view["real-00000.tar"] == "../real/00000.tar"
    assert view["edsam-00002.tar"] == "../edsam/00002.tar"
    assert all((mix / name).resolve().is_file() for name in view)


def test_mix_view_is_idempotent_and_repaired_on_rerun(output: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(output, out, symlinks=True)
    mix = out / "mix"
    before = _view(mix)

    assert run_pipeline(_manifest(out)).ok  # everything committed: only sizes and the view
    assert _view(mix) == before

    (mix / "real-00099.tar").symlink_to("../real/00099.tar")  # a shard that is not committed
    (mix / "real-00000.tar").unlink()
    (mix / "real-00000.tar").symlink_to("../edsam/00000.tar")  # a link to the wrong shard
    assert run_pipeline(_manifest(out)).ok
    assert _view(mix) == before


def test_mix_view_is_skipped_off_local_disk(caplog: pytest.LogCaptureFixture) -> None:
    # Object stores have no symlinks; copying tars there would double the data.
    storage = Storage("memory://dgaug-mix-test")
    with caplog.at_level(logging.INFO, logger="dgaug.pipeline.mix"):
        assert write_mix(storage, {"real": {"00000.tar": 8}}) is None
    assert not storage.list("mix")
    assert "no mix/ view" in caplog.text


def test_the_run_prints_open_clips_train_data_for_the_mix() -> None:
    from dgaug.pipeline.mix import train_data_pattern

    names = [f"real-0000{i}.tar" for i in range(3)] + ["edsam-00000.tar", "edsam-00002.tar"]
    # A folder with a gap (a failed shard) lists its shards one by one; real comes first.
    assert train_data_pattern("o", names, ["real", "edsam"]) == (
        "o/mix/real-{00000..00002}.tar::o/mix/edsam-00000.tar::o/mix/edsam-00002.tar"
    )
    assert train_data_pattern("o", ["real-00004.tar"], ["real", "edsam"]) == "o/mix/real-00004.tar"
