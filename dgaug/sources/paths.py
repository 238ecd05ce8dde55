"""Source paths made concrete: globs and lists expanded, file sizes read for the fingerprint."""

from __future__ import annotations

import glob
import os
from typing import Any


def expand_paths(path: str | list[str]) -> list[str]:
    """A path, a glob or a list of them -> sorted concrete paths (local only; URLs pass through)."""
    items = [path] if isinstance(path, str) else list(path)
    out: list[str] = []
    for item in items:
        if "://" in item and not item.startswith("file://"):
            out.append(item)
            continue
        local = item.removeprefix("file://")
        matches = sorted(glob.glob(local)) if glob.has_magic(local) else [local]
        out.extend(matches)
    return out


def file_sizes(paths: list[str]) -> list[dict[str, Any]]:
    """Path and size of each file: enough to notice a url list replaced under the same name."""
    import fsspec

    out = []
    for p in paths:
        try:
            info = fsspec.open(p).fs.info(p.removeprefix("file://"))
            out.append({"path": p, "size": info.get("size")})
        except (FileNotFoundError, OSError):
            out.append({"path": p, "size": None})
    return out


def file_stamps(paths: list[str]) -> list[dict[str, Any]]:
    """Path, size and a change stamp of each file, read from a listing (no file is opened).

    The stamp is the modification time in ns for a local file, the ETag (or md5, or modification
    time) an object store reports for a remote one: a file rewritten under the same name and size
    gets a new stamp.
    """
    import fsspec

    out = []
    for p in paths:
        try:
            info = fsspec.open(p).fs.info(p.removeprefix("file://"))
        except (FileNotFoundError, OSError):
            out.append({"path": p, "size": None, "stamp": None})
            continue
        if "://" not in p or p.startswith("file://"):
            stamp: Any = os.stat(p.removeprefix("file://")).st_mtime_ns
        else:
            stamp = next(
                (
                    str(info[k])
                    for k in ("ETag", "etag", "md5", "LastModified", "mtime")
                    if info.get(k)
                ),
                None,
            )
        out.append({"path": p, "size": info.get("size"), "stamp": stamp})
    return out


def file_digest(path: str) -> str | None:
    """sha256 of a local file's bytes (None for a remote one: its ETag stands in)."""
    import hashlib

    if "://" in path and not path.startswith("file://"):
        return None
    h = hashlib.sha256()
    with open(path.removeprefix("file://"), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
