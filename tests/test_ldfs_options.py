"""LDFS options of issue 18: instance conditioning, attributes per image, anchored pairwise, noise_cos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from dgaug.stages.ldfs.config import LdfsConfig
from dgaug.stages.ldfs.data import SourceFeatures
from dgaug.stages.ldfs.fit import fit
from dgaug.stages.ldfs.losses import pairwise_loss
from dgaug.stages.ldfs.mappers import load_mapper
from dgaug.stages.ldfs.synthesis import synthesize
from dgaug.stages.ldfs.texts import TextBank
from tests.controlled_space import ATTRIBUTES, make_space

TARGETS = ["sketch", "painting"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread


@pytest.fixture(scope="module")
def space():
    return make_space()


@pytest.fixture(scope="module")
def source(space) -> SourceFeatures:
    x, labels, keys = space.images("photo", 6, seed=1)  # 60 rows, 10 classes
    # each image carries one attribute in its feature: "red" for even rows, "small" for odd ones
    attr = torch.stack([space.attribute_dirs[2 if i % 2 == 0 else 0] for i in range(len(x))])
    return SourceFeatures(keys=keys, features=F.normalize(x + 2 * attr, dim=-1), labels=labels)


def cfg_(**kw) -> LdfsConfig:
    base = {"targets": TARGETS, "epochs": 3, "batch_size": 32, "patience": None}
    return LdfsConfig(**{**base, **kw})


ATTRS = {c: list(ATTRIBUTES[:4]) for c in make_space().classes}  # small, large, red, blue


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "lads", "condition": "instance"},
        {"method": "lads", "pairwise": "anchored"},
        {"mapper": "per_domain", "condition": "instance"},
        {"attribute_choice": "best"},
        {"attribute_top_k": 0},
        {"pairwise": "cross"},
        {"class_text": "a {domain} of a {label}"},
        {"source_domain": []},
        {"source_domain": ["photo", "photo"]},
    ],
)
def test_options_are_validated(bad: dict) -> None:
    with pytest.raises(ValidationError):
        LdfsConfig(**{"targets": ["sketch"], **bad})


def test_attributes_chosen_per_image_are_the_most_similar(space, source) -> None:
    bank = TextBank(source, space.text, cfg_(), ATTRS, torch.device("cpu"))
    bank.choose_attributes_per_image(source.features, top_k=1)
    rows = torch.arange(len(source.keys))
    cols = bank.text_rows(rows, torch.Generator().manual_seed(0))
    chosen = [bank.prompts[int(c)].rsplit(", ", 1)[1] for c in cols]
    assert chosen == ["red" if i % 2 == 0 else "small" for i in range(len(rows))]
    # the same every step (k = 1), whatever the generator
    assert torch.equal(cols, bank.text_rows(rows, torch.Generator().manual_seed(1)))
    # top 2: one of the two best per step, the best among them
    bank.choose_attributes_per_image(source.features, top_k=2)
    seen = set()
    for s in range(20):
        cols = bank.text_rows(rows[:1], torch.Generator().manual_seed(s))
        seen.add(bank.prompts[int(cols[0])].rsplit(", ", 1)[1])
    assert len(seen) == 2 and "red" in seen


def test_pairwise_anchored_penalizes_unequal_moves() -> None:
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(24, 8, generator=g, dtype=torch.float64), dim=-1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    rotated = f @ q  # an isometry: the within term is blind to it
    assert float(pairwise_loss(f, rotated)) < 1e-20
    self_cos = (f * rotated).sum(-1)
    anchored = pairwise_loss(f, rotated, anchored=True)
    assert float(anchored) == pytest.approx(float(self_cos.var(correction=0)), rel=1e-12)
    assert float(anchored) > 1e-3
    assert float(pairwise_loss(f, f, anchored=True)) < 1e-20
    per = pairwise_loss(f, torch.stack([f, rotated]), keep_leading=True, anchored=True)
    assert per.shape == (2,) and float(per[1]) == pytest.approx(float(anchored))


def test_noise_cos_in_the_curve_measures_how_much_the_noise_turns(space, source) -> None:
    turned = {}
    for sigma in (0.02, 0.2):
        res = fit(source, space.text, cfg_(sigma=sigma, epochs=2), seed=0)
        turned[sigma] = [r["noise_cos"] for r in res.curve]
        assert all("val_noise_cos" in r for r in res.curve)
    assert all(0.9 < c < 1 for c in turned[0.02])  # sigma 0.02 in 64 dims: a small turn
    assert all(c < 0.6 for c in turned[0.2])  # sigma 0.2: the direction is mostly noise
    res = fit(source, space.text, cfg_(sigma=0.0, epochs=1), seed=0)
    assert "noise_cos" not in res.curve[0]


def test_instance_condition_trains_and_synthesizes_from_each_rows_text(space, source) -> None:
    cfg = cfg_(condition="instance", attributes="a.json", attribute_choice="per_image", sigma=0.0)
    res = fit(source, space.text, cfg, seed=0, attributes=ATTRS)
    mapper = load_mapper(res.state, cfg, space.dim)
    rows = synthesize(mapper, source, space.text, cfg, seed=0, attributes=ATTRS)
    emb = np.stack([r["embedding"] for r in rows]).reshape(len(source.keys), 2, -1)
    # the conditioning is each row's text at the target: the same feature under another label
    # (another text) maps elsewhere; under the domain conditioning it would not
    swapped = SourceFeatures(
        keys=source.keys, features=source.features, labels=source.labels[1:] + source.labels[:1]
    )
    other = synthesize(mapper, swapped, space.text, cfg, seed=0, attributes=ATTRS)
    emb2 = np.stack([r["embedding"] for r in other]).reshape(len(source.keys), 2, -1)
    assert np.abs(emb - emb2).max() > 1e-3
    dom = cfg.model_copy(update={"condition": "domain"})
    d1 = synthesize(mapper, source, space.text, dom, seed=0)
    d2 = synthesize(mapper, swapped, space.text, dom, seed=0)
    assert all(np.array_equal(a["embedding"], b["embedding"]) for a, b in zip(d1, d2, strict=True))
    # the instance texts reach the mapper: what it is given is bank.instance at target k
    bank = TextBank(source, space.text, cfg, ATTRS, torch.device("cpu"))
    bank.choose_attributes_per_image(source.features, 1)
    col = int(bank.text_rows(torch.tensor([0]), None)[0])
    cond = bank.instance[bank.n_sources :, col][:, None]  # [K, 1, D]
    want = mapper(source.features[:1], cond)[:, 0].detach().numpy()
    np.testing.assert_allclose(emb[0], want, atol=1e-6)
    with pytest.raises(ValueError, match="attributes"):
        synthesize(mapper, source, space.text, cfg, seed=0)


def test_instance_condition_draws_random_attributes_per_key(space, source) -> None:
    cfg = cfg_(condition="instance", attributes="a.json", sigma=0.0, draws=4, epochs=1)
    res = fit(source, space.text, cfg, seed=0, attributes=ATTRS)
    mapper = load_mapper(res.state, cfg, space.dim)
    rows = synthesize(mapper, source, space.text, cfg, seed=0, attributes=ATTRS)
    e = np.stack([r["embedding"] for r in rows]).reshape(len(source.keys), 2, 4, -1)
    # without noise the draws differ only by their attribute: some draws differ
    assert any(not np.allclose(e[i, 0, 0], e[i, 0, j]) for i in range(5) for j in range(1, 4))
    # a shard of rows 10..19 gets the same features for the same keys
    part = SourceFeatures(
        keys=source.keys[10:20], features=source.features[10:20], labels=source.labels[10:20]
    )
    sub = synthesize(mapper, part, space.text, cfg, seed=0, attributes=ATTRS)
    s = np.stack([r["embedding"] for r in sub]).reshape(10, 2, 4, -1)
    np.testing.assert_allclose(s, e[10:20], atol=1e-6)
