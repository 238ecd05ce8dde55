"""The report's class-retention measures on constructed embeddings with known answers."""

import numpy as np
import pyarrow as pa
import pytest

from dgaug.report.retention import from_table


def _features(
    real: np.ndarray, labels: list[str], edsam: np.ndarray, sources: list[int]
) -> pa.Table:
    """A features-stage table: real rows keyed r0.., ED-SAM rows keyed by their source's index."""
    dim = real.shape[1]
    keys = [f"r{i}" for i in range(len(real))] + [f"r{s}_0" for s in sources]
    emb = np.concatenate([real, edsam]).astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim)
    return pa.table(
        {
            "origin": ["real"] * len(real) + ["edsam"] * len(edsam),
            "key": keys,
            "source_key": [f"r{i}" for i in range(len(real))] + [f"r{s}" for s in sources],
            "label": labels + [labels[s] for s in sources],
            "image_embedding": col,
            "text_embedding": col,  # captions on the images: cos(image, caption) = 1
        }
    )


def _clusters(rng: np.random.Generator, n_per: int, k: int, dim: int = 16, noise: float = 0.1):
    centres = np.eye(dim)[:k]
    x = np.repeat(centres, n_per, axis=0) + noise * rng.normal(size=(n_per * k, dim))
    labels = [f"c{i}" for i in range(k) for _ in range(n_per)]
    return x, labels


def test_copies_keep_their_class_and_sit_on_their_source():
    rng = np.random.default_rng(0)
    real, labels = _clusters(rng, 10, 3)
    r = from_table(_features(real, labels, real.copy(), list(range(len(real)))))
    assert r.classes == 3 and r.chance == pytest.approx(1 / 3)
    assert r.real == 30 and r.edsam == 30
    assert r.real_accuracy == 1.0 and r.edsam_accuracy == 1.0
    assert r.edsam_to_source == pytest.approx(1.0, abs=1e-6)
    assert r.edsam_to_caption == pytest.approx(1.0, abs=1e-6)
    assert 0.7 < r.real_to_same_class < 0.99  # same cluster, another image: close, not equal


def test_samples_moved_to_another_class_are_counted_wrong():
    rng = np.random.default_rng(1)
    real, labels = _clusters(rng, 10, 3)
    # Every sample of a c0 source lands in c1's cluster; the others stay near their source.
    sources = list(range(len(real)))
    edsam = real.copy() + 0.05 * rng.normal(size=real.shape)
    edsam[:10] = real[10:20]
    r = from_table(_features(real, labels, edsam, sources))
    assert r.edsam_accuracy == pytest.approx(20 / 30)
    assert r.edsam_to_source < 0.9  # the moved third pulls the mean down


def test_noise_samples_score_near_chance():
    rng = np.random.default_rng(2)
    real, labels = _clusters(rng, 50, 6)
    noise = rng.normal(size=(300, 16))
    r = from_table(_features(real, labels, noise, list(range(300))))
    assert r.real_accuracy > 0.95
    assert abs(r.edsam_accuracy - 1 / 6) < 0.1
    assert abs(r.edsam_to_source) < 0.2


def test_no_edsam_rows_and_one_class():
    rng = np.random.default_rng(3)
    real, labels = _clusters(rng, 5, 2)
    r = from_table(_features(real, labels, np.empty((0, 16)), []))
    assert r.real_accuracy == 1.0 and r.edsam_accuracy is None and r.edsam_to_source is None
    one = from_table(_features(real[:5], labels[:5], np.empty((0, 16)), []))
    assert one.real_accuracy is None and "fewer than 2 classes" in one.notes[0]
