"""LDFS / LADS core: config validation, losses, mappers, fit and synthesize, controlled feature space."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from dgaug.stages.ldfs import synthesis as ldfs_synthesis
from dgaug.stages.ldfs.config import LdfsConfig
from dgaug.stages.ldfs.data import SourceFeatures
from dgaug.stages.ldfs.fit import fit
from dgaug.stages.ldfs.losses import (
    caption_contrastive_loss,
    class_consistency_loss,
    lads_class_weights,
    lads_direction_loss,
    local_direction_loss,
    pairwise_loss,
)
from dgaug.stages.ldfs.mappers import PerDomainMapper, SharedMapper, load_mapper
from dgaug.stages.ldfs.synthesis import draw_seed, synthesize
from dgaug.stages.ldfs.texts import TextBank, stochastic_text
from tests.controlled_space import compare_probes, label_ids, make_space

TARGETS = ["sketch", "painting"]


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def cfg_(**kw) -> LdfsConfig:
    base = {"targets": TARGETS, "epochs": 6, "batch_size": 64, "patience": None}
    return LdfsConfig(**{**base, **kw})


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread


@pytest.fixture(scope="module")
def space():
    return make_space()


@pytest.fixture(scope="module")
def source(space) -> SourceFeatures:
    x, labels, keys = space.images("photo", 16, seed=1)  # 160 rows, 10 classes
    return SourceFeatures(keys=keys, features=x, labels=labels)


@pytest.fixture(scope="module")
def captioned(space) -> SourceFeatures:
    x, labels, keys = space.images("photo", 12, seed=2)
    adjectives = ["small", "large", "red", "blue"]
    captions = [f"{adjectives[i % 4]} {lab} on a table" for i, lab in enumerate(labels)]
    return SourceFeatures(keys=keys, features=x, captions=captions)


# ----------------------------------------------------------------------------------------- config


def test_config_defaults_follow_the_brief() -> None:
    c = LdfsConfig(targets=["sketch"])
    assert (c.method, c.mapper, c.source_domain, c.consistency) == (
        "ldfs",
        "shared",
        "photo",
        "auto",
    )
    assert (c.sigma, c.draws, c.hidden, c.epochs, c.batch_size) == (0.02, 1, 384, 50, 256)
    assert (c.lambda_ld, c.lambda_cons, c.lambda_pr, c.lads_alpha) == (1.0, 1.0, 1.0, 0.5)
    assert (c.lr, c.weight_decay, c.val_fraction, c.patience, c.dtype) == (
        1e-3,
        0.0,
        0.1,
        10,
        "float16",
    )
    assert c.class_template == "a {domain} of a {label}"
    assert c.caption_template == "a {domain} of {caption}"
    assert frozenset({"enabled"}) == LdfsConfig.PERFORMANCE_FIELDS
    assert all(f.description for f in LdfsConfig.model_fields.values())


@pytest.mark.parametrize(
    "bad",
    [
        {"targets": []},
        {"targets": [""]},
        {"targets": ["  "]},
        {"targets": ["sketch", "sketch"]},
        {"class_template": "a {domain} photo"},
        {"class_template": "a {domain} of a {label} by {artist}"},
        {"class_template": "a {domain of a {label}"},
        {"caption_template": "{caption}"},
        {"caption_template": "a {domain} of {label}"},
        {"sigma": -0.1},
        {"draws": 0},
        {"draws": 101},
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"lads_alpha": 1.5},
        {"lambda_pr": -1},
        {"method": "nada"},
        {"mapper": "both"},
        {"consistency": "none"},
        {"dtype": "bfloat16"},
        {"patience": 0},
        {"unknown_field": 1},
    ],
)
def test_config_rejects(bad: dict) -> None:
    with pytest.raises(ValidationError):
        LdfsConfig(**{"targets": ["sketch"], **bad})


def test_config_requires_targets() -> None:
    with pytest.raises(ValidationError, match="targets"):
        LdfsConfig()


def test_config_round_trips_and_imports_no_torch() -> None:
    c = LdfsConfig(targets=["sketch", "cartoon"], attributes="attrs.json", patience=None)
    assert LdfsConfig.model_validate(json.loads(c.model_dump_json())) == c
    code = (
        "import sys; import dgaug.stages.ldfs.config; "
        "bad = [m for m in ('torch', 'numpy', 'pyarrow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------- losses


def test_pairwise_loss_is_zero_for_isometries_only() -> None:
    f = unit(32, 16)
    assert float(pairwise_loss(f, f)) == pytest.approx(0.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))
    assert float(pairwise_loss(f, f @ q)) == pytest.approx(0.0, abs=1e-10)  # a rotation
    moved = F.normalize(f + 0.5 * unit(1, 16, seed=4), dim=-1)  # a shift: not an isometry
    assert float(pairwise_loss(f, moved)) > 1e-3
    # leading dims: one loss per target; the plain mean is their mean
    both = torch.stack([f, moved])
    per = pairwise_loss(f, both, keep_leading=True)
    assert per.shape == (2,) and float(per[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(pairwise_loss(f, both)) == pytest.approx(float(per.mean()), rel=1e-6)
    # the definition, written out
    cos = F.cosine_similarity(f[:, None], f[None], dim=-1)
    cos_hat = F.cosine_similarity(moved[:, None], moved[None], dim=-1)
    assert float(pairwise_loss(f, moved)) == pytest.approx(
        float(((cos - cos_hat) ** 2).mean()), rel=1e-5
    )


def test_local_direction_loss_extremes() -> None:
    f, delta = unit(8, 16, seed=1), unit(8, 16, seed=2)
    assert float(local_direction_loss(f, f + 0.3 * delta, delta)) == pytest.approx(0.0, abs=1e-6)
    assert float(local_direction_loss(f, f - 0.3 * delta, delta)) == pytest.approx(2.0, abs=1e-6)
    # the scale of the move does not matter, only its direction
    a = local_direction_loss(f, f + 0.1 * delta + 0.1 * unit(8, 16, seed=5), delta)
    b = local_direction_loss(f, f + 2.0 * delta + 2.0 * unit(8, 16, seed=5), delta)
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    # a reflection across the bisector of (src, tgt) moves src exactly onto tgt: loss 0
    src, tgt = unit(1, 16, seed=6), unit(1, 16, seed=7)
    d = F.normalize(tgt - src, dim=-1)
    reflected = src - 2 * (src * d).sum(-1, keepdim=True) * d
    assert torch.allclose(reflected, tgt, atol=1e-6)
    assert float(local_direction_loss(src, reflected, d)) == pytest.approx(0.0, abs=1e-6)


def test_stochastic_text_unit_norm_seeded_and_scaled() -> None:
    e = unit(4000, 64)
    assert torch.allclose(stochastic_text(e, 0.0, torch.Generator().manual_seed(0)), e, atol=1e-7)
    a = stochastic_text(e, 0.05, torch.Generator().manual_seed(1))
    b = stochastic_text(e, 0.05, torch.Generator().manual_seed(1))
    c = stochastic_text(e, 0.05, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.norm(dim=-1), torch.ones(4000), atol=1e-5)
    # |e + sigma eps|: cos(e~, e) = 1 / sqrt(1 + sigma^2 D) on average, for unit e
    expected = 1 / (1 + 0.05**2 * 64) ** 0.5
    assert float((a * e).sum(-1).mean()) == pytest.approx(expected, abs=0.01)


def test_class_consistency_loss_is_weighted_cross_entropy_without_temperature() -> None:
    f_hat = unit(12, 16, seed=1) * 3.0  # not unit: the loss normalizes
    text = unit(4, 16, seed=2)
    y = torch.tensor([0, 1, 2, 3, 0, 0, 0, 1, 1, 2, 0, 0])
    w = lads_class_weights(y, 4)
    # LADS: 1 / count, scaled so the rarest class has weight 1
    counts = torch.bincount(y, minlength=4).float()
    assert torch.allclose(w, counts.min() / counts)
    logits = F.normalize(f_hat, dim=-1) @ text.T
    nll = -torch.log_softmax(logits, -1)[torch.arange(12), y]
    expected = (w[y] * nll).sum() / w[y].sum()
    assert float(class_consistency_loss(f_hat, text, y, w)) == pytest.approx(float(expected))
    assert float(class_consistency_loss(f_hat, text, y)) == pytest.approx(float(nll.mean()))
    per = class_consistency_loss(torch.stack([f_hat, -f_hat]), text, y, w, keep_leading=True)
    assert per.shape == (2,) and float(per[0]) == pytest.approx(float(expected))
    assert lads_class_weights(torch.tensor([0, 0, 2]), 3).tolist() == [0.5, 1.0, 1.0]  # 1: absent


def test_caption_contrastive_loss_matches_definition() -> None:
    caps = unit(6, 16, seed=3)
    f_hat = F.normalize(caps + 0.2 * unit(6, 16, seed=4), dim=-1)
    logits = 100.0 * f_hat @ caps.T
    expected = F.cross_entropy(logits, torch.arange(6))
    assert float(caption_contrastive_loss(f_hat, caps, 100.0)) == pytest.approx(float(expected))
    # each feature is its own caption: near zero at CLIP's scale; shuffled captions: large
    assert float(caption_contrastive_loss(caps, caps, 100.0)) < 1e-6
    assert float(caption_contrastive_loss(caps, caps.roll(1, 0), 100.0)) > 10


def test_instance_directions_without_noise_reduce_to_lads(space, source) -> None:
    """sigma = 0 and per-class text: LDFS's L_ld is LADS's L_dir, on the same features."""
    cfg = cfg_(sigma=0.0)
    bank = TextBank(source, space.text, cfg, None, torch.device("cpu"))
    rows = torch.arange(len(source.keys))
    f = source.features
    delta, cond, noise_cos = bank.step_texts(rows, f, torch.Generator().manual_seed(0), True)
    assert noise_cos is None  # no noise, nothing turned
    # LADS's per-class directions, built here from the text encoder directly
    classes = sorted(set(source.labels))
    t_src = space.text([f"a photo of a {c}" for c in classes])
    t_tgt = torch.stack([space.text([f"a {d} of a {c}" for c in classes]) for d in TARGETS])
    lads_delta = F.normalize(t_tgt - t_src[None], dim=-1)
    y = label_ids(source.labels, classes)
    assert torch.allclose(delta, lads_delta[:, y], atol=1e-6)
    assert torch.allclose(cond, space.text(TARGETS)[:, None].expand_as(cond))
    g_f = f + 0.3 * unit(2, len(y), f.shape[1], seed=9)  # any mapped features, both targets
    ld = local_direction_loss(f, g_f, delta, keep_leading=True)
    lads = lads_direction_loss(f, g_f, lads_delta, y, keep_leading=True)
    assert torch.allclose(ld, lads, atol=1e-6)
    assert 0.1 < float(ld.mean()) < 1.9  # not a degenerate comparison


def test_noise_and_attributes_make_directions_instance_specific(space, source) -> None:
    attributes = {"dog": ["small", "large"], "cat": ["red"], "car": []}
    cfg = cfg_(sigma=0.05)
    bank = TextBank(source, space.text, cfg, attributes, torch.device("cpu"))
    # variants: dog x 2, cat x 1 (with its attribute), every other class x 1 (no attribute)
    assert bank.instance.shape[:2] == (3, 11)
    prompts = set(bank.prompts)
    assert {"a photo of a dog, small", "a sketch of a dog, large", "a painting of a cat, red"} <= (
        prompts
    )
    assert "a photo of a car" in prompts and "a photo of a dog" not in prompts
    rows = torch.tensor([i for i, lab in enumerate(source.labels) if lab == "dog"])
    f = source.features[rows]
    d1, c1, turned = bank.step_texts(rows, f, torch.Generator().manual_seed(5), True)
    d2, _, _ = bank.step_texts(rows, f, torch.Generator().manual_seed(5), True)
    d3, _, _ = bank.step_texts(rows, f, torch.Generator().manual_seed(6), True)
    assert turned is not None and 0 < float(turned) < 1  # the noise turns the direction
    assert torch.equal(d1, d2) and not torch.equal(d1, d3)
    assert len({tuple(r.tolist()) for r in d1[0].round(decimals=4)}) == len(rows)  # all differ
    assert torch.allclose(d1.norm(dim=-1), torch.ones(d1.shape[:2]), atol=1e-5)
    # both attributes are drawn, about equally often
    cols = torch.cat([bank.text_rows(rows, torch.Generator().manual_seed(s)) for s in range(50)])
    share = (cols == cols.min()).float().mean()
    dog = int(bank.offset[bank.classes.index("dog")])
    assert set(cols.tolist()) == {dog, dog + 1}
    assert 0.4 < float(share) < 0.6
    # the conditioning is noisy too, and tied to the target text's noise
    assert not torch.allclose(c1, space.text(TARGETS)[:, None].expand_as(c1))


# ---------------------------------------------------------------------------------------- mappers


def test_mappers_compute_what_they_document() -> None:
    g = torch.Generator().manual_seed(0)
    f, e = unit(5, 8, seed=1), unit(2, 5, 8, seed=2)
    shared = SharedMapper(8, 16, g)
    want = F.normalize(
        f + shared.fc2(F.relu(shared.fc1(torch.cat([f.expand(2, 5, 8), e], -1)))), dim=-1
    )
    assert torch.allclose(shared(f, e), want, atol=1e-6)
    with pytest.raises(ValueError):
        shared(f, None)
    for residual in (True, False):
        m = PerDomainMapper(8, 16, 2, residual, g)
        for k in range(2):
            g_k = F.relu(f @ m.w1[k].T + m.b1[k]) @ m.w2[k].T + m.b2[k]
            want = F.normalize(f + g_k if residual else g_k, dim=-1)
            assert torch.allclose(m(f)[k], want, atol=1e-6)
    # the default init's range: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    top = float(shared.fc1.weight.detach().abs().max())
    assert 0.9 / 16**0.5 < top <= 1 / 16**0.5


# -------------------------------------------------------------------------------- fit, synthesize


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "ldfs"},
        {"method": "ldfs", "mapper": "per_domain"},
        {"method": "lads"},
        {
            "condition": "instance",
            "pairwise": "anchored",
            "selection": "lads",
            "optimizer": "hf_adamw",
            "source_domain": ["photo", "real photo"],
        },
    ],
    ids=["ldfs-shared", "ldfs-per-domain", "lads", "ldfs-options"],
)
def test_fit_is_bit_reproducible_lowers_the_loss_and_synthesizes(space, source, kw) -> None:
    cfg = cfg_(**kw)
    rng = torch.get_rng_state()
    a = fit(source, space.text, cfg, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded generators only, never the global RNG
    b = fit(source, space.text, cfg, seed=3)
    c = fit(source, space.text, cfg, seed=4)
    assert a.state.keys() == b.state.keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert a.curve == b.curve and a.best_epoch == b.best_epoch
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)
    assert all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
        for t in a.state.values()
    )
    # training lowers the loss: first epoch against the best
    assert len(a.curve) == cfg.epochs and [r["epoch"] for r in a.curve] == [1, 2, 3, 4, 5, 6]
    first = a.curve[0]
    assert min(r["train_loss"] for r in a.curve) < first["train_loss"] - 0.01
    assert min(r["val_loss"] for r in a.curve) < first["val_loss"] - 0.01
    parts = {"dir", "cls"} if cfg.method == "lads" else {"ld", "cons", "pr"}
    assert parts <= first.keys() and {f"val_{p}" for p in parts} <= first.keys()
    if cfg.method == "lads":
        assert first["train_loss"] == pytest.approx(0.5 * first["dir"] + 0.5 * first["cls"])
    else:
        assert first["train_loss"] == pytest.approx(first["ld"] + first["cons"] + first["pr"])
    assert a.info["n_train"] == 144 and a.info["n_val"] == 16 and a.info["dim"] == space.dim

    mapper = load_mapper(a.state, cfg, space.dim)
    rows = synthesize(mapper, source, space.text, cfg, seed=3)
    again = synthesize(load_mapper(b.state, cfg, space.dim), source, space.text, cfg, seed=3)
    n = len(source.keys)
    assert len(rows) == n * len(TARGETS)
    for r, r2 in zip(rows, again, strict=True):
        assert np.array_equal(r["embedding"], r2["embedding"])
    emb = np.stack([r["embedding"] for r in rows])
    assert emb.dtype == np.float32 and emb.shape == (n * 2, space.dim)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # order: row i, then target k; key and label inherited, domain is the target's description
    for idx, r in enumerate(rows):
        i, k = divmod(idx, 2)
        assert (r["key"], r["label"], r["domain"], r["draw"], r["caption"]) == (
            source.keys[i],
            source.labels[i],
            TARGETS[k],
            0,
            None,
        )
    # the targets are different features, both moved away from the source feature
    assert not np.allclose(emb[0::2], emb[1::2], atol=1e-3)
    assert np.all((emb[0::2] * source.features.numpy()).sum(1) < 0.9999)


def test_selected_state_is_the_best_epoch(space, source) -> None:
    cfg = cfg_(epochs=8, lr=3e-3)
    full = fit(source, space.text, cfg, seed=0)
    vals = [r["val_loss"] for r in full.curve]
    assert full.best_epoch == 1 + int(np.argmin(vals))
    # training is deterministic: stopping after the best epoch gives the same weights
    short = fit(source, space.text, cfg.model_copy(update={"epochs": full.best_epoch}), seed=0)
    assert all(torch.equal(full.state[k], short.state[k]) for k in full.state)


def test_lads_selects_each_target_network_on_its_own(space, source) -> None:
    cfg = cfg_(method="lads", epochs=5)
    res = fit(source, space.text, cfg, seed=0)
    per = res.info["best_epoch_per_target"]
    assert set(per) == set(TARGETS) and res.best_epoch == max(per.values())
    # each target's slice is that network's weights at its own best epoch
    for k, target in enumerate(TARGETS):
        short = fit(source, space.text, cfg.model_copy(update={"epochs": per[target]}), seed=0)
        assert all(torch.equal(res.state[n][k], short.state[n][k]) for n in res.state)


def test_patience_stops_after_that_many_epochs_without_improvement(space, source) -> None:
    cfg = cfg_(epochs=60, patience=2, lr=0.05)
    lines: list[str] = []
    res = fit(source, space.text, cfg, seed=0, log=lines.append)
    assert res.info["stopped_early"]
    assert len(lines) == len(res.curve) + 1 and "stopped at epoch" in lines[-1]
    assert len(res.curve) == res.best_epoch + 2 < 60
    best = res.curve[res.best_epoch - 1]["val_loss"]
    assert all(r["val_loss"] >= best for r in res.curve[res.best_epoch :])


def test_no_validation_split_selects_on_training_loss(space, source) -> None:
    res = fit(source, space.text, cfg_(val_fraction=0.0, epochs=3), seed=0)
    assert res.info["n_val"] == 0 and res.info["selected_on"] == "train_loss"
    assert all(np.isnan(r["val_loss"]) for r in res.curve)
    assert res.best_epoch == 1 + int(np.argmin([r["train_loss"] for r in res.curve]))


def test_state_survives_safetensors(space, source, tmp_path) -> None:
    cfg = cfg_(epochs=2, draws=3)
    res = fit(source, space.text, cfg, seed=0)
    save_file(res.state, tmp_path / "mapper.safetensors")
    back = load_mapper(load_file(tmp_path / "mapper.safetensors"), cfg, space.dim)
    direct = load_mapper(res.state, cfg, space.dim)
    a = synthesize(back, source, space.text, cfg, seed=1)
    b = synthesize(direct, source, space.text, cfg, seed=1)
    assert all(np.array_equal(x["embedding"], y["embedding"]) for x, y in zip(a, b, strict=True))
    with pytest.raises(RuntimeError):  # a state of another mapper shape
        load_mapper(res.state, cfg.model_copy(update={"mapper": "per_domain"}), space.dim)


def test_draws_differ_and_do_not_depend_on_the_other_rows(space, source, monkeypatch) -> None:
    cfg = cfg_(epochs=2, draws=3, sigma=0.05)
    mapper = load_mapper(fit(source, space.text, cfg, seed=0).state, cfg, space.dim)
    rows = synthesize(mapper, source, space.text, cfg, seed=7)
    assert len(rows) == len(source.keys) * 2 * 3
    assert [(r["domain"], r["draw"]) for r in rows[:6]] == [
        (t, j) for t in TARGETS for j in range(3)
    ]
    e = np.stack([r["embedding"] for r in rows]).reshape(len(source.keys), 2, 3, -1)
    assert np.allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
    assert not np.allclose(e[:, :, 0], e[:, :, 1], atol=1e-4)  # draw 0 vs draw 1
    # a "shard" of rows 100..119, in another order: the same features for the same keys
    part = list(range(119, 99, -1))
    shard = SourceFeatures(
        keys=[source.keys[i] for i in part],
        features=source.features[part],
        labels=[source.labels[i] for i in part],
    )
    sub = synthesize(mapper, shard, space.text, cfg, seed=7)
    by_key = {(r["key"], r["domain"], r["draw"]): r["embedding"] for r in rows}
    for r in sub:
        np.testing.assert_allclose(
            r["embedding"], by_key[r["key"], r["domain"], r["draw"]], atol=1e-6
        )
    assert draw_seed(7, "k", 0, 1) != draw_seed(7, "k", 1, 0) != draw_seed(8, "k", 1, 0)
    # small chunks (3 rows x 3 draws per pass): the same rows, in the same order
    monkeypatch.setattr(ldfs_synthesis, "SYNTH_CHUNK", 10)
    chunked = synthesize(mapper, source, space.text, cfg, seed=7)
    assert [(r["key"], r["domain"], r["draw"]) for r in chunked] == [
        (r["key"], r["domain"], r["draw"]) for r in rows
    ]
    for a, b in zip(chunked, rows, strict=True):
        np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-6)
    monkeypatch.undo()
    # another seed: other noise, other features
    other = synthesize(mapper, source, space.text, cfg, seed=8)
    assert not np.allclose(other[0]["embedding"], rows[0]["embedding"], atol=1e-4)
    # no noise: every draw is the same feature
    flat = synthesize(mapper, source, space.text, cfg.model_copy(update={"sigma": 0.0}), seed=7)
    f = np.stack([r["embedding"] for r in flat]).reshape(len(source.keys), 2, 3, -1)
    assert np.array_equal(f[:, :, 0], f[:, :, 2])


def test_caption_datasets_train_with_the_contrastive_loss(space, captioned) -> None:
    cfg = cfg_(epochs=4)
    res = fit(captioned, space.text, cfg, seed=0, logit_scale=50.0)
    assert res.info["mode"] == "caption" and res.info["logit_scale"] == 50.0
    assert res.info["n_instance_prompts"] == 3 * len(captioned.keys)
    assert res.info["instance_prompts_sample"][0] == f"a photo of {captioned.captions[0]}"
    assert min(r["val_loss"] for r in res.curve) < res.curve[0]["val_loss"]
    rows = synthesize(load_mapper(res.state, cfg, space.dim), captioned, space.text, cfg, seed=0)
    assert [r["caption"] for r in rows[::2]] == captioned.captions
    assert all(r["label"] is None for r in rows)


def test_inputs_are_checked(space, source, captioned) -> None:
    with pytest.raises(ValueError, match="labels"):
        fit(captioned, space.text, cfg_(consistency="class"), seed=0)
    with pytest.raises(ValueError, match="labels"):
        fit(captioned, space.text, cfg_(method="lads"), seed=0)
    with pytest.raises(ValueError, match="captions"):
        fit(source, space.text, cfg_(consistency="caption"), seed=0)
    with pytest.raises(ValueError, match="attributes"):
        fit(source, space.text, cfg_(attributes="attrs.json"), seed=0)
    short = SourceFeatures(keys=source.keys[:-1], features=source.features, labels=source.labels)
    with pytest.raises(ValueError, match="keys"):
        fit(short, space.text, cfg_(), seed=0)


def test_attributes_reach_training(space, source) -> None:
    attributes = {c: ["small", "large", "red"] for c in space.classes}
    cfg = cfg_(epochs=3, attributes="attrs.json")
    res = fit(source, space.text, cfg, seed=0, attributes=attributes)
    assert res.info["n_instance_prompts"] == 3 * len(space.classes) * 3
    again = fit(source, space.text, cfg, seed=0, attributes=attributes)
    assert all(torch.equal(res.state[k], again.state[k]) for k in res.state)
    plain = fit(source, space.text, cfg.model_copy(update={"attributes": None}), seed=0)
    assert res.curve[0]["train_loss"] != plain.curve[0]["train_loss"]


# ------------------------------------------------------------------------ controlled feature space


def test_ldfs_features_help_a_probe_on_unseen_domains() -> None:
    """Probe on real photo features (+ synthesized sketch and painting features), scored on real
    sketch and painting features that no training step saw."""
    cmp = compare_probes(methods=("ldfs", "lads"), targets=TARGETS, seed=0)
    acc = {m: sum(a[d] for d in TARGETS) / len(TARGETS) for m, a in cmp.accuracy.items()}
    print(f"held-out accuracy on {TARGETS}: {acc}; all domains: {cmp.accuracy}")
    assert acc["source_only"] < 0.8  # the space is hard: a photo probe fails on the targets
    assert acc["ldfs"] > acc["source_only"] + 0.2
    assert acc["ldfs"] > 0.95
    assert acc["lads"] > acc["source_only"]  # the baseline helps too
    assert cmp.fits["ldfs"].best_epoch > 1

    # geometry: a synthesized sketch is closer to the real sketches of its class than its photo
    sp, (x, y) = cmp.space, cmp.source
    sx, sy = cmp.tests["sketch"]
    centroid = F.normalize(torch.stack([sx[sy == c].mean(0) for c in range(len(sp.classes))]), -1)
    rows = [r for r in cmp.synthesized["ldfs"] if r["domain"] == "sketch"]
    xs = torch.from_numpy(np.stack([r["embedding"] for r in rows]))
    assert [r["key"] for r in rows] == [f"photo/1000/{i:05d}" for i in range(len(y))]
    synth_cos = float((xs * centroid[y]).sum(-1).mean())
    photo_cos = float((x * centroid[y]).sum(-1).mean())
    assert synth_cos > photo_cos + 0.1
