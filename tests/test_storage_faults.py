"""The output disk filling mid-run, and two runs meeting on one output folder.

A full disk stops the run with one line (exit 1); committed shards stay whole; once space is
freed the same command finishes with the bytes a run on a roomy disk makes. The full disk is a
small tmpfs mounted for the test (root needed; skipped otherwise).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from dgaug.cli.app import app
from dgaug.core import errors as exitcodes
from dgaug.core.storage import Storage
from dgaug.job.manifest import validate
from dgaug.job.run import run_pipeline
from dgaug.pipeline.lock import LOCK_REL, LockHeld, RunLock
from tests.helpers import dgaug_process, tiny_manifest_dict

SHARDS = 6


def _dgaug(*args: str, cwd: Path) -> subprocess.Popen:
    return dgaug_process(*args, cwd=cwd, text=True)


def _manifest(path: Path, output: Path, **overrides) -> Path:
    data = tiny_manifest_dict(
        output, source={"kind": "synthetic", "num_images": 8 * SHARDS, "image_size": 64}
    )
    data["stages"]["download"]["image_size"] = 64
    data.update(overrides)
    path.write_text(yaml.safe_dump(data))
    return path


def _blocks(paths) -> int:
    """Bytes the files take on disk (what a tmpfs counts against its size)."""
    return sum(p.stat().st_blocks * 512 for p in paths if p.is_file() and not p.is_symlink())


def _data_files(out: Path) -> dict[str, bytes]:
    real = out / "real"
    return {p.name: p.read_bytes() for p in sorted(real.iterdir()) if p.is_file()}


def _check_committed(out: Path, reference: dict[str, bytes]) -> int:
    """Every marker's files match its checksums and the reference; every tar reads to its end."""
    markers = sorted((out / "real/_state").glob("[0-9]*.json"))
    markers = [m for m in markers if not m.name.endswith(".error.json")]
    for marker in markers:
        rec = json.loads(marker.read_text())
        for name, meta in rec["outputs"].items():
            data = (out / "real" / name).read_bytes()
            assert len(data) == meta["bytes"], name
            assert hashlib.sha256(data).hexdigest() == meta["sha256"], name
            assert data == reference[name], f"{name} differs from the roomy disk's"
            if name.endswith(".tar"):
                with tarfile.open(out / "real" / name) as tf:
                    n = sum(len(tf.extractfile(m).read()) >= 0 for m in tf if m.isfile())
                assert n == 3 * rec["samples"], name  # jpg, txt, json per sample
    return len(markers)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs at tmp_path/disk; yields a function that sets its size. Unmounted at the end."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size: int, remount: bool = False) -> None:
        opts = f"remount,size={size}" if remount else f"size={size}"
        cmd = ["mount", "-o", opts, str(disk)] if remount else ["mount", "-t", "tmpfs"]
        if not remount:
            cmd += ["-o", opts, "tmpfs", str(disk)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            if remount:
                raise RuntimeError(f"remount failed: {r.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield disk, mount
    finally:
        if os.path.ismount(disk):
            r = subprocess.run(["umount", str(disk)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_disk_full_midway_stops_cleanly_then_resumes_identically(tmp_path, small_disk):
    disk, mount = small_disk
    out = disk / "out"
    m = _manifest(tmp_path / "m.yaml", out)
    # The reference: the same manifest on the roomy disk, at the same path (the synthetic images'
    # file:// URLs, kept in the shards, name it), then moved aside for the small disk.
    assert run_pipeline(validate(yaml.safe_load(m.read_text()))).ok
    ref_out = tmp_path / "ref"
    shutil.move(out, ref_out)
    reference = _data_files(ref_out)

    # Room for the generated source and four shards' files: as a shard's scratch holds its tar
    # twice (img2dataset's, then the merged one), the disk fills after one to three commits.
    base = _blocks((ref_out / "_dgaug").rglob("*"))
    shard = _blocks((ref_out / "real").glob("*")) // SHARDS
    mount(base + 4 * shard)

    p = _dgaug("run", str(m), cwd=tmp_path)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == exitcodes.FAILED, text
    assert "no space left on the output device" in text, text
    assert "free some space and run the same command again" in " ".join(text.split())
    assert "Traceback" not in text and "Exception ignored" not in text, text
    committed = _check_committed(out, reference)
    assert 1 <= committed < SHARDS, f"{committed} shards committed: not a mid-run failure"
    assert not (out / LOCK_REL).exists(), "the lock was released"

    mount(64 << 20, remount=True)
    r = CliRunner().invoke(app, ["run", str(m)])  # in this process: img2dataset is warm here
    assert r.exit_code == exitcodes.OK, r.output
    assert _check_committed(out, reference) == SHARDS
    assert _data_files(out) == reference
    assert not list((out / "_dgaug/tmp").iterdir()), "no scratch left behind"


def test_full_disk_while_taking_the_lock_leaves_no_empty_lock(tmp_path: Path, monkeypatch):
    import builtins

    class FullDisk(io.FileIO):
        def write(self, data):  # the device fills while the lock record is written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode:
            return FullDisk(path, "w")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr("dgaug.core.storage.open", open_on_full_disk, raising=False)
    with pytest.raises(OSError):
        RunLock(Storage(str(tmp_path))).acquire()
    assert not (tmp_path / LOCK_REL).exists()
    assert not [p.name for p in (tmp_path / "_dgaug").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------- concurrency


class _Gate:
    """A local HTTP server whose image requests wait until the test opens the gate."""

    def __init__(self, image: bytes):
        self.open = threading.Event()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                gate.open.wait(120)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.open.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow  # a whole pipeline run, a kill or a subprocess: e2e tier
def test_second_run_process_is_refused_while_the_first_works(tmp_path: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 100, 0)).save(buf, "JPEG")
    gate = _Gate(buf.getvalue())
    first = None
    try:
        urls = tmp_path / "urls.parquet"
        rows = [{"url": f"{gate.url}/{i}.jpg", "caption": f"image {i}"} for i in range(4)]
        pq.write_table(pa.Table.from_pylist(rows), urls)
        src = {"kind": "url_list", "path": str(urls), "input_format": "parquet"}
        data = tiny_manifest_dict(tmp_path / "out", source=src, shard_size=4)
        data["stages"]["download"]["timeout"] = 120
        m = tmp_path / "m.yaml"
        m.write_text(yaml.safe_dump(data))

        first = _dgaug("run", str(m), cwd=tmp_path)
        lock = tmp_path / "out" / LOCK_REL
        deadline = time.time() + 120
        while not lock.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert lock.exists(), first.communicate()[0]
        assert json.loads(lock.read_text())["pid"] == first.pid

        # The first run now waits on the gate, inside its only shard, holding the folder.
        second = _dgaug("run", str(m), cwd=tmp_path)
        text = second.communicate(timeout=120)[0]
        assert second.returncode == exitcodes.REFUSED, text
        flat = " ".join(text.split())
        assert f"pid {first.pid} on {socket.gethostname()}" in flat, text
        assert "Traceback" not in text
        assert first.poll() is None, "the first run was disturbed"

        gate.open.set()
        out = first.communicate(timeout=300)[0]
        assert first.returncode == exitcodes.OK, out
        assert json.loads((tmp_path / "out/real/_state/00000.json").read_text())["samples"] == 4
    finally:
        gate.close()
        if first is not None and first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # its own session: img2dataset's children too
            first.wait()


def test_two_runs_taking_over_one_stale_lock_only_one_wins(tmp_path: Path, monkeypatch):
    """Both see the dead holder; without serialization the slower one would remove the lock the
    faster one had just taken, and both would run."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "_dgaug").mkdir()
    (tmp_path / LOCK_REL).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()})
    )
    real = RunLock.is_stale

    def slow(self, holder):  # the slower run decides long after the faster one took the lock
        time.sleep(0.05 if threading.current_thread().name == "fast" else 0.5)
        return real(self, holder)

    monkeypatch.setattr(RunLock, "is_stale", slow)
    got: dict[str, object] = {}

    def take(name: str) -> None:
        lock = RunLock(Storage(str(tmp_path)), heartbeat_s=3600)
        try:
            lock.acquire()
            got[name] = lock
        except LockHeld as e:
            got[name] = e

    threads = [threading.Thread(target=take, args=(n,), name=n) for n in ("fast", "slow")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [v for v in got.values() if isinstance(v, RunLock)]
    assert len(winners) == 1 and len(got) == 2, got
    assert any(isinstance(v, LockHeld) for v in got.values()), got
    assert json.loads((tmp_path / LOCK_REL).read_text())["token"] == winners[0].token
    winners[0].release()
