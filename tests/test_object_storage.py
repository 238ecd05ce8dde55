"""Object storage: a whole run writes to a real S3-compatible server on 127.0.0.1 (moto's server
mode), with credentials from the environment; shards appear only whole, the marker last; reruns
resume; the lock holds across processes; sources are read from the store; a wrong endpoint, a
missing bucket or absent credentials give one line, not a traceback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    REPO,
    S3_ENV,
    TINY_EDSAM,
    TINY_FEATURES,
    loopback_server,
    new_bucket,
    s3_fs,
    s3_objects,
    tiny_manifest_dict,
    write_tar,
)

# Every test here talks to the session's S3 server (a moto process): the slow tier.
pytestmark = pytest.mark.slow

TAR_STAGES = {"real": 3, "edsam": 3}
PARQUET_STAGES = {"features": 3}


def _manifest(output: str, **source: Any) -> dict[str, Any]:
    d = tiny_manifest_dict(output)
    d["source"].update(eval_images=12, **source)
    d["stages"]["edsam"] = dict(TINY_EDSAM)
    d["stages"]["features"] = dict(TINY_FEATURES)
    return d


def _dgaug(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dgaug.cli.app", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


class S3Run:
    def __init__(self, bucket: str, cwd: Path, manifest: Path, result: subprocess.CompletedProcess):
        self.bucket, self.cwd, self.manifest, self.result = bucket, cwd, manifest, result
        self.prefix = f"{bucket}/out"
        self.url = f"s3://{self.prefix}"


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, tmp_path_factory) -> S3Run:
    """`dgaug run` of download, edsam and features (3 shards) into s3://BUCKET/out, as a user
    runs it: a separate process, credentials and endpoint from the environment only."""
    bucket = new_bucket("object-storage-run")
    cwd = tmp_path_factory.mktemp("s3run")
    manifest = cwd / "m.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(f"s3://{bucket}/out")))
    result = _dgaug("run", str(manifest), cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return S3Run(bucket, cwd, manifest, result)


def test_run_commits_every_shard_and_marker_to_the_bucket(s3_run: S3Run) -> None:
    objects = s3_objects(s3_run.prefix)
    for folder, n in {**TAR_STAGES, **PARQUET_STAGES}.items():
        ext = "tar" if folder in TAR_STAGES else "parquet"
        for i in range(n):
            marker = json.loads(objects[f"{folder}/_state/{i:05d}.json"])
            assert marker["status"] == "done"
            for name, meta in marker["outputs"].items():
                data = objects[f"{folder}/{name}"]
                # The marker vouches for exactly the bytes in the bucket.
                assert (len(data), hashlib.sha256(data).hexdigest()) == (
                    meta["bytes"],
                    meta["sha256"],
                )
            assert f"{i:05d}.{ext}" in marker["outputs"]
    for folder in TAR_STAGES:
        sizes = json.loads(objects[f"{folder}/sizes.json"])
        assert sorted(sizes) == [f"{i:05d}.tar" for i in range(TAR_STAGES[folder])]
    assert sum(json.loads(objects["real/sizes.json"]).values()) == 24
    assert sum(json.loads(objects["edsam/sizes.json"]).values()) == 48
    # The held-out evaluation images are uploaded too, their `_SUCCESS` written last.
    assert objects["eval/_SUCCESS"].strip() == b"12"
    assert sum(1 for k in objects if k.startswith("eval/images/") and k.endswith(".jpg")) == 12
    # No scratch, no temporaries, nothing written to a local folder named like the bucket.
    assert not [k for k in objects if k.endswith(".tmp") or "/tmp/" in k]
    assert not (s3_run.cwd / s3_run.bucket).exists()
    assert "s3://" in s3_run.result.stdout
    # The run's log is uploaded when it ends.
    logs = [k for k in objects if k.startswith("_dgaug/logs/run-") and k.endswith(".log")]
    assert len(logs) == 1 and b"edsam" in objects[logs[0]]


def test_credentials_from_the_environment_are_nowhere_in_the_output(s3_run: S3Run) -> None:
    objects = s3_objects(s3_run.prefix)
    assert "_dgaug/manifest.yaml" in objects
    for rel, data in objects.items():
        for value in (S3_ENV["AWS_SECRET_ACCESS_KEY"], S3_ENV["AWS_ACCESS_KEY_ID"]):
            assert value.encode() not in data, rel
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in s3_run.result.stdout + s3_run.result.stderr


def test_status_reads_the_bucket(s3_run: S3Run) -> None:
    r = _dgaug("status", str(s3_run.manifest), cwd=s3_run.cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert s3_run.url in r.stdout and "3/3" in r.stdout


def test_rerun_skips_everything_and_a_lost_marker_redoes_only_its_shard(s3_run: S3Run) -> None:
    from dgaug.job.manifest import validate
    from dgaug.job.run import run_pipeline

    before = s3_objects(s3_run.prefix)
    m = validate(yaml.safe_load(s3_run.manifest.read_text()))
    summary = run_pipeline(m)
    assert summary.ok
    assert {n: (s.skipped, s.done) for n, s in summary.stages.items()} == {
        "download": (3, 0),
        "edsam": (3, 0),
        "features": (3, 0),
    }
    # A marker is the commit: without it the shard counts as not done, whatever bytes are there.
    s3_fs().rm_file(f"{s3_run.prefix}/edsam/_state/00001.json")
    summary = run_pipeline(m)
    assert summary.ok
    assert summary.stages["edsam"].done == 1 and summary.stages["edsam"].skipped == 2
    assert summary.stages["features"].done == 0  # its input's bytes did not change
    after = s3_objects(s3_run.prefix)
    for rel, data in before.items():
        if rel.endswith((".tar", ".parquet", "sizes.json")):
            assert after[rel] == data, rel


def test_a_marker_is_one_get_and_a_listing_one_request_per_page(s3_bucket: str) -> None:
    """What status and resume cost on a bucket: a marker read is one GET (no size probe
    first), a listing one request per 1,000 names; sizes, ETags and times are as S3 says."""
    import datetime

    from dgaug.core.storage import Storage

    storage = Storage(f"s3://{s3_bucket}/count")
    storage.write_bytes("st/_state/00000.json", b'{"samples": 3}')
    sent: list[str] = []
    storage.fs.s3.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(request.method)
    )
    assert storage.read_json("st/_state/00000.json") == {"samples": 3}
    assert sent == ["GET"]
    sent.clear()
    listed = storage.list_detail("st/_state")
    assert sent == ["GET"] and listed["00000.json"][0] == 14
    assert listed["00000.json"][1] == hashlib.md5(b'{"samples": 3}').hexdigest()  # its ETag
    with pytest.raises(FileNotFoundError):
        storage.read_json("st/_state/00001.json")
    modified = storage.fs.ls(f"{s3_bucket}/count/st/_state", detail=True)[0]["LastModified"]
    assert isinstance(modified, datetime.datetime) and modified.utcoffset() is not None
    now = datetime.datetime.now(datetime.UTC)
    assert abs((now - modified).total_seconds()) < 600


def test_a_reader_never_sees_a_partial_shard(s3_bucket: str, tmp_path: Path) -> None:
    """A shard big enough for a multipart upload (s3fs: over 2 x 50 MiB) is polled while it is
    committed: it is absent until it is whole, then whole."""
    from dgaug.core.storage import Storage

    storage = Storage(f"s3://{s3_bucket}/out")
    local = tmp_path / "00000.tar"
    size = 110 * 2**20
    local.write_bytes(os.urandom(size))
    seen: list[int | None] = []
    done = threading.Event()

    def poll() -> None:
        fs = s3_fs()
        while not done.is_set():
            try:
                seen.append(fs.info(f"{s3_bucket}/out/edsam/00000.tar")["size"])
            except FileNotFoundError:
                seen.append(None)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        storage.commit_file(str(local), "edsam/00000.tar")
    finally:
        done.set()
        reader.join()
    assert None in seen, "the reader polled while the upload ran"
    assert {s for s in seen if s is not None} <= {size}
    assert storage.size("edsam/00000.tar") == size


def test_lock_on_the_bucket_refuses_a_live_holder_and_takes_over_a_stale_one(
    s3_bucket: str,
) -> None:
    from dgaug.core.storage import Storage
    from dgaug.pipeline.lock import LOCK_REL, LockHeld, RunLock

    storage = Storage(f"s3://{s3_bucket}/out")
    with RunLock(storage) as first:
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            RunLock(Storage(storage.root)).acquire()
        assert storage.read_json(LOCK_REL)["token"] == first.token
    assert not storage.exists(LOCK_REL)

    # A run on another node died: its heartbeat stopped long ago.
    dead = {"host": "node-that-died", "pid": 4242, "token": "old", "heartbeat": time.time() - 3600}
    storage.write_json(LOCK_REL, dead)
    with RunLock(storage) as lock:
        assert lock.took_over == dead
    # ... but one whose heartbeat is fresh is alive, wherever it runs.
    storage.write_json(LOCK_REL, {**dead, "heartbeat": time.time()})
    with pytest.raises(LockHeld, match="node-that-died"):
        RunLock(storage).acquire()


def test_runs_racing_for_the_bucket_lock_leave_exactly_one_holder(s3_bucket: str) -> None:
    from dgaug.core.storage import Storage
    from dgaug.pipeline.lock import LockHeld, RunLock

    root = f"s3://{s3_bucket}/out"
    start = threading.Barrier(6)
    won: list[RunLock] = []
    refused: list[LockHeld] = []

    def take() -> None:
        lock = RunLock(Storage(root), heartbeat_s=3600)
        start.wait()
        try:
            lock.acquire()
            won.append(lock)
        except LockHeld as e:
            refused.append(e)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(refused)) == (1, 5)
    won[0].release()


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    im = Image.new("RGB", (40, 40), ((seed * 40) % 256, 90, 160))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def test_url_list_and_shards_sources_are_read_from_the_bucket(
    s3_bucket: str, tmp_path: Path
) -> None:
    """The url list (a parquet object) and existing webdataset shards live in the bucket too."""
    from http.server import BaseHTTPRequestHandler

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dgaug.job.manifest import validate
    from dgaug.job.run import run_pipeline

    images = {f"/img{i}.jpg": _jpeg(i) for i in range(10)}

    class Images(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    fs = s3_fs()
    with loopback_server(Images) as base:
        table = pa.table(
            {
                "url": [f"{base}{p}" for p in images],
                "caption": [f"picture {i}" for i in range(len(images))],
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fs.pipe_file(f"{s3_bucket}/lists/urls.parquet", buf.getvalue())
        d = tiny_manifest_dict(f"s3://{s3_bucket}/from-list")
        d["source"] = {
            "kind": "url_list",
            "path": f"s3://{s3_bucket}/lists/urls.parquet",
            "input_format": "parquet",
        }
        d["stages"]["download"].update(image_size=32)
        summary = run_pipeline(validate(d))
    assert summary.ok and summary.stages["download"].samples == 10

    for i in range(2):
        tar = tmp_path / f"{i:05d}.tar"
        write_tar(
            tar,
            [
                m
                for k in range(4)
                for m in ((f"s{i}{k}.jpg", _jpeg(k)), (f"s{i}{k}.txt", f"shard {i} {k}".encode()))
            ],
        )
        fs.put_file(str(tar), f"{s3_bucket}/shards/{i:05d}.tar")
    d = tiny_manifest_dict(f"s3://{s3_bucket}/from-shards")
    d["source"] = {"kind": "shards", "path": f"s3://{s3_bucket}/shards/{{00000..00001}}.tar"}
    summary = run_pipeline(validate(d))
    assert summary.ok and summary.stages["download"].samples == 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("problem", ["missing bucket", "unreachable endpoint", "no credentials"])
def test_object_store_problems_are_one_line(s3_endpoint: str, tmp_path: Path, problem: str):
    manifest = tmp_path / "m.yaml"
    bucket = "no-such-bucket" if problem == "missing bucket" else new_bucket("problems")
    manifest.write_text(yaml.safe_dump(tiny_manifest_dict(f"s3://{bucket}/out")))
    env = {"AWS_MAX_ATTEMPTS": "1"}
    if problem == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_free_port()}"
    want = {
        "missing bucket": "the bucket 'no-such-bucket' does not exist",
        "unreachable endpoint": "cannot reach the object store",
        "no credentials": "refused the credentials",
    }[problem]
    for command in ("run", "status"):
        if problem == "no credentials":
            # Nothing else may supply credentials: no profile, no instance metadata lookup.
            env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
            env.update(AWS_EC2_METADATA_DISABLED="true")
            r = _dgaug_without(command, manifest, tmp_path, env, ("AWS_ACCESS_KEY_ID",))
        else:
            r = _dgaug(command, str(manifest), cwd=tmp_path, env=env)
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        out = " ".join((r.stdout + r.stderr).split())
        assert want in out and "Traceback" not in out, (command, out)


def _dgaug_without(
    command: str, manifest: Path, cwd: Path, env: dict[str, str], drop: tuple[str, ...]
) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in drop and k != "AWS_SECRET_ACCESS_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "dgaug.cli.app", command, str(manifest)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**full, "PYTHONPATH": str(REPO), **env},
    )


def test_report_of_the_bucket_run_is_written_to_the_bucket(s3_run: S3Run, tmp_path: Path) -> None:
    r = _dgaug("report", str(s3_run.manifest), "--samples", "3", cwd=s3_run.cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"{s3_run.url}/report/index.html"
    objects = s3_objects(f"{s3_run.prefix}/report")
    assert sorted(objects) == [
        "contact.png",
        "index.html",
        "projection.png",
        "scores.png",  # the ED-SAM scores, read from the bucket's features files
        "throughput.png",
    ]
    page = objects["index.html"].decode()
    # Self-contained: the 3 sources with their 2 samples each are embedded, as are the figures.
    assert page.count("data:image/jpeg;base64,") == 3 * 3
    assert page.count("data:image/png;base64,") == 3
    assert "Complete: all 9" in page and s3_run.url in page
    assert not (s3_run.cwd / s3_run.bucket).exists()


def test_damaged_shards_in_the_bucket_are_found_and_remade(s3_run: S3Run, tmp_path) -> None:
    """Deleted, truncated and same-size corrupted objects of every stage, on a copy of the run:
    status sees the first two from one listing, verify the third, the run remakes them all."""
    from tests.test_damaged import check_damage_and_repair

    fs = s3_fs()
    copy = f"{s3_run.bucket}/damaged"
    for path in fs.find(s3_run.prefix):
        fs.copy(path, f"{copy}/{path.removeprefix(s3_run.prefix + '/')}")
    manifest = tmp_path / "m.yaml"
    d = yaml.safe_load(s3_run.manifest.read_text())
    d["output"] = f"s3://{copy}"
    manifest.write_text(yaml.safe_dump(d))
    check_damage_and_repair(fs, copy, f"s3://{copy}", manifest)
