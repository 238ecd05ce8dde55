"""A clean process that runs img2dataset calls for a worker: img2dataset imported once, each call a fork.

img2dataset prints, installs signal handlers and starts processes, so each shard's call runs in a
child process. Where that child comes from matters:
- a fork of the worker copies a Ray driver's or actor's gRPC threads and sockets half-way (in the
  test suite such a fork cut the driver off from Ray's control store and hung the run);
- multiprocessing's forkserver re-imports the caller's `__main__` by path (fails under `python -c`
  or a notebook, and re-runs a script that has no main guard);
- a fresh interpreter per call re-imports img2dataset and torch, seconds per shard.
So each worker starts this module once (`python -m`, single-threaded, img2dataset imported), and
it forks one child per call. It dies with the worker (PR_SET_PDEATHSIG, and EOF on its stdin),
and a child dies with it, so a killed run leaves no process writing into a removed folder.

Protocol: one JSON line per call on stdin ({"kwargs": ..., "log": path}); one JSON line back on
stdout ({"exitcode": n}) when the child has exited. The child writes only to its log file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from typing import IO, Any

# albumentations (imported by img2dataset) asks the network for updates on import: never here.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Launcher:
    """A worker's handle on its launcher process, started on first use; one call at a time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._ensure()

    def _ensure(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
                close_fds=True,
            )
        return self._proc

    def run(self, kwargs: dict[str, Any], log_path: str) -> int:
        """img2dataset.download(**kwargs) in a fresh child, output to log_path; its exit code."""
        with self._lock:
            proc = self._ensure()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps({"kwargs": kwargs, "log": log_path}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except BrokenPipeError:
                line = ""
            if not line:
                code = proc.wait()
                self._proc = None
                raise RuntimeError(f"the img2dataset launcher exited with code {code}")
            return int(json.loads(line)["exitcode"])

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]  # EOF: the launcher exits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_launcher: Launcher | None = None


def launcher() -> Launcher:
    """This process's launcher (one per worker process)."""
    global _launcher
    if _launcher is None:
        _launcher = Launcher()
    return _launcher


# -- in the launcher process


class _NoStatsLogger:
    """Stands in for img2dataset's LoggerProcess: dgaug merges the per-shard stats itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.done_shards: set[int] = set()

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass


def _skip_img2dataset_process_start_up() -> None:
    """Avoid img2dataset's *spawned* processes, each of which re-imports torch (~5 s a call).

    img2dataset starts a spawned stats-logger process and a spawned pool for every call, which
    is fine once per dataset but dominates once per shard. The logger only prints aggregate
    stats (dgaug keeps its own), and the child has one thread with every module loaded, so its
    pool can be forked safely. If a future img2dataset renames these, it spawns as before.
    """
    import importlib
    import multiprocessing

    # By module path: the package re-exports a function named `main` over the module's name.
    main = importlib.import_module("img2dataset.main")
    distributor = importlib.import_module("img2dataset.distributor")
    if hasattr(main, "LoggerProcess"):
        main.LoggerProcess = _NoStatsLogger
    if hasattr(distributor, "get_context"):
        distributor.get_context = lambda *_: multiprocessing.get_context("fork")


# OpenCV's limit on an image's pixels, checked at the header, before any pixel is decoded. Under
# its default (2**30 pixels, 3 GB as BGR) a 50 KB PNG of 20,000 x 20,000 pixels was decoded whole:
# 0.75 GB and 13 s more in the downloading process, then "success". This is PIL's own decompression-bomb threshold (2 * PIL.Image.MAX_IMAGE_PIXELS), the one
# the edsam and features stages meet when they decode, so every stage refuses the same images.
MAX_IMAGE_PIXELS = 178_956_970


class _GuardedCv2:
    """img2dataset's resizer's view of cv2, with `imdecode` made safe for what the web serves.

    img2dataset decodes with `cv2.imdecode(buf, IMREAD_UNCHANGED)`, then:
    - a 16-bit image (PNG, TIFF) stays 16-bit, and `cv2.imencode`'s JPEG writer saturates it to 8
      bits: a white image, counted as a success. Scaled to 8 bits here (x * 255 / 65535).
    - alpha is matted on white in float64 (7.3 GB more at peak for a 100-megapixel RGBA PNG, 0.65
      GB for 9 megapixels). Done here in uint32 row blocks with the same rounding: the same
      pixels, and the returned image has no alpha left for img2dataset to matte.
    - an empty body or an image over the pixel limit fails with OpenCV's assertion text: said
      plainly here, so that `merge.failure_reason` counts them as `empty_image` and
      `image_too_large`.
    Everything else is cv2's own.
    """

    def __init__(self, cv2: Any) -> None:
        self._cv2 = cv2

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cv2, name)

    def imdecode(self, buf: Any, flags: int) -> Any:
        import numpy as np

        if len(buf) == 0:
            raise ValueError("empty image: the body has no bytes")
        try:
            img = self._cv2.imdecode(buf, flags)
        except self._cv2.error as e:
            if "CV_IO_MAX_IMAGE" not in str(e):
                raise
            limit = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS)
            raise ValueError(
                f"image too large: over {limit} pixels, refused before decoding "
                "(decompression bomb guard)"
            ) from None
        if img is None:
            return None
        if img.dtype == np.uint16:
            img = self._cv2.convertScaleAbs(img, alpha=255 / 65535)
        if img.ndim == 3 and img.shape[2] == 4:
            img = _matte_on_white(img)
        return img


def _matte_on_white(bgra: Any) -> Any:
    """uint8 BGRA -> BGR on white: img2dataset's `rint(a/255*c + 255 - a)` in integers.

    (a*c + 255*(255 - a)) / 255 is never a half-integer (255 is odd), so adding 127 and dividing
    rounds exactly as rint does on the float64 value.
    """
    import numpy as np

    h, w = bgra.shape[:2]
    out = np.empty((h, w, 3), np.uint8)
    rows = max(1, (1 << 20) // max(w, 1))  # about a megapixel per block
    for y in range(0, h, rows):
        block = bgra[y : y + rows]
        a = block[..., 3:4].astype(np.uint32)
        out[y : y + rows] = (a * block[..., :3] + 255 * (255 - a) + 127) // 255
    return out


def _guard_img2dataset_decoding() -> None:
    """Bounded, faithful decoding in img2dataset's resizer (see _GuardedCv2).

    The pixel limit is OpenCV's own setting, read when it first decodes, so it also holds for any
    decode this wrapper does not see. If a future img2dataset stops naming `cv2` in its resizer
    module, only the limit applies.
    """
    import importlib

    resizer = importlib.import_module("img2dataset.resizer")
    if hasattr(resizer, "cv2") and not isinstance(resizer.cv2, _GuardedCv2):
        resizer.cv2 = _GuardedCv2(resizer.cv2)


def prepare_img2dataset() -> None:
    """Import img2dataset and set up what each of its calls runs under (the tests use it too)."""
    # Before OpenCV first decodes (it reads the setting once). A limit the user set is kept.
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
    import img2dataset  # noqa: F401

    _skip_img2dataset_process_start_up()
    _guard_img2dataset_decoding()


def _child(kwargs: dict[str, Any], log_path: str) -> int:
    """In the forked child: output to the log, then the call. Returns the exit code."""
    _die_with_parent()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    try:
        from img2dataset import download

        download(**kwargs)
        return 0
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve(parent_pid: int, requests: IO[str], replies: IO[str]) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the worker died before the line above took effect
        return
    prepare_img2dataset()  # once here, so every forked child starts warm
    for line in requests:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(req["kwargs"], req["log"])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"exitcode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.stdin, sys.stdout)
