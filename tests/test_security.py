"""Hostile inputs: YAML tags, pickled model files, tar member paths, URL schemes, credentials.

Safe YAML loading of a manifest file is also checked by tests/test_manifest.py
(test_yaml_is_loaded_safely); here the payload of a tag given through `--set` must not run either.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from dgaug.cli.app import app
from dgaug.core import errors as exitcodes
from dgaug.job.manifest import ManifestError, load_manifest, validate
from dgaug.job.run import run_pipeline
from dgaug.stages.download.urls import SCHEME_NOT_ALLOWED, pre_download_skip, url_scheme
from tests.helpers import tiny_manifest_dict

runner = CliRunner()


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------ YAML


def test_python_tags_are_refused_in_files_and_overrides(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = f"!!python/object/apply:os.mkdir [{str(marker)!r}]"
    p = tmp_path / "m.yaml"
    p.write_text(f"output: {payload}\nsource: {{kind: synthetic}}\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(p)
    ok = _write(tmp_path / "ok.yaml", tiny_manifest_dict(tmp_path / "out"))
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(ok, [f"name={payload}"])
    r = runner.invoke(app, ["validate", str(ok), "--set", f"name={payload}"])
    assert r.exit_code == exitcodes.INVALID and "Traceback" not in r.output, r.output
    assert not marker.exists(), "the tag's payload ran"


# ---------------------------------------------------------------------------------- model files


class _Payload:
    """Unpickling this calls os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_checkpoint(path: Path, marker: Path, fmt: str) -> Path:
    import torch

    obj = {"state_dict": {"visual.proj": _Payload(marker)}}
    if fmt == "torch":
        torch.save(obj, path)
    else:  # a bare pickle (protocol 2, which torch's legacy reader takes), as old tools wrote
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return path


@pytest.mark.parametrize("fmt, name", [("torch", "evil.pt"), ("pickle", "evil.bin")])
def test_clip_checkpoint_that_would_run_code_is_refused(tmp_path: Path, fmt: str, name: str):
    import torch

    from dgaug.models.clip import TINY_ARCH, load_clip
    from dgaug.models.errors import ModelError

    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / name, marker, fmt)
    # The file is live: an unsafe load would run the payload (checked on another marker).
    live = tmp_path / "live"
    _evil_checkpoint(tmp_path / "live.pt", live, "torch")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.is_dir()

    with pytest.raises(ModelError, match=r"refused: unpickling it would run code"):
        load_clip(f"{TINY_ARCH}:{path}")
    assert not marker.exists(), "the checkpoint's payload ran"


@pytest.mark.parametrize(
    "component, weights",
    [
        ("unet", "diffusion_pytorch_model.bin"),  # read by diffusers
        ("text_encoder", "pytorch_model.bin"),  # read by transformers
    ],
)
def test_ldm_folder_with_a_code_running_pickle_is_refused(tmp_path: Path, component, weights):
    from dgaug.models.errors import ModelError
    from dgaug.models.ldm import SUBFOLDERS, load_ldm, tiny_random_components

    parts = tiny_random_components(0)
    folder = tmp_path / "ldm"
    for name in SUBFOLDERS:
        parts[name].save_pretrained(folder / name)
    # The component's weights only as a pickle (.bin), which the libraries fall back to.
    for f in (folder / component).glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"
    _evil_checkpoint(folder / component / weights, marker, "torch")
    with pytest.raises(ModelError, match=rf"{component}.*would run code"):
        load_ldm(str(folder), device="cpu", allow_large_on_cpu=True)
    assert not marker.exists(), "the weights' payload ran"


# -------------------------------------------------------------------------- tar member names


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_shards_source_never_writes_outside_the_output(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    src = tmp_path / "src" / "deep" / "er"
    src.mkdir(parents=True)
    escape = os.path.relpath(outside, src)  # ../../../outside
    tar = src / "00000.tar"
    with tarfile.open(tar, "w") as tf:
        _add(tf, f"{escape}/evil.jpg", _jpeg((200, 0, 0)))
        _add(tf, f"{escape}/evil.txt", b"a caption from above")
        _add(tf, f"{outside}/abs.jpg", _jpeg((0, 200, 0)))  # an absolute name
        _add(tf, f"{outside}/abs.txt", b"an absolute caption")
        _add(tf, "ok/../../sneaky.jpg", _jpeg((0, 0, 200)))
        _add(tf, "ok/../../sneaky.txt", b"sneaky")
        _add(tf, "link.jpg", kind=tarfile.SYMTYPE, link=str(outside / "target.jpg"))
        _add(tf, "hard.jpg", kind=tarfile.LNKTYPE, link="/etc/passwd")
        _add(tf, "dev.jpg", kind=tarfile.CHRTYPE)
        _add(tf, "good.jpg", _jpeg((9, 9, 9)))
        _add(tf, "good.txt", b"a plain sample")
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "out"
    m = validate(tiny_manifest_dict(out, source={"kind": "shards", "path": str(tar)}))
    summary = run_pipeline(m)
    assert summary.ok, summary.stages["download"].errors

    written = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out for p in written), sorted(map(str, written))
    assert sorted(os.listdir(outside)) == [], "nothing landed beside the shards' paths"
    assert not (tmp_path / "sneaky.jpg").exists() and not (tmp_path / "src/sneaky.jpg").exists()

    with tarfile.open(out / "real/00000.tar") as tf:
        members = tf.getmembers()
    names = [x.name for x in members]
    # Re-keyed: digits and an extension, no folder part; links and devices are not samples.
    assert all(x.isfile() for x in members)
    assert all("/" not in n and ".." not in n and n.split(".")[0].isdigit() for n in names), names
    meta = [json.loads(tf_json) for tf_json in _jsons(out / "real/00000.tar")]
    # The source key is kept as a string in the json, never used as a path.
    names = sorted(x["source_key"].rpartition("/")[2] for x in meta)
    assert names == ["abs", "evil", "good", "sneaky"]


def _jsons(path: Path) -> list[bytes]:
    with tarfile.open(path) as tf:
        return [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".json")]


# ---------------------------------------------------------------------------------- URL schemes


@pytest.mark.parametrize(
    "url, scheme",
    [
        ("http://a/x.jpg", "http"),
        ("HTTPS://a/x.jpg", "https"),
        ("  file:///etc/passwd", "file"),
        ("URL:file:///etc/passwd", "file"),  # urllib unwraps this: it is a file URL
        ("<URL:ftp://h/x.jpg>", "ftp"),
        ("data:image/png;base64,AAAA", "data"),
        ("gopher://h:70/x", "gopher"),
        ("s3://bucket/x.jpg", "s3"),
        ("example.com/x.jpg", None),
        ("//h/x.jpg", None),
    ],
)
def test_url_scheme_is_read_as_urllib_reads_it(url: str, scheme: str | None) -> None:
    assert url_scheme(url) == scheme


def test_pre_download_skip_reasons() -> None:
    web = ("http", "https")
    row = {"url": "https://a/x.jpg", "caption": "c"}
    assert pre_download_skip(row, True, web) is None
    assert pre_download_skip({**row, "url": " "}, True, web) == "missing url"
    assert pre_download_skip({**row, "url": "file:///x.jpg"}, True, web) == SCHEME_NOT_ALLOWED
    assert pre_download_skip({**row, "url": "file:///x.jpg"}, True, ("file",)) is None
    assert pre_download_skip({**row, "url": "x.jpg"}, True, web) == "bad url"
    assert pre_download_skip({**row, "caption": ""}, True, web) == "empty caption"
    assert pre_download_skip({**row, "caption": ""}, False, web) is None


def test_allowed_schemes_are_checked(tmp_path: Path) -> None:
    src = {"kind": "url_list", "path": "urls.parquet", "input_format": "parquet"}
    m = validate(tiny_manifest_dict(tmp_path, source=src))
    assert m.source.allowed_schemes == ["http", "https"]
    m = validate(tiny_manifest_dict(tmp_path, source={**src, "allowed_schemes": ["FILE", "http"]}))
    assert m.source.allowed_schemes == ["file", "http"]
    for bad, msg in [(["s3"], "img2dataset fetches only"), ([], "at least one scheme")]:
        with pytest.raises(ManifestError, match=msg) as exc:
            validate(tiny_manifest_dict(tmp_path, source={**src, "allowed_schemes": bad}))
        assert exc.value.problems[0].startswith("source.allowed_schemes: ")


def _png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (30, 30), (10, 200, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def odd_scheme_list(tmp_path: Path) -> tuple[Path, list[dict]]:
    img = tmp_path / "local.jpg"
    img.write_bytes(_jpeg((120, 40, 40), (40, 40)))
    rows = [
        {"url": img.as_uri(), "caption": "a local file"},
        {"url": _png_data_url(), "caption": "an inline image"},
        {"url": "ftp://127.0.0.1:9/x.jpg", "caption": "ftp"},
        {"url": "gopher://127.0.0.1:9/x", "caption": "gopher"},
        {"url": "s3://bucket/x.jpg", "caption": "an object store"},
        {"url": f"URL:{img.as_uri()}", "caption": "a wrapped file url"},
    ]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows


def _seen_by_img2dataset(monkeypatch) -> list[str]:
    from dgaug.stages.download.stage import DownloadStage

    seen: list[str] = []
    real = DownloadStage._run_img2dataset

    def spy(self, kwargs, log_path):
        seen.extend(pq.read_table(kwargs["url_list"]).column("url").to_pylist())
        return real(self, kwargs, log_path)

    monkeypatch.setattr(DownloadStage, "_run_img2dataset", spy)
    return seen


def test_disallowed_schemes_are_counted_skips_never_fetched(
    tmp_path: Path, odd_scheme_list, monkeypatch, caplog
) -> None:
    path, rows = odd_scheme_list
    seen = _seen_by_img2dataset(monkeypatch)
    src = {"kind": "url_list", "path": str(path), "input_format": "parquet"}
    out = tmp_path / "out"
    summary = run_pipeline(validate(tiny_manifest_dict(out, source=src)))
    s = summary.stages["download"]
    assert summary.ok and s.samples == 0, s
    assert s.failures == {SCHEME_NOT_ALLOWED: len(rows)}
    assert seen == [], "img2dataset was given a URL the manifest does not allow"
    marker = json.loads((out / "real/_state/00000.json").read_text())
    assert marker["failures"] == {SCHEME_NOT_ALLOWED: len(rows)}
    status = pq.read_table(out / "real/00000.parquet").to_pylist()
    assert [r["error_message"] for r in status] == [SCHEME_NOT_ALLOWED] * len(rows)
    assert [r["url"] for r in status] == [r["url"] for r in rows], "the refused URL is kept"
    assert "allowed_schemes" in caplog.text  # said once, at planning


def test_schemes_the_manifest_lists_are_fetched(tmp_path: Path, odd_scheme_list, monkeypatch):
    path, rows = odd_scheme_list
    seen = _seen_by_img2dataset(monkeypatch)
    src = {
        "kind": "url_list",
        "path": str(path),
        "input_format": "parquet",
        "allowed_schemes": ["file", "data"],
    }
    summary = run_pipeline(validate(tiny_manifest_dict(tmp_path / "out", source=src)))
    s = summary.stages["download"]
    assert summary.ok and s.samples == 3, s  # the file, the data URL and the wrapped file URL
    assert s.failures == {SCHEME_NOT_ALLOWED: 3}
    assert sorted(seen) == sorted(
        r["url"] for r in rows if url_scheme(r["url"]) in ("file", "data")
    )


# ---------------------------------------------------------------------------------- credentials

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    "field, value",
    [
        ("output", f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"),
        ("output", f"https://h/out?X-Amz-Signature={SECRET}"),
        (
            "source.path",
            f"https://h.example/cc3m.tsv?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}",
        ),
        ("source.path", f"gs://b/list.parquet?token={SECRET}"),
        ("source.path", f"https://acct.blob.core.windows.net/c/l.tsv?sv=2022&sig={SECRET}"),
        ("executor.address", f"ray://admin:{SECRET}@head:10001"),
        ("source.path", f"simplecache::s3://AKIAEXAMPLE:{SECRET}@bucket/x.tsv"),
    ],
)
def test_credentials_in_manifest_urls_are_refused(tmp_path: Path, field: str, value: str) -> None:
    data = tiny_manifest_dict(
        tmp_path / "out", source={"kind": "url_list", "path": "u.tsv", "input_format": "tsv"}
    )
    m = _write(tmp_path / "m.yaml", data)
    for cmd in ("validate", "plan", "run", "status"):
        r = runner.invoke(app, [cmd, str(m), "--set", f"{field}={value}"])
        assert r.exit_code == exitcodes.INVALID, (cmd, r.output)
        assert f"{field}: holds credentials" in r.output and "AWS_ACCESS_KEY_ID" in r.output
        assert SECRET not in r.output, "the secret was echoed"
        assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists(), "nothing was written"


def test_urls_without_secrets_are_accepted(tmp_path: Path) -> None:
    for path in ("sftp://user@host/l.tsv", "https://h/l.tsv?version=3", "s3://bucket/l.tsv"):
        src = {"kind": "url_list", "path": path, "input_format": "tsv"}
        validate(tiny_manifest_dict(tmp_path / "out", source=src))


def test_environment_credentials_never_reach_outputs_or_logs(tmp_path: Path, monkeypatch):
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEENVKEY00",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLESESSIONTOKEN",
        "HF_TOKEN": "hf_EXAMPLEtokenEXAMPLEtoken",
        "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=EXAMPLEazureKEY==",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    m = _write(tmp_path / "m.yaml", tiny_manifest_dict("out"))
    r = runner.invoke(app, ["run", str(m), "-v"])
    assert r.exit_code == exitcodes.OK, r.output
    r2 = runner.invoke(app, ["status", str(m)])
    out = tmp_path / "out"
    assert list((out / "_dgaug/logs").glob("run-*.log")), "the run wrote its log"
    assert (out / "_dgaug/manifest.yaml").is_file()
    for value in env.values():
        assert value not in r.output + r2.output
        for f in out.rglob("*"):
            if f.is_file() and not f.is_symlink():
                assert value.encode() not in f.read_bytes(), f"{value} leaked into {f}"


def test_override_errors_do_not_echo_secrets(tmp_path: Path) -> None:
    m = _write(tmp_path / "m.yaml", tiny_manifest_dict(tmp_path / "out"))
    for item in (f"s3://AKIA:{SECRET}@bucket/x", f"output=s3://AKIA:{SECRET}@b: [", "seed.x=1"):
        r = runner.invoke(app, ["validate", str(m), "--set", item])
        assert r.exit_code == exitcodes.INVALID, r.output
        assert SECRET not in r.output and "Traceback" not in r.output, r.output
