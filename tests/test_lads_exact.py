"""`method: lads` equals LADS's code (github.com/lisadunlap/LADS at 5dc41d6) on the same tensors.

Every rule below cites the LADS file and line it comes from. The reference in this file is written
from LADS's code, independently of dgaug's fit, in float64: same features, texts, initial weights
and batch order in, same selected epoch, weights and synthesized features out (to 1e-6).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgaug.core.hashing import derive_seed
from dgaug.stages.ldfs.config import LdfsConfig
from dgaug.stages.ldfs.data import SourceFeatures
from dgaug.stages.ldfs.fit import epoch_orders, fit, initial_mapper, split_rows
from dgaug.stages.ldfs.losses import lads_class_weights
from dgaug.stages.ldfs.mappers import load_mapper
from dgaug.stages.ldfs.optim import HFAdamW
from dgaug.stages.ldfs.synthesis import synthesize

DIM, HIDDEN = 16, 8
CLASSES = ["cat", "dog", "car", "cup"]
SOURCES = ["real photo", "photo"]  # two source prompts: the per-image argmax matters
TARGETS = ["sketch", "painting"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread


def text64(texts: list[str]) -> torch.Tensor:
    """A float64 text encoder: a fixed random unit vector per text."""
    out = [
        torch.randn(
            DIM, generator=torch.Generator().manual_seed(derive_seed("t", t)), dtype=torch.float64
        )
        for t in texts
    ]
    return F.normalize(torch.stack(out), dim=-1)


@pytest.fixture(scope="module")
def data() -> SourceFeatures:
    g = torch.Generator().manual_seed(1)
    n = 70  # 52 train rows in batches of 16: a short last batch, in both splits
    y = torch.arange(n) % len(CLASSES)
    centers = torch.randn(len(CLASSES), DIM, generator=g, dtype=torch.float64)
    x = F.normalize(
        centers[y] + 0.8 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1
    )
    # unbalanced classes: the class weights matter, and differ between the splits
    keep = [i for i in range(n) if not (y[i] == 3 and i % 3)]
    return SourceFeatures(
        keys=[f"k{i:03d}" for i in keep],
        features=x[keep],
        labels=[CLASSES[int(y[i])] for i in keep],
    )


def label_ids(labels: list[str]) -> torch.Tensor:
    return torch.tensor([sorted(CLASSES).index(lab) for lab in labels])


def lads_cfg(**kw) -> LdfsConfig:
    base = {
        "method": "lads",
        "source_domain": SOURCES,
        "targets": TARGETS,
        "epochs": 7,
        "batch_size": 16,
        "hidden": HIDDEN,
        "val_fraction": 0.3,
        "lr": 0.03,  # large enough that the epochs differ and the selection has work to do
    }
    return LdfsConfig(**{**base, **kw})


# --------------------------------------------------------------------------- the optimizer


def transformers4_adamw_step(p, grad, state, lr, wd, beta1=0.9, beta2=0.999, eps=1e-6):
    """transformers v4.26.1 src/transformers/optimization.py, AdamW.step, line by line."""
    if not state:  # :346-351
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state["step"] += 1  # :356
    m = state["exp_avg"] * beta1 + (1.0 - beta1) * grad  # :360
    v = state["exp_avg_sq"] * beta2 + (1.0 - beta2) * grad * grad  # :361
    state["exp_avg"], state["exp_avg_sq"] = m, v
    denom = torch.sqrt(v) + eps  # :362 eps before the bias correction
    step_size = (
        lr * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
    )  # :364-368
    p = p - step_size * m / denom  # :370
    if wd > 0.0:  # :380-381 decoupled decay, after the update, of the updated weights
        p = p - lr * wd * p
    return p


def test_hf_adamw_is_transformers_4_adamw_step_by_step() -> None:
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 3, generator=g, dtype=torch.float64) * 1e-3 for _ in range(6)]
    param = torch.nn.Parameter(p0.clone())
    opt = HFAdamW([param], lr=0.01, weight_decay=0.05)  # LADS passes lr and wd only (:325)
    ref, state = p0.clone(), {}
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
        ref = transformers4_adamw_step(ref, grad, state, lr=0.01, wd=0.05)
        torch.testing.assert_close(param.detach(), ref, rtol=0, atol=1e-15)
    # torch's AdamW (eps 1e-8 after the correction, decay first) is another optimizer: with
    # gradients of the size of eps the difference is large
    other = torch.nn.Parameter(p0.clone())
    torch_opt = torch.optim.AdamW([other], lr=0.01, weight_decay=0.05)
    for grad in grads:
        other.grad = grad.clone()
        torch_opt.step()
    assert float((other.detach() - ref).abs().max()) > 1e-4


# ------------------------------------------------------------------------------ the defaults


def test_lads_defaults_are_configs_base_yaml() -> None:
    c = LdfsConfig(method="lads", targets=["sketch"])
    assert c.lr == 0.005  # LADS configs/base.yaml:46 AUGMENTATION.MODEL.LR
    assert c.weight_decay == 0.05  # configs/base.yaml:47 AUGMENTATION.MODEL.WEIGHT_DECAY
    assert c.hidden == 384  # configs/base.yaml:48 AUGMENTATION.MODEL.HIDDEN_DIM
    assert c.epochs == 50  # configs/base.yaml:52 AUGMENTATION.EPOCHS
    assert c.lads_alpha == 0.5  # configs/base.yaml:54 AUGMENTATION.ALPHA
    assert c.batch_size == 256  # configs/base.yaml:20 DATA.BATCH_SIZE
    assert c.target_class_texts is False  # configs/base.yaml:62 AUGMENTATION.DOM_SPECIFIC_XE
    assert c.optimizer == "hf_adamw"  # methods/augmentations.py:9,325 transformers' AdamW
    assert (c.selection, c.patience) == ("lads", None)  # methods/augmentations.py:336-347
    assert c.class_text == "a photo of a {label}"  # methods/augmentations.py:305
    # ldfs keeps its own defaults; an explicit value always wins
    d = LdfsConfig(targets=["sketch"])
    assert (d.optimizer, d.selection, d.patience, d.lr) == ("torch_adamw", "row_mean", 10, 1e-3)
    e = LdfsConfig(method="lads", targets=["sketch"], lr=0.1, optimizer="torch_adamw")
    assert (e.lr, e.optimizer, e.weight_decay) == (0.1, "torch_adamw", 0.05)
    assert LdfsConfig.model_validate(e.model_dump()) == e


# ------------------------------------------------------------------- the reference training


def lads_reference(data, cfg, seed):
    """LADS's LADS class (methods/augmentations.py) on our split, init and batch order, float64."""
    x = F.normalize(data.features.to(torch.float64), dim=-1)  # main.py:116-117 METHOD.NORMALIZE
    y = torch.tensor([CLASSES.index(lab) for lab in data.labels])
    # the prompts, each encoded and normalized (clip_utils.py:123-144, lads_utils.py:52-64)
    src = torch.stack([text64([f"a {s} of a {c}" for c in CLASSES]) for s in SOURCES])  # [S, C, D]
    tgt = torch.stack([text64([f"a {t} of a {c}" for c in CLASSES]) for t in TARGETS])  # [K, C, D]
    if cfg.target_class_texts:  # DOM_SPECIFIC_XE: target_embeddings[num_net].T (:380)
        cls_texts = [tgt[k].T for k in range(len(TARGETS))]
    else:  # "a photo of a {c}" whatever the source domain (:305)
        cls_texts = [text64([f"a photo of a {c}" for c in CLASSES]).T] * len(TARGETS)
    train_rows, val_rows = split_rows(len(y), cfg.val_fraction, seed)
    gen = epoch_orders(train_rows, val_rows, seed, reshuffle_val=True)
    orders = [next(gen) for _ in range(cfg.epochs)]
    # class weights: 1 / count over the training split, / max (lads_utils.py:110,115-121; the
    # dataset of the training split, augmentations.py:289,327)
    _, counts = np.unique(y[train_rows].numpy(), return_counts=True)
    fracs = 1 / torch.tensor(counts, dtype=torch.float64)
    weights = fracs / fracs.max()
    init = initial_mapper(cfg, DIM, seed, torch.float64).state_dict()

    def loss_of(params, k, rows):
        w1, b1, w2, b2 = params
        inp = x[rows]
        out = F.relu(inp @ w1.T + b1) @ w2.T + b2  # MLP.forward, augmentations.py:248-252
        dirs = []
        for im, lab in zip(inp, y[rows], strict=True):  # get_direction_vectors, :354-364
            prod = im @ src[:, lab, :].T
            source_idx = int(torch.argmax(prod))
            dirs.append(tgt[k][lab] - src[source_idx][lab])
        text_diffs = torch.stack(dirs)
        text_diffs = text_diffs / text_diffs.norm(dim=-1, keepdim=True)
        im_diffs = out - inp  # :377
        a = im_diffs / im_diffs.norm(dim=-1, keepdim=True)
        cos = (a * text_diffs).sum(-1) / (a.norm(dim=-1) * text_diffs.norm(dim=-1))
        directional = (1.0 - cos).mean()  # :379 DirectionLoss('cosine')
        logits = (out / out.norm(dim=-1, keepdim=True)) @ cls_texts[k]  # get_class_logits, :316-318
        logp = torch.log_softmax(logits, dim=-1)
        w = weights[y[rows]]
        cls = -(w * logp[torch.arange(len(rows)), y[rows]]).sum() / w.sum()  # CE(weight=), :327
        return cfg.lads_alpha * directional + (1 - cfg.lads_alpha) * cls  # :383

    nets, selected = [], []
    for k in range(len(TARGETS)):  # one network per target, trained in turn (:310-313)
        params = [
            init["w1"][k].clone(),
            init["b1"][k].clone(),
            init["w2"][k].clone(),
            init["b2"][k].clone(),
        ]
        states = [{} for _ in params]
        best_loss, best_epoch, best = 10000, 0, None  # :335
        for epoch in range(cfg.epochs):  # :336, no early stopping
            train_order, val_order = orders[epoch]
            for s in range(0, len(train_order), cfg.batch_size):  # :373-390
                rows = train_order[s : s + cfg.batch_size]
                ps = [p.clone().requires_grad_(True) for p in params]
                grads = torch.autograd.grad(loss_of(ps, k, rows), ps)
                params = [
                    transformers4_adamw_step(p, g_, st, cfg.lr, cfg.weight_decay)
                    for p, g_, st in zip(params, grads, states, strict=True)
                ]
            batch_losses = [  # :392,397 the unweighted mean of the batch losses
                float(loss_of(params, k, val_order[s : s + cfg.batch_size]))
                for s in range(0, len(val_order), cfg.batch_size)
            ]
            val_loss = sum(batch_losses) / len(batch_losses)
            if val_loss < best_loss:  # :339-342
                best_loss, best_epoch, best = val_loss, epoch, [p.clone() for p in params]
        nets.append(best)
        selected.append(best_epoch)
    # augment_single (:401-418): normalize the input, map, normalize the output
    synth = []
    for w1, b1, w2, b2 in nets:
        o = F.relu(x @ w1.T + b1) @ w2.T + b2
        synth.append(o / o.norm(dim=-1, keepdim=True))
    return nets, selected, torch.stack(synth, dim=1)  # [N, K, D]


@pytest.mark.parametrize("dom_specific_xe", [False, True], ids=["class-texts", "DOM_SPECIFIC_XE"])
def test_lads_fit_and_synthesis_equal_lads_code(data, dom_specific_xe) -> None:
    cfg = lads_cfg(target_class_texts=dom_specific_xe)
    ours = fit(data, text64, cfg, seed=0)
    nets, selected, synth = lads_reference(data, cfg, seed=0)

    # the same selected epoch per target (ours counts from 1), and not trivially the last one
    per_target = ours.info["best_epoch_per_target"]
    assert [per_target[t] - 1 for t in TARGETS] == selected
    assert len(ours.curve) == cfg.epochs  # no early stopping
    # the class weights count the training split only (here they differ from all rows')
    train_rows, _ = split_rows(len(data.keys), cfg.val_fraction, 0)
    everyone = lads_class_weights(label_ids(data.labels), len(CLASSES), torch.float64)
    train = lads_class_weights(label_ids(data.labels)[train_rows], len(CLASSES), torch.float64)
    assert ours.info["class_weights"] == train.tolist() != everyone.tolist()
    for k, net in enumerate(nets):
        for name, ref in zip(("w1", "b1", "w2", "b2"), net, strict=True):
            torch.testing.assert_close(ours.state[name][k], ref, rtol=0, atol=1e-6)
    rows = synthesize(load_mapper(ours.state, cfg, DIM), data, text64, cfg, seed=0)
    emb = torch.from_numpy(np.stack([r["embedding"] for r in rows])).double()
    torch.testing.assert_close(emb.reshape(synth.shape), synth, rtol=0, atol=1e-6)
    assert [r["domain"] for r in rows[:2]] == TARGETS and rows[0]["key"] == data.keys[0]


def test_each_lads_rule_changes_the_result(data) -> None:
    """The comparison above would catch a wrong optimizer, class texts or class weights."""
    cfg = lads_cfg()
    nets, _, _ = lads_reference(data, cfg, seed=0)

    def gap(res) -> float:
        return max(float((res.state["w1"][k] - nets[k][0]).abs().max()) for k in range(2))

    assert gap(fit(data, text64, cfg, seed=0)) < 1e-6
    assert (
        gap(fit(data, text64, cfg.model_copy(update={"optimizer": "torch_adamw"}), seed=0)) > 1e-4
    )
    assert gap(fit(data, text64, cfg.model_copy(update={"class_text": None}), seed=0)) > 1e-4
    one_source = cfg.model_copy(update={"source_domain": "photo"})
    assert gap(fit(data, text64, one_source, seed=0)) > 1e-4
