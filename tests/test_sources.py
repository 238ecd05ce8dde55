"""Sources other than url lists: image folders (as file:// url lists) and existing webdataset shards."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dgaug.job.manifest import ImageFolderSource, validate
from dgaug.job.run import run_pipeline
from dgaug.sources import SourceError
from dgaug.sources.image_folder import list_image_folder
from dgaug.sources.shards import expand_shards
from dgaug.stages.download.ingest import _iter_samples
from dgaug.stages.download.urls import sample_key
from tests.helpers import write_tar

DOMAINS = ("photo", "sketch")
CLASSES = ("cat", "dog")


def _image(color: tuple[int, int, int], fmt: str = "JPEG", size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def _samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    with tarfile.open(path) as tf:
        members = [
            (m.name.partition(".")[0], m.name.partition(".")[2], tf.extractfile(m).read())
            for m in tf.getmembers()
        ]
    keys = [k for k, _, _ in members]
    assert [k for k, _ in itertools.groupby(keys)] == sorted(set(keys))  # adjacent, in order
    return [(k, {e: d for _, e, d in g}) for k, g in itertools.groupby(members, lambda m: m[0])]


# ----------------------------------------------------------------------------------- image folder


@pytest.fixture
def folder(tmp_path) -> Path:
    """root/<domain>/<class>/{0,1}.jpg, plus things that are not images of a class."""
    root = tmp_path / "pacs"
    for d, domain in enumerate(DOMAINS):
        for c, cls in enumerate(CLASSES):
            sub = root / domain / cls
            sub.mkdir(parents=True)
            # Written in reverse order: the listing sorts.
            for i in (1, 0):
                (sub / f"{i}.jpg").write_bytes(_image((80 * d, 120 * c, 60 * i)))
            (sub / "notes.txt").write_text("not an image")
        (root / domain / "stray.jpg").write_bytes(_image((1, 2, 3)))  # not in a class folder
    (root / "README.md").write_text("a file beside the domains")
    return root


def _folder_src(root: Path, **kw) -> ImageFolderSource:
    return ImageFolderSource(kind="image_folder", path=str(root), **kw)


def test_list_image_folder_sorted_with_labels_domains_captions(folder):
    table = list_image_folder(_folder_src(folder))
    rows = table.to_pylist()
    assert table.column_names == ["url", "caption", "label", "domain"]
    expected = [(d, c, i) for d in DOMAINS for c in CLASSES for i in (0, 1)]
    assert [(r["domain"], r["label"]) for r in rows] == [(d, c) for d, c, _ in expected]
    assert [r["url"] for r in rows] == [
        (folder / d / c / f"{i}.jpg").resolve().as_uri() for d, c, i in expected
    ]
    assert all(r["url"].startswith("file:///") for r in rows)
    assert [r["caption"] for r in rows] == [f"a {d} of a {c}" for d, c, _ in expected]


def test_list_image_folder_template_and_domain_restriction(folder):
    src = _folder_src(folder, domains=["sketch"], caption_template="{label}, drawn as a {domain}")
    rows = list_image_folder(src).to_pylist()
    assert {r["domain"] for r in rows} == {"sketch"}
    assert len(rows) == len(CLASSES) * 2
    assert rows[0]["caption"] == "cat, drawn as a sketch"


def test_list_image_folder_errors(folder, tmp_path):
    with pytest.raises(SourceError) as exc:
        list_image_folder(_folder_src(folder, domains=["sketch", "painting"]))
    assert exc.value.problems == [
        f"source.domains: ['painting'] not found under {folder} (has ['photo', 'sketch'])"
    ]
    with pytest.raises(SourceError, match="source.path: not a folder"):
        list_image_folder(_folder_src(tmp_path / "nowhere"))
    (tmp_path / "empty" / "photo" / "cat").mkdir(parents=True)
    with pytest.raises(SourceError, match="source.path: no images"):
        list_image_folder(_folder_src(tmp_path / "empty"))
    # The same problems before a run, as `dgaug run` checks them.
    m = validate(
        {
            "output": str(tmp_path / "o"),
            "source": {"kind": "image_folder", "path": str(folder), "domains": ["art"]},
        }
    )
    assert m.source.problems()[0].startswith("source.domains: ['art'] not found")


def test_image_folder_end_to_end_keeps_label_and_domain(folder, tmp_path):
    out = tmp_path / "out"
    summary = run_pipeline(
        validate(
            {
                "output": str(out),
                "shard_size": 5,
                "source": {"kind": "image_folder", "path": str(folder)},
                "executor": {"max_attempts": 1},
                "stages": {"download": {"image_size": 16, "threads": 2}},
            }
        )
    )
    s = summary.stages["download"]
    assert summary.ok, s.errors
    n = len(DOMAINS) * len(CLASSES) * 2
    assert (s.planned, s.done, s.samples, s.failures) == (2, 2, n, {})
    seen = []
    for shard in range(2):
        for key, files in _samples(out / "real" / f"{shard:05d}.tar"):
            assert set(files) == {"jpg", "txt", "json"}
            meta = json.loads(files["json"])
            assert meta["key"] == key and key.isdigit()
            assert meta["label"] in CLASSES and meta["domain"] in DOMAINS
            assert files["txt"].decode() == f"a {meta['domain']} of a {meta['label']}"
            assert meta["url"].endswith(
                f"/{meta['domain']}/{meta['label']}/{Path(meta['url']).name}"
            )
            seen.append((meta["domain"], meta["label"]))
    assert seen == [(d, c) for d in DOMAINS for c in CLASSES for _ in (0, 1)]
    assert json.loads((out / "real" / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 3}
    # The generated url list lives under the output's own folder.
    assert list((out / "_dgaug" / "source").glob("image_folder-*/urls.parquet"))


# ----------------------------------------------------------------------------- existing shards


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> list[int]:
    """A plain tar (as any webdataset writer makes); returns each member's data offset."""
    return [m.offset_data for m in write_tar(path, members)]


JPG_A, JPG_B, JPG_C, JPG_D = (_image((i * 50, 10, 200)) for i in range(4))
PNG = _image((9, 9, 9), "PNG")


@pytest.fixture
def shards(tmp_path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    _write_tar(
        d / "00000.tar",
        [
            ("sample_a.jpg", JPG_A),
            ("sample_a.txt", b"a cat on a mat"),
            ("sample_a.json", json.dumps({"source_label": "cat", "key": "sample_a"}).encode()),
            ("sample_b.jpg", JPG_B),  # no txt
            ("sample_c.txt", b"no image here"),  # no image
            ("sample_d.png", PNG),
            ("sample_d.txt", b"  a png  "),
            ("sample_e.jpg", JPG_C),
            ("sample_e.txt", b"   "),  # blank caption
        ],
    )
    full = d / "full.tar"
    offsets = _write_tar(
        full,
        [
            ("x1.jpg", JPG_A),
            ("x1.txt", b"first"),
            ("x2.jpg", JPG_B),
            ("x2.txt", b"second"),
            ("x3.jpg", JPG_C),
            ("x3.txt", b"third"),
            ("x4.jpg", JPG_D),
            ("x4.txt", b"fourth"),
        ],
    )
    # Cut in the middle of x3's image: x1 and x2 survive, x3 is damaged, x4 is gone.
    data = full.read_bytes()
    (d / "00001.tar").write_bytes(data[: offsets[4] + len(JPG_C) // 2])
    full.unlink()
    return d


def test_shards_source_end_to_end(shards, tmp_path):
    out = tmp_path / "out"
    data = {
        "output": str(out),
        "source": {"kind": "shards", "path": f"{shards}/{{00000..00001}}.tar"},
        "executor": {"max_attempts": 1},
    }
    summary = run_pipeline(validate(data))
    s = summary.stages["download"]
    assert summary.ok, s.errors
    assert (s.planned, s.done, s.samples) == (2, 2, 4)
    assert s.failures == {"empty_caption": 2, "missing_image": 1, "truncated_tar": 1}

    real = out / "real"
    # Shard 0: new digit keys by position in the source tar; the source key kept in json.
    got = _samples(real / "00000.tar")
    assert [k for k, _ in got] == [sample_key(0, 0), sample_key(0, 3)]
    (k0, f0), (k3, f3) = got
    assert set(f0) == {"jpg", "txt", "json"} and f0["jpg"] == JPG_A  # bytes as they were
    assert f0["txt"] == b"a cat on a mat"
    meta = json.loads(f0["json"])
    assert meta == {"source_label": "cat", "key": k0, "source_key": "sample_a"}
    assert set(f3) == {"png", "txt", "json"} and f3["png"] == PNG
    assert f3["txt"] == b"a png"
    assert json.loads(f3["json"]) == {"key": k3, "source_key": "sample_d"}

    status = pq.read_table(real / "00000.parquet").to_pylist()
    assert [(r["key"], r["source_key"], r["status"], r["error_message"]) for r in status] == [
        (sample_key(0, 0), "sample_a", "success", None),
        (sample_key(0, 1), "sample_b", "skipped", "empty_caption"),
        (sample_key(0, 2), "sample_c", "skipped", "missing_image"),
        (sample_key(0, 3), "sample_d", "success", None),
        (sample_key(0, 4), "sample_e", "skipped", "empty_caption"),
    ]

    # Shard 1: what came before the damage is kept; the damage is counted, the run goes on.
    got = _samples(real / "00001.tar")
    assert [(k, f["txt"]) for k, f in got] == [
        (sample_key(1, 0), b"first"),
        (sample_key(1, 1), b"second"),
    ]
    assert [json.loads(f["json"])["source_key"] for _, f in got] == ["x1", "x2"]
    status = pq.read_table(real / "00001.parquet").to_pylist()
    assert [(r["source_key"], r["status"], r["error_message"]) for r in status] == [
        ("x1", "success", None),
        ("x2", "success", None),
        ("x3", "skipped", "truncated_tar"),
    ]

    for shard, failures in [
        (0, {"empty_caption": 2, "missing_image": 1}),
        (1, {"truncated_tar": 1}),
    ]:
        marker = json.loads((real / "_state" / f"{shard:05d}.json").read_text())
        assert marker["failures"] == failures
        assert marker["samples"] + sum(failures.values()) == marker["counts"]["inputs"]
        stats = json.loads((real / f"{shard:05d}_stats.json").read_text())
        assert (stats["damage"] is not None) == (shard == 1)
    assert json.loads((real / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2}

    # Again: nothing to do, nothing changed.
    before = {p.name: p.read_bytes() for p in real.iterdir() if p.is_file()}
    again = run_pipeline(validate(data))
    assert again.stages["download"].skipped == 2 and again.stages["download"].done == 0
    assert {p.name: p.read_bytes() for p in real.iterdir() if p.is_file()} == before


def _tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> tuple[bytes, list[tarfile.TarInfo]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return data, tf.getmembers()


@pytest.mark.parametrize(
    "where, kept, lost",
    [
        ("whole", ["s0", "s1", "s2"], None),
        # A cut on a header boundary or inside a header: tarfile alone would see a whole archive.
        ("at_header_between_samples", ["s0"], "s1"),
        ("inside_header", ["s0"], "s1"),
        ("inside_data_of_first_member", ["s0", "s1"], "s2"),
        ("inside_data_of_second_member", ["s0", "s1"], "s2"),
        ("no_end_blocks", ["s0", "s1"], "s2"),
    ],
)
def test_truncation_anywhere_is_detected(where, kept, lost):
    data, members = _tar_bytes(
        [(f"s{i}", {"jpg": bytes([i]) * 3000, "txt": f"caption {i}".encode()}) for i in range(3)]
    )
    by_name = {m.name: m for m in members}
    cut = {
        "whole": len(data),
        "at_header_between_samples": by_name["s2.jpg"].offset,
        "inside_header": by_name["s2.jpg"].offset + 100,
        "inside_data_of_first_member": by_name["s2.jpg"].offset_data + 1000,
        "inside_data_of_second_member": by_name["s2.txt"].offset_data + 3,
        "no_end_blocks": by_name["s2.txt"].offset_data + 512,
    }[where]
    samples, damage, lost_key = _iter_samples(io.BytesIO(data[:cut]))
    assert [k for k, _ in samples] == kept
    assert (damage is None) == (where == "whole")
    assert lost_key == lost
    for k, files in samples:
        assert files == {"jpg": bytes([int(k[1])]) * 3000, "txt": f"caption {k[1]}".encode()}


def test_expand_shards(shards):
    paths = expand_shards(f"{shards}/{{00000..00001}}.tar")
    assert paths == [f"{shards}/00000.tar", f"{shards}/00001.tar"]
    assert expand_shards(f"{shards}/*.tar") == paths
    with pytest.raises(SourceError, match="no shard matches"):
        expand_shards(f"{shards}/*.tgz")
    # A brace pattern names files: a missing one is a source error before any work.
    with pytest.raises(SourceError) as exc:
        expand_shards(f"{shards}/{{00000..00003}}.tar")
    assert exc.value.problems == [
        f"source.path: 2 of 4 shard(s) not found: {shards}/00002.tar, {shards}/00003.tar"
    ]
