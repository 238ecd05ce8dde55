"""CoCoOp (meta-net shift of the prompt context) and the real : synthetic weight of the feature modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dgaug.models.clip import load_clip
from dgaug.trainer.cocoop import ConditionalPromptLearner
from dgaug.trainer.config import TrainConfig
from dgaug.trainer.data import FeatureSet
from dgaug.trainer.modes import ProbeTask, weighted_cross_entropy
from dgaug.trainer.prompts import PromptLearner

CLASSES = ["golden retriever", "tabby cat", "airliner"]


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny-random", device="cpu")


def test_the_meta_net_shift_reaches_the_prompts_and_gets_gradients(clip):
    learner = ConditionalPromptLearner(
        clip.model, clip.tokenizer, CLASSES, image_dim=clip.embed_dim, init=None, seed=1
    )
    names = [n for n, _ in learner.named_parameters()]
    assert names[0] == "ctx" and any(n.startswith("meta_net.") for n in names)
    # CoCoOp's bottleneck: D -> D // 16 -> the context width.
    assert learner.meta_net[0].out_features == max(1, clip.embed_dim // 16)
    assert learner.meta_net[2].out_features == learner.ctx.shape[1]
    x = F.normalize(torch.randn(5, clip.embed_dim, generator=torch.Generator().manual_seed(0)), -1)
    text = learner(x)
    assert text.shape == (5, len(CLASSES), clip.embed_dim)
    # Each image gets its own class texts: the shift is not zero and differs between images.
    assert (text[0] - text[1]).abs().max() > 1e-4
    # With the meta-net's output zeroed, every image gets CoOp's class texts from the same ctx.
    coop = PromptLearner(clip.model, clip.tokenizer, CLASSES, init=None, seed=1)
    torch.testing.assert_close(learner.ctx.detach(), coop.ctx.detach())
    with torch.no_grad():
        learner.meta_net[2].weight.zero_()
        learner.meta_net[2].bias.zero_()
        flat = learner(x)
    torch.testing.assert_close(flat, coop.class_embeddings().expand(5, -1, -1), atol=1e-5, rtol=0)
    # Gradients flow from the logits through the prompts into both layers of the meta-net.
    fresh = ConditionalPromptLearner(
        clip.model, clip.tokenizer, CLASSES, image_dim=clip.embed_dim, init=None, seed=1
    )
    loss = F.cross_entropy(20 * fresh.logits(x), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    for p in (fresh.ctx, fresh.meta_net[0].weight, fresh.meta_net[2].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())
    # The batched classifier used at evaluation gives the same logits as one forward.
    with torch.no_grad():
        torch.testing.assert_close(fresh.classifier(chunk=2)(x), fresh.logits(x))


def test_weighted_cross_entropy_counts_synthetic_rows_by_their_weight():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # the last 3 rows synthetic, weight 0
    real_only = F.cross_entropy(logits[:3], y[:3], reduction="sum") / 6
    torch.testing.assert_close(weighted_cross_entropy(logits, y, w), real_only)
    torch.testing.assert_close(
        weighted_cross_entropy(logits, y, torch.ones(6)), F.cross_entropy(logits, y)
    )
    # A half weight halves the synthetic rows' share (divided by the batch, not by the weights).
    half = weighted_cross_entropy(logits, y, torch.tensor([1.0] * 3 + [0.5] * 3))
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(half, (ce[:3].sum() + 0.5 * ce[3:].sum()) / 6)


def test_probe_task_gives_zero_weight_rows_no_gradient():
    g = torch.Generator().manual_seed(1)
    rows = FeatureSet(torch.randn(8, 4, generator=g), ["a", "b"] * 4, [None] * 8, list("abcdefgh"))
    w = torch.tensor([1.0] * 4 + [0.0] * 4)
    task = ProbeTask(rows, ["a", "b"], batch_size=8, seed=0, weights=w)
    task.loss(0, 0).backward()
    real = ProbeTask(rows.subset(range(4)), ["a", "b"], batch_size=8, seed=0)
    real.loss(0, 0).backward()
    # Same rows, same init; the weighted batch divides by 8 rows, the real one by 4.
    torch.testing.assert_close(task.weight.grad * 2, real.weight.grad)


def _toy_run(out: Path) -> Path:
    """The toy world through the toy CLIP: photo images for training, held-out all styles."""
    from dgaug.job.manifest import validate
    from dgaug.job.run import run_pipeline
    from tests.helpers import tiny_manifest_dict

    d = tiny_manifest_dict(out / "train", shard_size=48)
    d["source"].update(num_images=48, image_size=64, styles=["photo"])
    d["stages"]["download"]["image_size"] = 64
    d["stages"]["features"] = {"model": "toy-clip", "device": "cpu", "batch_size": 48}
    d["stages"]["ldfs"] = {"source_domain": "photo", "targets": ["sketch"], "epochs": 2}
    assert run_pipeline(validate(d)).ok
    # The held-out images of all four styles, drawn with another seed (as bench/toy_dg.py).
    e = tiny_manifest_dict(out / "eval", seed=1000)
    e["source"].update(num_images=4, image_size=64, eval_images=96)
    assert run_pipeline(validate(e)).ok
    return out


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _toy_run(tmp_path_factory.mktemp("cocoop") / "out")


def _cfg(run: Path, output: Path, **kw: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": "toy-clip",
            "device": "cpu",
            "cpu_threads": 1,
            "output": str(output),
            "data": {
                "features": str(run / "train" / "features"),
                "ldfs": str(run / "train" / "ldfs"),
                "domains": ["photo"],
            },
            "eval": {"path": str(run / "eval" / "eval" / "images")},
            "batch_size": 16,
            "checkpoint_every": 100,
            "weight_decay": 0.0,
            **kw,
        }
    )


@pytest.mark.slow  # a pipeline run and CoCoOp's B x C prompts per step: about 20 s
def test_cocoop_learns_on_the_toy_world_and_beats_chance_held_out(toy_run, tmp_path):
    from dgaug.trainer.run import train

    # A random context start: the loss has something to learn, the meta-net with it.
    r = train(_cfg(toy_run, tmp_path / "cocoop", mode="cocoop", ctx_init=None, epochs=4, lr=0.02))
    assert r.steps == 4 * ((48 + 48) // 16)  # the real rows and one LDFS row each
    assert sum(r.losses[-3:]) / 3 < sum(r.losses[:3]) / 3 - 0.1, r.losses
    weights = load_file(str(tmp_path / "cocoop" / "model.safetensors"))
    assert {"ctx", "meta_net.0.weight", "meta_net.2.weight"} <= set(weights)
    result = json.loads((tmp_path / "cocoop" / "eval.json").read_text())
    held = result["held_out_mean"]
    chance = 1 / len(result["classes"])
    assert held["zero_shot"] > chance + 0.2, held
    assert set(result["domains"]) == {"photo", "sketch", "cartoon", "painting"}


@pytest.mark.slow  # a pipeline run (shared with the CoCoOp test) and three short fits
@pytest.mark.parametrize("mode", ["probe", "coop"])
def test_synthetic_weight_zero_equals_training_on_real_only(toy_run, tmp_path, mode):
    from dgaug.trainer.run import train

    kw = {"mode": mode, "epochs": 2, "lr": 0.01}
    zero = train(_cfg(toy_run, tmp_path / "w0", synthetic_weight=0.0, **kw))
    real = _cfg(toy_run, tmp_path / "real", **kw)
    real.data.ldfs = None
    only = train(real)
    assert zero.losses == only.losses
    a = load_file(str(tmp_path / "w0" / "model.safetensors"))
    b = load_file(str(tmp_path / "real" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A positive weight does train on the synthetic rows (more steps, other weights).
    half = train(_cfg(toy_run, tmp_path / "w05", synthetic_weight=0.5, **kw))
    assert half.steps > only.steps
