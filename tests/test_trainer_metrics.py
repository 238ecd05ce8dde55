"""Evaluation metrics on constructed embeddings whose right answers are known in advance."""

from __future__ import annotations

import math

import pytest
import torch

from dgaug.trainer.data import ImageRef, Pair
from dgaug.trainer.evaluate import Embedded, evaluate, markdown_table, zero_shot_head
from dgaug.trainer.metrics import (
    accuracy,
    fit_linear_probe,
    probe_logits,
    retrieval_recall,
    zero_shot_logits,
)


def _basis(d: int = 8) -> torch.Tensor:
    return torch.eye(d)


def test_zero_shot_accuracy_counts_exactly_the_rows_nearest_their_class() -> None:
    classes = _basis()[:3]  # class c is e_c
    # 6 images: 4 point at their own class, 2 point at another one.
    images = torch.stack(
        [
            classes[0] + 0.1 * classes[1],
            classes[1],
            classes[2] * 3,  # length does not matter: cosine
            classes[0],
            classes[0],  # labelled 1: wrong
            classes[2],  # labelled 0: wrong
        ]
    )
    labels = torch.tensor([0, 1, 2, 0, 1, 0])
    assert accuracy(zero_shot_logits(images, classes), labels) == pytest.approx(4 / 6)
    assert math.isnan(accuracy(torch.empty(0, 3), torch.empty(0, dtype=torch.long)))


def test_retrieval_recall_on_a_known_ranking() -> None:
    d = _basis(16)
    n = 12
    texts = d[:n]
    # Image i sits on text i, except images 0..5 sit nearer text i+1 (second nearest: own text).
    images = torch.stack([texts[i] + (1.2 * texts[i + 1] if i < 6 else 0) for i in range(n)])
    r = retrieval_recall(images, texts, ks=(1, 5, 10))
    assert r["image_to_text@1"] == pytest.approx(6 / 12)
    assert r["image_to_text@5"] == 1.0
    # Text i+1 (1..6) finds image i first (its sim 1.2/|..| beats image i+1's 1.0/|..|? no:
    # image i is normalized: 1.2/sqrt(2.44) = 0.768 < 1.0 for image i+1 when i+1 >= 6.
    # So texts 1..5 rank their own image (norm 1/sqrt(2.44) = 0.64) below image i-1 (0.768).
    assert r["text_to_image@1"] == pytest.approx(7 / 12)
    assert r["text_to_image@10"] == 1.0


def test_retrieval_counts_any_text_with_the_same_caption_as_a_hit() -> None:
    d = _basis(4)
    texts = torch.stack([d[0], d[0], d[1], d[1]])  # two captions, each twice
    images = torch.stack([d[0], d[0], d[1], d[1]])
    plain = retrieval_recall(images, texts, ks=(1,))
    grouped = retrieval_recall(images, texts, caption_ids=[0, 0, 1, 1], ks=(1,))
    assert grouped["image_to_text@1"] == 1.0 and grouped["text_to_image@1"] == 1.0
    # Without groups a tie between two identical texts is broken one way: half the pairs miss.
    assert plain["image_to_text@1"] == pytest.approx(0.5)


def test_linear_probe_separates_separable_classes_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(4).repeat_interleave(25)
    x = centres[y] + 0.3 * torch.randn(100, 16, generator=g)
    w, b = fit_linear_probe(x, y, 4)
    assert accuracy(probe_logits(x, w, b), y) == 1.0
    w2, b2 = fit_linear_probe(x, y, 4)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def _pairs(domains: dict[str, list[str]]) -> list[Pair]:
    return [
        Pair(f"{d}{i}", f"a {d} of a {label}", ImageRef("/dev/null"), label, d)
        for d, labels in domains.items()
        for i, label in enumerate(labels)
    ]


def test_evaluate_splits_training_domains_and_scores_held_out_domains_whole() -> None:
    classes = ["cat", "dog"]
    d = _basis(4)
    pairs = _pairs({"photo": ["cat", "dog"] * 4, "sketch": ["cat", "dog", "cat", "dog", "bird"]})
    # photo images on their class axis; sketch images all on the "cat" axis.
    images = torch.stack(
        [d[0] if p.label == "cat" else d[1] for p in pairs if p.domain == "photo"]
        + [d[0] for p in pairs if p.domain == "sketch"]
    )
    captions = torch.stack([d[2] for _ in pairs])
    head = zero_shot_head(torch.stack([d[0], d[1]]))
    result = evaluate(
        Embedded(pairs, images, captions), classes, classify=head, train_domains=["photo"]
    )
    photo, sketch = result["domains"]["photo"], result["domains"]["sketch"]
    assert not photo["held_out"] and sketch["held_out"]
    assert photo["images"] == 4  # the odd half; the even half fitted the probe
    assert sketch["images"] == 4  # the bird has no class: skipped, counted
    assert result["skipped_unknown_label"] == 1
    assert photo["zero_shot"] == 1.0 and photo["probe"] == 1.0
    assert sketch["zero_shot"] == 0.5  # every sketch looks like a cat
    assert result["held_out_mean"]["zero_shot"] == 0.5
    table = markdown_table(result)
    assert "| sketch (held out) | 4 | 50.0 |" in table
    assert "**held-out mean**" in table
