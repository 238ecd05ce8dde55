"""The paper's mix through open_clip's own loader: the arguments dgaug prints draw one ED-SAM
sample per real sample in expectation, where plain `::` pooling draws M of them."""

from __future__ import annotations

import io
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from dgaug.core.storage import Storage
from dgaug.core.tars import write_deterministic_tar
from dgaug.pipeline.mix import balanced_mix_args, write_mix

SHARDS, REAL_PER_SHARD, M = 4, 2, 3


def _output(root: Path) -> dict[str, int]:
    """real/ and edsam/ shards (M samples per real one) and their mix/ view."""
    sizes: dict[str, dict[str, int]] = {"real": {}, "edsam": {}}
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="JPEG")
    image = buf.getvalue()
    for stage, per in (("real", REAL_PER_SHARD), ("edsam", REAL_PER_SHARD * M)):
        (root / stage).mkdir(parents=True)
        for shard in range(SHARDS):
            samples = [
                (f"{shard:05d}{i:05d}", {"jpg": image, "txt": f"{stage} {i}".encode()})
                for i in range(per)
            ]
            write_deterministic_tar(str(root / stage / f"{shard:05d}.tar"), samples)
            sizes[stage][f"{shard:05d}.tar"] = per
    # Stage folders relative to the output, as the pipeline names them: the links are relative.
    mix = write_mix(Storage(str(root)), sizes)
    assert mix is not None
    return mix


def _draw(argv: list[str], samples: int) -> tuple[int, int]:
    """(real, edsam) samples in the batches open_clip's webdataset loader yields."""
    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args

    args = parse_args(argv + ["--batch-size", "20", "--workers", "0", "--seed", "0"])
    args.world_size = 1
    args.train_num_samples = samples  # more than one epoch's worth: a ratio, not a count
    data = get_wds_dataset(
        args,
        lambda image: torch.zeros(1),
        is_train=True,
        tokenizer=lambda text: [torch.tensor(int(str(text).startswith("edsam")))],
    )
    edsam = total = 0
    for _, is_edsam in data.dataloader:
        edsam += int(is_edsam.sum())
        total += len(is_edsam)
    return total - edsam, edsam


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("out")
    return root, _output(root)


def test_the_printed_arguments_give_one_edsam_sample_per_real_one(output) -> None:
    root, mix = output
    printed = balanced_mix_args(str(root), mix, "real", "edsam")
    assert printed is not None
    argv = shlex.split(printed)
    assert argv[argv.index("--train-num-samples") + 1] == str(2 * SHARDS * REAL_PER_SHARD)
    assert argv[argv.index("--train-data-upsampling-factors") + 1] == f"1::{1 / M:.6g}"
    real, edsam = _draw(argv, 3_000)
    # Whole shards are drawn (2 or 6 samples): about 750 draws, so a few % of noise.
    assert 0.8 < edsam / real < 1.25, (real, edsam)


def test_plain_pooling_draws_m_edsam_samples_per_real_one(output) -> None:
    root, mix = output
    printed = balanced_mix_args(str(root), mix, "real", "edsam")
    train_data = shlex.split(printed)[1]
    real, edsam = _draw(["--train-data", train_data, "--dataset-resampled"], 3_000)
    assert 2.3 < edsam / real < 3.9, (real, edsam)  # why the factor is needed


def test_no_mix_without_both_folders() -> None:
    assert balanced_mix_args("/o", {"real-00000.tar": 5}, "real", "edsam") is None
    assert balanced_mix_args("/o", {"edsam-00000.tar": 5}, "real", "edsam") is None
