"""Helpers shared by test modules (importable, unlike conftest)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RAY_TOY_SLOTS = 4  # the `toy` custom resource of the session Ray (see conftest)
RAY_GPU_SLOTS = 2  # logical GPUs of the session Ray: scheduling only, nothing runs on them

REPO = Path(__file__).resolve().parent.parent


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
