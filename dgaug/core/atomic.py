"""The one atomic local write: a unique temporary name beside the target, fsync, rename, fsync dir."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def temporary_name(path: str | os.PathLike) -> str:
    """`.NAME.XXXXXXXX.tmp` beside `path`: unique, so two writers never share one, and hidden,
    so globs of shards never match it. `remove_temporaries` finds what a kill left."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write `path` through (for writers that take a file name, such as
    safetensors' save_file): on success it is fsync'd and renamed onto `path`, so a reader sees
    the old file or the whole new one, and the new one survives a power cut; on an error it is
    removed."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through `atomic_path`."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def remove_temporaries(
    folder: str | os.PathLike, name: str | None = None, *, recursive: bool = False
) -> int:
    """Remove the `.NAME.*.tmp` files a killed writer left in `folder` (any name when None)."""
    root = Path(folder)
    if not root.is_dir():
        return 0
    pattern = f".{name}.*.tmp" if name else ".*.tmp"
    found = root.rglob(pattern) if recursive else root.glob(pattern)
    removed = 0
    for p in found:
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
    return removed
