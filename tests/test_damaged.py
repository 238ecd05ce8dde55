"""Lost or damaged shards: deleted, truncated and corrupted (same size) shards of every stage are
flagged by status (size) or verify (sha256), left out of the mix/ view, and remade byte for byte
by the next run while their downstream shards are kept; the marker index is only a cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dgaug.cli.app import app
from dgaug.core.errors import FAILED, OK, PENDING
from dgaug.core.storage import Storage
from dgaug.pipeline.scan import index_rel, scan_stage, write_index
from tests.helpers import TINY_EDSAM, TINY_FEATURES, TINY_LDFS, tiny_manifest_dict

FOLDERS = {"download": "real", "edsam": "edsam", "features": "features", "ldfs": "ldfs"}
EXT = {"real": "tar", "edsam": "tar", "features": "parquet", "ldfs": "parquet"}
# Every stage gets each kind of damage the run can see on some shard, and a same-size corruption
# only verify can see. edsam 2 and features 1 stay whole although their upstream shards (real 2,
# edsam 1) are damaged: they must be kept as they are. (A shard whose upstream is corrupt but not
# yet found would be remade from the corrupt bytes: verify before remaking downstream shards.)
DAMAGE = {
    ("real", 0): "delete",
    ("real", 1): "truncate",
    ("real", 2): "corrupt",
    ("edsam", 0): "truncate",
    ("edsam", 1): "corrupt",
    ("features", 0): "delete",
    ("features", 2): "corrupt",
}
KEPT = [("edsam", 2), ("features", 1)]
# The local run has the ldfs stage too (the S3 run it is checked on has not): its shards are
# damaged like the others, and ldfs 2 is kept although features 2 is remade.
DAMAGE_WITH_LDFS = {**DAMAGE, ("ldfs", 0): "truncate", ("ldfs", 1): "corrupt"}
KEPT_WITH_LDFS = [*KEPT, ("ldfs", 2)]


def manifest_dict(output: str) -> dict[str, Any]:
    d = tiny_manifest_dict(output)
    d["stages"]["edsam"] = dict(TINY_EDSAM)
    d["stages"]["features"] = dict(TINY_FEATURES)
    d["stages"]["ldfs"] = dict(TINY_LDFS)
    return d


def shard_rel(folder: str, shard: int) -> str:
    return f"{folder}/{shard:05d}.{EXT[folder]}"


def damage(fs: Any, root: str, plan: dict[tuple[str, int], str]) -> None:
    """Apply a damage plan under `root` (a local path or a bucket path) through fsspec."""
    for (folder, shard), kind in plan.items():
        path = f"{root}/{shard_rel(folder, shard)}"
        if kind == "delete":
            fs.rm_file(path)
            continue
        data = bytearray(fs.cat_file(path))
        if kind == "truncate":
            data = data[:1000]
        else:  # same size, other bytes: only a hash finds it
            for i in range(len(data) // 2, len(data) // 2 + 16):
                data[i] ^= 0xFF
        fs.pipe_file(path, bytes(data))


def size_damaged(plan: dict[tuple[str, int], str]) -> set[tuple[str, int]]:
    return {k for k, v in plan.items() if v != "corrupt"}


def damaged_in_status(output: str) -> set[tuple[str, int]]:
    from dgaug.pipeline.status import read_status

    st = read_status(output)
    return {(FOLDERS[n], shard) for n, s in st.stages.items() for shard in s.damaged}


def data_snapshot(fs: Any, root: str, folders: set[str]) -> dict[str, bytes]:
    return {
        shard_rel(folder, i): fs.cat_file(f"{root}/{shard_rel(folder, i)}")
        for folder in folders
        for i in range(3)
    }


def markers_of(fs: Any, root: str, keys: list[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
    return {(f, i): fs.cat_file(f"{root}/{f}/_state/{i:05d}.json") for f, i in keys}


def check_damage_and_repair(
    fs: Any,
    root: str,
    output: str,
    manifest: Path,
    plan: dict[tuple[str, int], str] = DAMAGE,
    kept: list[tuple[str, int]] = KEPT,
) -> None:
    """The whole story on one finished output: damage, status, run, verify, repair, run."""
    from dgaug.job.manifest import validate
    from dgaug.job.run import run_pipeline

    runner = CliRunner()
    folders = {folder for folder, _ in plan}
    original = data_snapshot(fs, root, folders)
    kept_markers = markers_of(fs, root, kept)
    damage(fs, root, plan)

    assert damaged_in_status(output) == size_damaged(plan)
    r = runner.invoke(app, ["status", str(manifest)])
    assert r.exit_code == PENDING, r.output
    for folder, shard in size_damaged(plan):
        assert f"{shard:05d}.{EXT[folder]}" in r.output

    m = validate(yaml.safe_load(manifest.read_text()))
    summary = run_pipeline(m)
    assert summary.ok
    done = {n: s.done for n, s in summary.stages.items() if n in FOLDERS}
    assert set(done) == {n for n, folder in FOLDERS.items() if folder in folders}
    assert done == {n: sum(1 for f, _ in size_damaged(plan) if f == FOLDERS[n]) for n in done}, (
        "exactly the shards found missing or truncated are remade"
    )
    assert all(s.done == 0 for n, s in summary.stages.items() if n not in FOLDERS), "fit kept"
    now = data_snapshot(fs, root, folders)
    for key in size_damaged(plan):
        assert now[shard_rel(*key)] == original[shard_rel(*key)], key
    assert damaged_in_status(output) == set()
    if summary.mix is not None:
        assert set(summary.mix) == {f"{f}-{i:05d}.tar" for f in ("real", "edsam") for i in range(3)}

    # Same size, other bytes: only verify sees it; --repair drops those markers.
    r = runner.invoke(app, ["verify", str(manifest)])
    assert r.exit_code == FAILED, r.output
    corrupt = {k for k, v in plan.items() if v == "corrupt"}
    for folder, shard in corrupt:
        assert f"{shard:05d}.{EXT[folder]}: sha256" in r.output
    r = runner.invoke(app, ["verify", "--repair", str(manifest)])
    assert r.exit_code == PENDING, r.output
    if Storage(output).is_local:
        sizes = json.loads((Path(output) / "mix/sizes.json").read_text())
        assert not {f"{f}-{i:05d}.tar" for f, i in corrupt} & set(sizes)
        links = {p.name for p in (Path(output) / "mix").iterdir()}
        assert not {f"{f}-{i:05d}.tar" for f, i in corrupt} & links
    r = runner.invoke(app, ["status", str(manifest)])
    assert r.exit_code == PENDING, r.output

    summary = run_pipeline(m)
    assert summary.ok and sum(s.done for s in summary.stages.values()) == len(corrupt)
    assert data_snapshot(fs, root, folders) == original, "every shard is byte for byte the original"
    assert markers_of(fs, root, kept) == kept_markers, "whole downstream shards are kept"
    r = runner.invoke(app, ["verify", str(manifest)])
    assert r.exit_code == OK, r.output


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (download, edsam, features, ldfs; 3 shards each) to copy from."""
    from dgaug.job.manifest import validate
    from dgaug.job.run import run_pipeline

    out = tmp_path_factory.mktemp("finished") / "out"
    assert run_pipeline(validate(manifest_dict(str(out)))).ok
    return out


@pytest.mark.slow
def test_damaged_shards_are_found_left_out_and_remade_locally(finished: Path, tmp_path) -> None:
    import fsspec

    out = tmp_path / "out"
    shutil.copytree(finished, out, symlinks=True)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(manifest_dict(str(out))))
    fs = fsspec.filesystem("file")
    check_damage_and_repair(fs, str(out), str(out), manifest, DAMAGE_WITH_LDFS, KEPT_WITH_LDFS)


@pytest.mark.slow
def test_report_lists_damaged_shards_with_the_failed_ones(finished: Path, tmp_path) -> None:
    from dgaug.job.registry import STAGE_CLASSES
    from dgaug.pipeline.status import read_status
    from dgaug.report.collect import read_run
    from dgaug.report.page import run_section

    out = tmp_path / "out"
    shutil.copytree(finished, out, symlinks=True)
    (out / "real/00001.tar").unlink()
    html = run_section(read_run(str(out), read_status, list(STAGE_CLASSES)), {})
    assert "damaged: 00001.tar is missing" in html


def _marker(shard: int, fp: str, size: int) -> dict[str, Any]:
    return {
        "fingerprint": fp,
        "fingerprint_record": {"stage": "toy", "n": fp},
        "samples": 2,
        "failures": {"bad": 1},
        "outputs": {f"{shard:05d}.tar": {"bytes": size, "sha256": "x"}},
    }


def test_index_is_a_cache_the_markers_listing_overrides(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    for i in range(4):
        s.write_bytes(f"toy/{i:05d}.tar", b"x" * 10)
        s.write_json(f"toy/_state/{i:05d}.json", _marker(i, "a", 10))
    first = scan_stage(s, "toy")
    assert (first.read, first.indexed, first.damaged) == (4, 0, {})
    write_index(s, first)
    # A marker rewritten (another fingerprint), one removed, one new, one file truncated: the
    # index must not hide any of it.
    s.write_json("toy/_state/00001.json", _marker(1, "b", 10))
    s.remove("toy/_state/00002.json")
    s.write_bytes("toy/00004.tar", b"y" * 7)
    s.write_json("toy/_state/00004.json", _marker(4, "a", 7))
    s.write_bytes("toy/00003.tar", b"x" * 3)
    again = scan_stage(s, "toy")
    assert (again.read, again.indexed) == (2, 2)
    assert sorted(again.markers) == [0, 1, 3, 4]
    assert again.markers[1]["fingerprint"] == "b" and again.record(1)["n"] == "b"
    assert again.damaged == {3: "00003.tar is 3 bytes, its marker says 10"}
    assert sorted(again.committed("a")) == [0, 4]
    # A broken index costs reads, never a wrong answer.
    s.write_bytes(index_rel("toy"), b"{not json")
    assert sorted(scan_stage(s, "toy").committed()) == [0, 1, 4]
