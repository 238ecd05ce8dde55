"""ED-SAM sample scores: the thresholds users filter by, and the report's scores against alpha."""

import numpy as np
import pyarrow as pa
import pytest

from dgaug.core.scores import ScoreFilter, alpha_value, left_out_keys, score_values, table_scores
from dgaug.report.retention import from_table


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _table(with_scores: bool) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """2 real rows and 4 ED-SAM rows (2 per source) with random unit embeddings and known alphas."""
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(6, 8)))
    keys = ["a", "b", "a_0", "a_1", "b_0", "b_1"]
    origins = ["real"] * 2 + ["edsam"] * 4
    sources = ["a", "b", "a", "a", "b", "b"]
    cols = {
        "key": keys,
        "origin": origins,
        "source_key": sources,
        "label": ["x", "y", "x", "x", "y", "y"],
        "alpha": pa.array([None, None, -0.4, -0.1, 0.2, 0.45], pa.float32()),
        "image_embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(img.astype(np.float32).ravel()), 8
        ),
        "text_embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(txt.astype(np.float32).ravel()), 8
        ),
    }
    if with_scores:
        caption, source = score_values(keys, origins, sources, img, txt)
        cols["caption_score"] = pa.array(caption, pa.float32())
        cols["source_similarity"] = pa.array(source, pa.float32())
    return pa.table(cols), img, txt


def test_score_values_are_the_cosines() -> None:
    t, img, txt = _table(with_scores=True)
    caption = t["caption_score"].to_pylist()
    source = t["source_similarity"].to_pylist()
    for i in range(6):
        assert caption[i] == pytest.approx(float(img[i] @ txt[i]), abs=1e-6)
    assert source[:2] == [None, None]
    assert source[2] == pytest.approx(float(img[2] @ img[0]), abs=1e-6)
    assert source[5] == pytest.approx(float(img[5] @ img[1]), abs=1e-6)


def test_files_without_score_columns_are_scored_alike() -> None:
    new, _, _ = _table(with_scores=True)
    old, _, _ = _table(with_scores=False)
    a, b = table_scores(new), table_scores(old)
    assert a.keys() == b.keys() == {"a_0", "a_1", "b_0", "b_1"}
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6)


def test_thresholds_keep_and_count() -> None:
    t, _, _ = _table(with_scores=True)
    scores = table_scores(t)
    caption = sorted(c for c, _ in scores.values())
    out, scored = left_out_keys(t, ScoreFilter(min_caption_score=caption[1]))
    assert len(out) == 1 and scored == 4
    assert scores[next(iter(out))][0] == caption[0]
    source = sorted(s for _, s in scores.values())
    out, _ = left_out_keys(t, ScoreFilter(max_source_similarity=source[0]))
    assert len(out) == 3
    out, _ = left_out_keys(t, ScoreFilter())
    assert not out and not ScoreFilter().active
    both = ScoreFilter(min_caption_score=caption[1], max_source_similarity=source[0])
    assert both.describe() == (
        f"caption_score >= {caption[1]:g} and source_similarity <= {source[0]:g}"
    )


def test_a_sample_without_a_score_does_not_pass_a_threshold_on_it() -> None:
    f = ScoreFilter(min_caption_score=0.1, max_source_similarity=0.9)
    assert f.keeps(0.5, 0.5)
    assert not f.keeps(None, 0.5) and not f.keeps(0.5, None) and not f.keeps(float("nan"), 0.5)
    assert not f.keeps(0.05, 0.5) and not f.keeps(0.5, 0.95)


def test_alpha_value_of_each_record_shape() -> None:
    assert alpha_value(0.25) == 0.25
    assert alpha_value([0.1, 0.3]) == pytest.approx(0.2)
    assert alpha_value({"mean": -0.1, "min": -0.4, "max": 0.3}) == -0.1
    assert alpha_value(None) is None and alpha_value("x") is None and alpha_value(True) is None


def test_report_scores_per_alpha_bin() -> None:
    t, img, txt = _table(with_scores=True)
    r = from_table(t)
    sc = r.scores
    assert sc is not None and len(sc.alpha) == 4 and len(sc.real_caption_score) == 2
    rows = sc.by_alpha(bins=2)  # alpha -0.4 .. 0.45: [-0.4, 0.025) holds 2, the rest 2
    assert [n for _, _, n, _, _ in rows] == [2, 2]
    assert rows[0][3] == pytest.approx(np.median([img[2] @ txt[2], img[3] @ txt[3]]), abs=1e-5)
    assert rows[1][4] == pytest.approx(np.median([img[4] @ img[1], img[5] @ img[1]]), abs=1e-5)
    # Old files (no score columns) give the same numbers.
    old = from_table(_table(with_scores=False)[0]).scores
    np.testing.assert_allclose(old.caption_score, sc.caption_score, atol=1e-6)


def test_scores_figure_is_drawn() -> None:
    from dgaug.report.figures import scores_png

    r = from_table(_table(with_scores=True)[0])
    png = scores_png(r.scores)
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert scores_png(None) is None
