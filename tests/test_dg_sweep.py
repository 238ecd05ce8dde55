"""`dgaug dg`: the DG sweep over a PACS-style image folder, its table, resume, and its inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dgaug.job.dg import splits
from dgaug.job.dg_config import DgConfig
from dgaug.job.manifest import ManifestError, validate
from dgaug.sources.imageset import write_synthetic_dataset

# PACS's folder names (underscores), as the shipped manifests/pacs.yaml reads them.
FOLDERS = {"sketch": "sketch", "painting": "art_painting"}


def test_splits_are_single_source_and_leave_one_out() -> None:
    got = {
        (s.protocol, s.name, s.train, s.targets)
        for s in splits(["a", "b", "c"], list(("single_source", "leave_one_out")))
    }
    assert got == {
        ("single_source", "from-a", ("a",), ("b", "c")),
        ("single_source", "from-b", ("b",), ("a", "c")),
        ("single_source", "from-c", ("c",), ("a", "b")),
        ("leave_one_out", "to-a", ("b", "c"), ("a",)),
        ("leave_one_out", "to-b", ("a", "c"), ("b",)),
        ("leave_one_out", "to-c", ("a", "b"), ("c",)),
    }


def test_domain_texts_and_bad_sections_are_reported() -> None:
    dg = DgConfig(domain_texts={"Real_World": "photo"})
    assert dg.text("Real_World") == "photo" and dg.text("art_painting") == "art painting"
    with pytest.raises(ValueError, match="at least 2"):
        DgConfig(domains=["photo"])
    with pytest.raises(ManifestError) as e:
        validate(
            {
                "output": "x",
                "source": {"kind": "synthetic", "num_images": 4},
                "dg": {"arms": ["probe", "maple"], "seeds": [0, 0]},
            }
        )
    text = str(e.value)
    assert "dg.arms" in text and "dg.seeds" in text


def _pacs_like(root: Path) -> Path:
    """A tiny root/<domain>/<class>/*.jpg with PACS's folder names: 2 domains x 2 classes x 6."""
    write_synthetic_dataset(
        root / "draw",
        num_images=24,
        seed=5,
        image_size=32,
        classes=["circle", "square"],
        styles=list(FOLDERS),
    )
    data = root / "pacs"
    for style, folder in FOLDERS.items():
        shutil.copytree(root / "draw" / "images" / style, data / folder)
    return data


def _manifest(data: Path, out: Path) -> dict[str, Any]:
    return {
        "output": str(out),
        "shard_size": 64,
        "source": {"kind": "image_folder", "path": str(data)},
        "executor": {"kind": "local"},
        "stages": {
            "download": {"image_size": 32, "threads": 4},
            "features": {"model": "tiny-random", "device": "cpu", "batch_size": 64},
            "ldfs": {"targets": ["x"], "epochs": 2, "batch_size": 16},
        },
        "train": {"device": "cpu", "cpu_threads": 1, "max_steps": 3, "batch_size": 4},
        "dg": {
            "arms": ["zero_shot", "probe"],
            "augmentations": ["none", "lads"],
            "seeds": [0, 1],
            "ldfs_per_seed": False,
        },
    }


@pytest.mark.slow  # 9 tiny pipeline runs and 16 probe fits: 232 s on the loaded 2-core machine
def test_sweep_writes_the_table_and_a_rerun_redoes_nothing(tmp_path: Path, monkeypatch) -> None:
    from dgaug.job import dg as dg_module

    data = _pacs_like(tmp_path)
    m = validate(_manifest(data, tmp_path / "out"))
    record = dg_module.sweep(m)
    domains = sorted(FOLDERS.values())
    assert record["domains"] == domains
    for protocol in ("single_source", "leave_one_out"):
        rows = record["tables"][protocol]
        assert [(r["arm"], r["augmentation"]) for r in rows] == [
            ("zero_shot", "none"),
            ("probe", "none"),
            ("probe", "lads"),
        ]
        for r in rows:
            for col in (*domains, "average"):
                assert r[col]["n"] == 2 and 0 <= r[col]["mean"] <= 100
            # The average column is the mean of the target columns (per seed, then over seeds).
            cols = [r[d]["mean"] for d in domains]
            assert r["average"]["mean"] == pytest.approx(sum(cols) / len(cols))
    # Leave one out: column t is the run that held out t alone.
    cell = record["cells"]["to-sketch"]["probe-none-s1"]
    assert list(cell) == ["sketch"]
    loo = {r["arm"] + r["augmentation"]: r for r in record["tables"]["leave_one_out"]}
    runs = [record["cells"]["to-sketch"][f"probe-none-s{s}"]["sketch"] for s in (0, 1)]
    assert loo["probenone"]["sketch"]["mean"] == pytest.approx(50 * sum(runs))
    # LADS ran per split with the folder's text and only the split's training domain.
    ldfs_cfg = tmp_path / "out" / "dg" / "runs" / "from-art_painting" / "lads-s0" / "_dgaug"
    text = "\n".join(p.read_text() for p in ldfs_cfg.rglob("*.yaml"))
    assert "source_domain: art painting" in text and "method: lads" in text
    md = (tmp_path / "out" / "dg" / "table.md").read_text()
    assert "| probe | + LADS |" in md and "art_painting" in md
    assert json.loads((tmp_path / "out" / "dg" / "table.json").read_text())["cells"] == json.loads(
        json.dumps(record["cells"])
    )

    # A rerun trains nothing and runs no stage: every cell and shard is finished.
    def refuse(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr("dgaug.trainer.run.train", refuse)
    again = dg_module.sweep(m)
    assert again["tables"] == json.loads(json.dumps(record["tables"]))


def test_a_source_without_domains_or_features_is_refused(tmp_path: Path) -> None:
    from dgaug.job.dg import sweep

    d = _manifest(tmp_path, tmp_path / "out")
    del d["stages"]["features"]
    d["source"] = {"kind": "url_list", "path": str(tmp_path / "urls.parquet")}
    (tmp_path / "urls.parquet").write_bytes(b"")
    with pytest.raises(ManifestError) as e:
        sweep(validate(d))
    assert "source.kind" in str(e.value) and "stages.features" in str(e.value)


def test_clip_mode_cannot_evaluate_on_cached_features() -> None:
    from dgaug.trainer.config import TrainConfig

    cfg = TrainConfig(mode="clip", output="o", data={"real": "r"}, eval={"kind": "features"})
    assert any(p.startswith("train.eval.kind") for p in cfg.missing_inputs())
    probe = TrainConfig(mode="probe", output="o", data={"features": "f"}, eval={"kind": "features"})
    assert probe.missing_inputs() == []
