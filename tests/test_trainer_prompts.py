"""CoOp's PromptLearner on the tiny open_clip model: exact init, gradients, training, errors."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from dgaug.models.clip import TINY_CONFIG, load_clip
from dgaug.trainer.prompts import PromptLearner

CLASSES = ["golden retriever", "tabby cat", "airliner", "x-ray scanner"]


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny-random", device="cpu")


def test_init_reproduces_encode_text_of_the_full_prompts(clip):
    learner = PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=4, init="a photo of a")
    out = learner()
    with torch.no_grad():
        tokens = clip.tokenizer([f"a photo of a {c}." for c in CLASSES])
        expected = F.normalize(clip.model.encode_text(tokens), dim=-1)
    assert out.shape == (len(CLASSES), clip.embed_dim)
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-5, rtol=0)
    emb = learner.class_embeddings()
    assert emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=0)
    # The classes really differ, so the check above is not comparing one vector with itself.
    assert (expected[0] - expected[1]).abs().max() > 1e-2


def test_only_ctx_gets_gradients_and_is_saved(clip):
    learner = PromptLearner(clip.model, clip.tokenizer, CLASSES, init=None, seed=3)
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]
    assert list(learner.state_dict()) == ["ctx"]
    assert learner.ctx.shape == (4, TINY_CONFIG["text_cfg"]["width"])
    loss = learner()[:, 0].sum()
    loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in clip.model.parameters())
    # A saved context loads into a fresh learner and gives the same embeddings.
    other = PromptLearner(clip.model, clip.tokenizer, CLASSES, init=None, seed=4)
    other.load_state_dict(learner.state_dict())
    torch.testing.assert_close(other.class_embeddings(), learner.class_embeddings())


def test_training_ctx_moves_a_class_embedding_towards_a_target(clip):
    learner = PromptLearner(clip.model, clip.tokenizer, CLASSES, init="a photo of a")
    target = F.normalize(
        torch.randn(clip.embed_dim, generator=torch.Generator().manual_seed(7)), dim=0
    )
    before = float(learner.class_embeddings()[0] @ target)
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.02)
    for _ in range(30):
        optimizer.zero_grad()
        loss = -(learner()[0] @ target)
        loss.backward()
        optimizer.step()
    after = float(learner.class_embeddings()[0] @ target)
    assert after > before + 0.4, (before, after)  # measured: 0.04 -> 0.74


def test_random_init_is_seeded_and_init_length_is_checked(clip):
    def ctx(seed: int) -> torch.Tensor:
        return PromptLearner(clip.model, clip.tokenizer, CLASSES, init=None, seed=seed).ctx

    a, b, c = ctx(0), ctx(0), ctx(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert 0.01 < float(a.detach().std()) < 0.04  # N(0, 0.02^2)
    with pytest.raises(ValueError, match="words"):
        PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=4, init="a photo of")
    with pytest.raises(ValueError, match="words"):
        PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=2, init="a photo of a")
    # Four words but more than four tokens: positions 1..n_ctx would not hold the init words.
    with pytest.raises(ValueError, match="tokens"):
        PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=4, init="a photograph, of a")


def test_other_context_lengths(clip):
    learner = PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=2, init="a picture")
    with torch.no_grad():
        tokens = clip.tokenizer([f"a picture {c}." for c in CLASSES])
        expected = F.normalize(clip.model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(learner.class_embeddings(), expected, atol=1e-5, rtol=0)
    assert PromptLearner(clip.model, clip.tokenizer, CLASSES, n_ctx=16, init=None)().shape == (
        len(CLASSES),
        clip.embed_dim,
    )


def test_a_model_without_its_own_text_transformer_is_refused(clip):
    class NoTextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="own text transformer"):
        PromptLearner(NoTextTower(), clip.tokenizer, CLASSES)
    # open_clip's CustomTextCLIP keeps its text tower in `.text`; built tiny, offline.
    cfg = copy.deepcopy(TINY_CONFIG)
    custom = open_clip.CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    with pytest.raises(ValueError, match="own text transformer"):
        PromptLearner(custom, clip.tokenizer, CLASSES)


def test_a_half_precision_model_runs_in_its_cast_dtype(clip):
    model = copy.deepcopy(clip.model).to(torch.bfloat16)
    learner = PromptLearner(model, clip.tokenizer, CLASSES)
    out = learner()
    assert out.dtype == torch.bfloat16 and learner.ctx.dtype == torch.float32
    with torch.no_grad():
        tokens = clip.tokenizer([f"a photo of a {c}." for c in CLASSES])
        expected = F.normalize(model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(out.detach(), expected, atol=0, rtol=0)
    assert learner.class_embeddings().dtype == torch.float32
    out[:, 0].sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.dtype == torch.float32
