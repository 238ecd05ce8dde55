"""Source paths made concrete: globs and lists expanded, file sizes read for the fingerprint."""

from __future__ import annotations

import glob
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
