"""open_clip's own training loader reads dgaug's real and ED-SAM shards, every sample, as they are."""

from __future__ import annotations

import json
import tarfile
from argparse import Namespace
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dgaug.pipeline.manifest import validate
from dgaug.pipeline.run import run_pipeline
from tests.helpers import tiny_manifest_dict

EDSAM = {"model": "tiny-random", "device": "cpu", "samples_per_image": 2, "steps": 2}


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("oc") / "out"
    d = tiny_manifest_dict(out)
    d["stages"]["edsam"] = {**EDSAM, "image_size": 32}
    assert run_pipeline(validate(d)).ok
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


@pytest.mark.parametrize("folder", ["real", "edsam"])
def test_open_clip_train_loader_gets_every_sample(output: Path, folder: str) -> None:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    sizes = json.loads((output / folder / "sizes.json").read_text())
    n_shards = len(sizes)
    args = Namespace(
        train_data=str(output / folder / f"{{00000..{n_shards - 1:05d}}}.tar"),
        train_num_samples=None,  # open_clip reads sizes.json beside the first shard
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        seed=0,
        batch_size=1,
        workers=0,
        world_size=1,
    )
    tokenizer = open_clip.get_tokenizer("RN50")

    def to_tensor(im) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im).copy())

    info = get_wds_dataset(args, to_tensor, is_train=True, tokenizer=tokenizer)
    expected = _captions(output / folder)
    assert info.dataloader.num_samples == sum(sizes.values()) == sum(expected.values())

    seen: Counter[tuple[int, ...]] = Counter()
    for images, texts in info.dataloader:
        assert images.shape == (1, 32, 32, 3)
        seen[tuple(texts[0].tolist())] += 1
    # One epoch is every sample once: the same captions (as tokens), as many times each.
    want = Counter(tuple(tokenizer([c])[0].tolist()) for c in expected.elements())
    assert seen == want
