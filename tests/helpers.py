"""Helpers shared by test modules (importable, unlike conftest)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RAY_TOY_SLOTS = 4  # the `toy` custom resource of the session Ray (see conftest)
RAY_GPU_SLOTS = 2  # logical GPUs of the session Ray: scheduling only, nothing runs on them

REPO = Path(__file__).resolve().parent.parent


# Tiny-random model stages on the CPU, one thread each so that their bytes are reproducible.
TINY_EDSAM: dict[str, Any] = {
    "model": "tiny-random",
    "device": "cpu",
    "cpu_threads": 1,
    "samples_per_image": 2,
    "steps": 2,
    "image_size": 32,
}
TINY_FEATURES: dict[str, Any] = {"model": "tiny-random", "device": "cpu", "cpu_threads": 1}
# A short LDFS fit from the photo domain to the other three.
TINY_LDFS: dict[str, Any] = {
    "source_domain": "photo",
    "targets": ["sketch", "cartoon", "painting"],
    "epochs": 2,
}


def tiny_manifest_dict(output: Path | str, **overrides: Any) -> dict[str, Any]:
    """A synthetic-source manifest of 3 shards of 8 images at 32 px: the smallest real run."""
    data: dict[str, Any] = {
        "name": "tiny",
        "output": str(output),
        "seed": 0,
        "shard_size": 8,
        "source": {"kind": "synthetic", "num_images": 24, "image_size": 32},
        "executor": {"kind": "local", "max_attempts": 2},
        "stages": {"download": {"image_size": 32, "threads": 4, "timeout": 5}},
    }
    data.update(overrides)
    return data


@contextlib.contextmanager
def loopback_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> list[tarfile.TarInfo]:
    """A plain tar of (name, bytes) members, as any webdataset writer makes; returns its members
    as read back (offsets included)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return tf.getmembers()


def dgaug_process(*args: str, cwd: Path, text: bool = False) -> subprocess.Popen:
    """`dgaug ARGS` in a new session (so a kill of its group reaches img2dataset's processes),
    stdout and stderr merged into one pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "dgaug.cli.app", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=text,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


# The credentials the S3 tests hand dgaug through the environment; moto accepts any pair.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "dgaug-test-key",
    "AWS_SECRET_ACCESS_KEY": "dgaug-test-secret-0b5c1e",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) in its own process on 127.0.0.1; yields
    its endpoint URL. dgaug finds it as any S3-compatible store: AWS_ENDPOINT_URL and the
    credentials in the environment (set by the caller: see S3_ENV)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(endpoint, timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def new_bucket(hint: str) -> str:
    """Make a new, empty bucket on the S3 server of AWS_ENDPOINT_URL; returns its name."""
    import re
    import uuid

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", hint.lower())[:40].strip("-")
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return bucket


def s3_fs() -> Any:
    """An s3fs filesystem on AWS_ENDPOINT_URL that caches no listing: other processes write too."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def s3_objects(prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` (bucket/path), by path relative to it."""
    fs = s3_fs()
    return {p.removeprefix(prefix + "/"): fs.cat_file(p) for p in fs.find(prefix)}
