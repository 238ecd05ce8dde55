"""The README documents what the code does: its first lines, and every manifest field."""

from __future__ import annotations

import math
import re
import shlex

import yaml
from braceexpand import braceexpand
from pydantic import BaseModel

from dgaug.job.dg_config import DgConfig
from dgaug.job.manifest import (
    ExecutorConfig,
    ImageFolderSource,
    Manifest,
    ShardsSource,
    StageResources,
    SyntheticSource,
    UrlListSource,
)
from dgaug.stages.download.config import DownloadConfig
from dgaug.stages.edsam.config import EdsamConfig
from dgaug.stages.features.config import FeaturesConfig
from dgaug.stages.ldfs.config import LdfsConfig
from dgaug.trainer.config import EvalConfig, TrainConfig, TrainData
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    head = "\n".join(README.splitlines()[:12])
    assert "make demo" in head and "make test" in head


def test_every_manifest_field_is_documented() -> None:
    models: list[type[BaseModel]] = [
        Manifest,
        UrlListSource,
        ImageFolderSource,
        ShardsSource,
        SyntheticSource,
        ExecutorConfig,
        StageResources,
        DownloadConfig,
        EdsamConfig,
        FeaturesConfig,
        LdfsConfig,
        TrainConfig,
        TrainData,
        EvalConfig,
        DgConfig,
    ]
    missing = [
        f"{m.__name__}.{name}"
        for m in models
        for name in m.model_fields
        if f"`{name}`" not in README and f"{name}:" not in README
    ]
    assert not missing, f"README's manifest reference lacks {missing}"


def _bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash blocks, line continuations joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [b.replace("\\\n", " ") for b in blocks]


def _demo_shards() -> int:
    """Shards per stage in the demo: one edsam shard per real shard, and the real shards hold
    `shard_size` images each."""
    demo = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text())
    return math.ceil(demo["source"]["num_images"] / demo["shard_size"])


def test_readme_open_clip_command_trains_on_real_and_edsam_through_mix() -> None:
    from open_clip_train.params import parse_args

    commands = [
        shlex.split(line)
        for block in _bash_blocks(README)
        for line in block.splitlines()
        if "open_clip_train.main" in line and "demo-output/mix/" in line
    ]
    assert len(commands) == 1, "README should give one open_clip command on demo-output/mix/"
    argv = commands[0]
    assert argv[:3] == ["python", "-m", "open_clip_train.main"]
    # open_clip's own parser: every flag exists and means what the README says.
    args = parse_args(argv[3:])
    assert args.dataset_type == "webdataset"
    # The paper's 1:1 mix, as `dgaug run` prints it for the demo (192 real, 384 ED-SAM samples).
    from dgaug.pipeline.mix import balanced_mix_args

    sizes = {f"real-{i:05d}.tar": 48 for i in range(4)} | {
        f"edsam-{i:05d}.tar": 96 for i in range(4)
    }
    printed = shlex.split(balanced_mix_args("demo-output", sizes, "real", "edsam"))
    for i, flag in enumerate(printed):
        if flag.startswith("--") and flag != "--dataset-resampled":
            assert argv[argv.index(flag) + 1] == printed[i + 1], flag
    assert args.dataset_resampled and args.train_num_samples == 384
    assert args.train_data_upsampling_factors == "1::0.5"
    parts = args.train_data.split("::")
    assert len(parts) == 2 and all(p.startswith("demo-output/mix/") for p in parts)
    want = _demo_shards()
    assert want == 4
    for part, stage in zip(parts, ["real", "edsam"], strict=True):
        names = [n.removeprefix("demo-output/mix/") for n in braceexpand(part)]
        assert names == [f"{stage}-{i:05d}.tar" for i in range(want)]


CLUSTER_DOC = (REPO / "docs" / "cluster.md").read_text()


def test_cluster_walkthrough_manifest_is_valid_and_asks_for_gpus() -> None:
    from dgaug.job.manifest import validate

    blocks = re.findall(r"```yaml\n(.*?)```", CLUSTER_DOC, flags=re.S)
    manifests = [yaml.safe_load(b) for b in blocks if b.lstrip().startswith("name:")]
    assert len(manifests) == 1
    m = validate(manifests[0])
    assert m.output.startswith("s3://") and m.executor.kind == "ray"
    assert m.executor.address == "auto"
    edsam = m.resources_for("edsam", StageResources(workers=1, num_cpus=1, num_gpus=0))
    assert edsam.num_gpus == 1 and edsam.workers is None


def test_cluster_walkthrough_names_only_real_commands_and_options() -> None:
    from typer.main import get_command

    from dgaug.cli.app import app

    commands = get_command(app).commands  # type: ignore[attr-defined]
    used = re.findall(r"\bdgaug (run|status|validate|plan|train|report|[a-z]+)\b", CLUSTER_DOC)
    named = {u for u in used if u in {"run", "status", "validate", "plan", "train", "report"}}
    assert {"run", "status"} <= named
    assert named <= set(commands), named - set(commands)
    # The head-node pin the page recommends is a valid resources entry.
    pin = re.search(r"`download: (\{custom: .*?\})`", CLUSTER_DOC)
    assert pin is not None
    ExecutorConfig.model_validate({"resources": {"download": yaml.safe_load(pin.group(1))}})
