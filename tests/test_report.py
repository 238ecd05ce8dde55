"""`dgaug report` on a tiny real run: the page, its figures, a partial run, object storage, escaping,
and the page as headless Chromium renders it."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import types
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dgaug.cli.app import app
from dgaug.core import errors as exitcodes
from dgaug.core.storage import Storage
from dgaug.job.registry import STAGE_CLASSES
from dgaug.job.report import report_run
from dgaug.pipeline.ledger import Ledger
from dgaug.pipeline.status import read_status
from dgaug.report import collect
from dgaug.report.contact import build_sheet, format_alpha, sample_tile
from dgaug.report.projection import _share, project
from tests import chromium
from tests.helpers import TINY_EDSAM, TINY_FEATURES, tiny_manifest_dict

pytestmark = pytest.mark.slow  # whole runs rendered in headless Chromium: e2e tier

PNG = b"\x89PNG\r\n\x1a\n"
# What the report of the test run writes: the page, and the figures it embeds and keeps beside it.
REPORT_FILES = [
    "contact.png",
    "index.html",
    "loss-probe.png",
    "projection.png",
    "scores.png",
    "throughput.png",
]
EVIL = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> & $x^2$'

# Every image decoded, every table with filled body rows, and what else the checks need.
PAGE_FACTS = """(() => {
  const imgs = Array.from(document.images);
  const tables = Array.from(document.querySelectorAll('table')).map(t => {
    const rows = Array.from(t.tBodies).flatMap(b => Array.from(b.rows));
    const cells = rows.flatMap(r => Array.from(r.cells));
    return {head: t.tHead ? t.tHead.innerText.trim().slice(0, 60) : '', rows: rows.length,
            cells: cells.length, empty: cells.filter(c => !c.textContent.trim()).length};
  });
  return {title: document.title, images: imgs.length,
          broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
          tables: tables, scripts: document.scripts.length, pwned: window.pwned === undefined ? null : window.pwned,
          sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
          empty: Array.from(document.querySelectorAll('.empty')).map(e => e.textContent),
          text: document.body.innerText};
})()"""


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def run_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """download (24 images: 3 shards) + edsam + features + ldfs, then `dgaug train` (probe)."""
    root = tmp_path_factory.mktemp("report")
    d = tiny_manifest_dict(root / "out", name="report-test")
    d["source"].update(eval_images=48)
    d["stages"]["edsam"] = dict(TINY_EDSAM)
    d["stages"]["features"] = {**TINY_FEATURES, "batch_size": 32}
    d["stages"]["ldfs"] = {"source_domain": "photo", "targets": ["sketch", "cartoon"], "epochs": 2}
    d["train"] = {
        "mode": "probe",
        "model": "tiny-random",
        "device": "cpu",
        "cpu_threads": 1,
        "epochs": 2,
        "batch_size": 16,
        "data": {"domains": ["photo"]},
    }
    manifest = root / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(d))
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(manifest)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", str(manifest)])
    assert r.exit_code == 0, r.output
    return manifest


@pytest.fixture(scope="module")
def run_out(run_manifest: Path) -> Path:
    return run_manifest.parent / "out"


@pytest.fixture(scope="module")
def report(run_manifest: Path, run_out: Path) -> Path:
    """`dgaug report MANIFEST` on the finished run; the path it printed."""
    r = CliRunner().invoke(app, ["report", str(run_manifest), "--samples", "4"])
    assert r.exit_code == 0, r.output
    index = Path(r.stdout.strip().splitlines()[-1])
    assert index == run_out / "report" / "index.html"
    return index


@pytest.fixture(scope="session")
def chromium_binary() -> tuple[str | None, str]:
    """(the browser, or None and why): found on PATH, else installed with apt-get when root."""
    path = chromium.find()
    if path is not None:
        return path, "on PATH"
    return chromium.install()


@pytest.fixture(scope="module")
def browser(chromium_binary: tuple[str | None, str], tmp_path_factory: pytest.TempPathFactory):
    """A running headless Chromium, or the reason there is none (the test needing it then fails
    under CI=true and is skipped elsewhere)."""
    path, why = chromium_binary
    if path is None:
        yield f"headless Chromium is needed to check the report page: {why}"
        return
    b = chromium.Chromium(path, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.close()


def _copy(run_out: Path, dest: Path) -> Path:
    shutil.copytree(run_out, dest, ignore=shutil.ignore_patterns("report", "checkpoints"))
    return dest


def _render(browser: chromium.Chromium | str, index: Path) -> dict[str, Any]:
    """The page's facts as Chromium sees them once loaded, after the checks every page passes."""
    if isinstance(browser, str):
        if os.environ.get("CI") == "true":
            pytest.fail(browser)
        pytest.skip(browser)
    facts, requests = browser.evaluate(index.as_uri(), PAGE_FACTS)
    assert facts["images"] > 0
    assert facts["broken"] == [], "every <img> decodes (naturalWidth > 0)"
    for t in facts["tables"]:
        assert t["rows"] > 0 and t["cells"] > 0 and t["empty"] == 0, t
    assert facts["scripts"] == 0
    # Nothing fetched from a network: the page and its images are file: and data: URLs.
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    return facts


# --------------------------------------------------------------------------------------- tests


def test_report_writes_a_page_and_figures_beside_it(report: Path) -> None:
    folder = report.parent
    names = sorted(p.name for p in folder.iterdir())
    assert names == REPORT_FILES
    for name in names:
        if name.endswith(".png"):
            assert (folder / name).read_bytes().startswith(PNG)
    page = report.read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "<title>dgaug report: report-test</title>" in page
    # The figures are embedded too, but for the contact sheet's: its images are, one by one.
    assert page.count("data:image/png;base64,") == 4
    assert page.count("data:image/jpeg;base64,") == 4 * 3
    assert "Complete: all" in page


def test_page_renders_in_chromium_with_every_image_and_table_filled(
    browser: chromium.Chromium, report: Path
) -> None:
    facts = _render(browser, report)
    assert facts["title"] == "dgaug report: report-test"
    assert facts["sections"] == ["augmentations", "features", "retention", "run", "training"]
    # 4 sources with their 2 samples each; projection, scores, throughput and loss figures.
    assert facts["images"] == 4 * 3 + 4
    heads = [t["head"] for t in facts["tables"]]
    assert any(h.startswith("stage\tfolder") for h in heads), heads
    assert any(h.startswith("mode\tmodel") for h in heads), heads
    assert any(h.startswith("domain\tsplit") for h in heads), heads
    # Each ED-SAM sample's scores against alpha: medians per alpha bin and the quartiles.
    assert any(h.startswith("alpha bin\tsamples") for h in heads), heads
    assert any(h.startswith("score\t25 %") for h in heads), heads
    assert facts["empty"] == ["no sample was skipped in the committed shards", "no shard failed"]
    for stage in ("download", "edsam", "features", "ldfs_fit", "ldfs"):
        assert stage in facts["text"]
    assert "held-out mean" in facts["text"]


def test_contact_sheet_shows_each_sample_with_its_recorded_alpha(run_out: Path) -> None:
    view = read_run(str(run_out))
    sheet = build_sheet(view, 5, seed=3)
    assert len(sheet.rows) == 5 and sheet.note is None and not sheet.problems
    recorded = {}
    for i in range(3):
        with tarfile.open(run_out / f"edsam/{i:05d}.tar") as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    recorded[m.name.split(".")[0]] = json.loads(tf.extractfile(m).read())
    for row in sheet.rows:
        assert row.original.jpeg and row.original.size == (32, 32)
        assert row.caption and row.domain and row.label
        assert [t.key for t in row.samples] == [f"{row.key}_0", f"{row.key}_1"]
        for t in row.samples:
            rec = recorded[t.key]
            assert rec["source_key"] == row.key
            assert t.alpha == format_alpha(rec["alpha"]) and t.alpha is not None
            assert t.score is None  # objective random: nothing measured
    # Seeded: the same seed draws the same images; another seed others.
    assert [r.key for r in build_sheet(view, 5, seed=3).rows] == [r.key for r in sheet.rows]
    assert [r.key for r in build_sheet(view, 5, seed=4).rows] != [r.key for r in sheet.rows]


def test_alpha_and_score_formats() -> None:
    assert format_alpha(0.24188) == "0.242"
    assert format_alpha([0.1, 0.3, 0.2, 0.4]) == "0.25 (mean of 4 channels)"
    assert format_alpha({"mean": 0.1, "min": -0.2, "max": 0.3}) == "0.1 [-0.2, 0.3]"
    assert format_alpha(None) is None and format_alpha("x") is None
    # Objective `worst` records the chosen candidate's loss under the reference CLIP: the score.
    rec = {"alpha": 0.5, "reference_loss": 1.23456, "reference_loss_kind": "clip_ce"}
    t = sample_tile("k_0", {"jpg": b"not an image", "json": json.dumps(rec).encode()})
    assert (t.alpha, t.score, t.score_kind, t.jpeg) == ("0.5", "1.235", "clip_ce", None)


def test_a_run_without_edsam_shows_originals_only(run_out: Path, tmp_path: Path) -> None:
    out = _copy(run_out, tmp_path / "out")
    plan = json.loads((out / "_dgaug/plan.json").read_text())
    del plan["edsam"]
    (out / "_dgaug/plan.json").write_text(json.dumps(plan))
    sheet = build_sheet(read_run(str(out)), 2, seed=0)
    assert sheet.note == "the edsam stage is not part of this run: originals only"
    assert len(sheet.rows) == 2 and all(r.samples == [] and r.note is None for r in sheet.rows)


def test_projection_is_bounded_seeded_and_balanced(run_out: Path, monkeypatch) -> None:
    view = read_run(str(run_out))
    p = project(view, 60, seed=0)
    # 24 real, 48 ED-SAM and 48 LDFS rows exist: 20 of each.
    assert p.n == 60 and p.counts() == {"real": 20, "edsam": 20, "ldfs": 20}
    assert p.coords["PCA"].shape == (60, 2) and "UMAP" not in p.coords
    assert 0 < p.explained[1] <= p.explained[0] < 1
    again = project(view, 60, seed=0)
    assert (again.coords["PCA"] == p.coords["PCA"]).all() and again.origin == p.origin
    assert set(p.domain) <= {"photo", "sketch", "cartoon", "painting"}
    assert {d for d, o in zip(p.domain, p.origin, strict=True) if o == "ldfs"} <= {
        "sketch",
        "cartoon",
    }
    # A small origin gives its unused share to the others.
    assert _share({"real": 5, "edsam": 100, "ldfs": 100}, 60) == {
        "real": 5,
        "edsam": 27,
        "ldfs": 27,
    }
    # UMAP is drawn when the package imports (a stand-in here: it is no dependency).
    fake = types.ModuleType("umap")

    class UMAP:
        def __init__(self, n_components: int, n_neighbors: int, random_state: int):
            assert n_components == 2 and random_state == 0

        def fit_transform(self, x):
            return x[:, :2] * 2

    fake.UMAP = UMAP
    monkeypatch.setitem(__import__("sys").modules, "umap", fake)
    p = project(view, 60, seed=0)
    assert p.coords["UMAP"].shape == (60, 2)


def test_partial_run_says_what_is_missing(
    run_out: Path, tmp_path: Path, browser: chromium.Chromium
) -> None:
    """Only the download stage done: the other sections say so, the page still renders."""
    out = _copy(run_out, tmp_path / "out")
    for d in ("edsam", "features", "ldfs", "train"):
        shutil.rmtree(out / d)
    result = report_run(str(out), samples=3)
    assert result.figures == ["contact.png", "throughput.png"]
    facts = _render(browser, Path(result.index))
    assert "no edsam shard is committed yet: originals only" in facts["text"]
    assert "no training has run on this output" in " ".join(facts["empty"])
    assert any("no feature is committed yet" in e for e in facts["empty"])
    assert "Partial: 3 of 13 planned shards committed." in facts["text"]
    assert facts["images"] == 3 + 1  # three originals and the throughput figure


def test_run_not_started_and_no_shards_render(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    result = report_run(str(tmp_path / "out"))
    page = Path(result.index).read_text()
    assert result.figures == []
    assert "Not started" in page and "no real shard is committed yet" in page
    assert "the run has not started" in page and "no training has run" in page


def test_failed_shard_is_listed_with_its_error(run_out: Path, tmp_path: Path) -> None:
    out = _copy(run_out, tmp_path / "out")
    ledger = Ledger(Storage(str(out)))
    ledger.clear_marker("edsam", 1)
    ledger.write_failure(
        "edsam",
        1,
        {
            "stage": "edsam",
            "shard": 1,
            "status": "failed",
            "error": "OutOfMemoryError: CUDA out of memory <b>\nsecond line",
            "attempts": 2,
            "failed_at": "2026-01-02T03:04:05Z",
        },
    )
    result = report_run(str(out), samples=24)
    page = Path(result.index).read_text()
    assert "Partial: 12 of 13 planned shards committed, 1 failed" in page
    row = '<td class="text">edsam</td><td>00001</td><td>2</td><td>2026-01-02T03:04:05Z</td>'
    assert row in page
    assert '<td class="err">OutOfMemoryError: CUDA out of memory &lt;b&gt;</td>' in page
    # The contact sheet draws from the shards whose samples are there: 16 of the 24 sources.
    assert page.count('<div class="card">') == 16
    assert "edsam shard 00001 is not committed" not in page


def test_captions_and_labels_from_the_data_are_escaped(
    run_out: Path, tmp_path: Path, browser: chromium.Chromium
) -> None:
    """A caption or label holding markup shows as text: no script runs, no tag is made."""
    out = _copy(run_out, tmp_path / "out")
    shard = out / "real/00000.tar"
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name.endswith(".txt"):
                data = EVIL.encode()
            elif m.name.endswith(".json"):
                meta = json.loads(data)
                meta["label"] = '"><b>bold</b> $\\frac{1$'
                data = json.dumps(meta).encode()
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    result = report_run(str(out), samples=24)
    page = Path(result.index).read_text()
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
    facts = _render(browser, Path(result.index))
    assert facts["pwned"] is None, "no script from the data ran"
    assert EVIL in facts["text"] and '"><b>bold</b> $\\frac{1$' in facts["text"]


def test_report_of_an_object_storage_output(run_manifest: Path, run_out: Path) -> None:
    """The run copied to fsspec's memory://: read and written there, nothing local."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/report-test-{uuid.uuid4().hex[:8]}"
    try:
        fs.put(str(run_out), f"{root}/out", recursive=True)
        assert fs.exists(f"{root}/out/_dgaug/plan.json")
        cwd = Path.cwd()
        before = sorted(os.listdir(cwd))
        r = CliRunner().invoke(
            app,
            [
                "report",
                str(run_manifest),
                "--set",
                f"output=memory://{root}/out",
                "--samples",
                "3",
                "--max-points",
                "30",
            ],
        )
        assert r.exit_code == 0, r.output
        assert r.stdout.strip().splitlines()[-1] == f"memory://{root}/out/report/index.html"
        assert sorted(os.listdir(cwd)) == before
        names = sorted(n.rsplit("/", 1)[-1] for n in fs.ls(f"{root}/out/report", detail=False))
        assert names == REPORT_FILES
        page = fs.cat_file(f"{root}/out/report/index.html").decode()
        assert "30 points (real 10, ED-SAM 10, LDFS 10)" in page
        assert page.count('<div class="card">') == 3 and "Complete: all 13" in page
        assert "held-out mean" in page
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(tmp_path / "missing.yaml")])
    assert r.exit_code == exitcodes.INVALID
    assert "manifest file not found" in r.output and "Traceback" not in r.output

    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(tiny_manifest_dict(tmp_path / "never-run")))
    r = runner.invoke(app, ["report", str(manifest)])
    assert r.exit_code == exitcodes.INVALID, r.output
    # One message (rich wraps it at the test terminal's 80 columns).
    assert " ".join(r.output.split()) == (
        f"error: output {tmp_path / 'never-run'} does not exist: no run has written there yet; "
        f"run `dgaug run {manifest}` first"
    )
    assert not (tmp_path / "never-run").exists()

    r = runner.invoke(app, ["report", str(manifest), "--samples", "-1"])
    assert r.exit_code == exitcodes.INVALID and "Traceback" not in r.output


def read_run(output: str) -> collect.RunView:
    """The report's view of a run, read the way `dgaug report` reads it."""
    return collect.read_run(output, read_status, list(STAGE_CLASSES))
