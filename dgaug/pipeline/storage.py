"""The output folder on local disk or any fsspec store, with writes that a reader never sees half done."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec

# Everything dgaug keeps for itself (lock, plan, scratch, generated sources) lives under this folder.
DGAUG_DIR = "_dgaug"
TMP_DIR = f"{DGAUG_DIR}/tmp"


def _fsync_dir(path: str) -> None:
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


def atomic_write_local(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary name in the same folder, fsync, then rename."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


class StorageError(Exception):
    """The output location cannot be opened (unknown protocol, its fsspec package missing)."""


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("no space left on device", "disk quota exceeded")


def disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it however it was wrapped (a worker's error text, a library
    that re-raised), is a device or quota running out of space."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


class DiskFull(OSError):
    """The output (or scratch) device is full: no shard can be made until space is freed, so the
    run stops instead of failing every remaining shard in turn."""

    def __init__(self, where: str):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), where)


class Storage:
    """A root folder (local path or fsspec URL) and the few operations the pipeline needs."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") or "/"
        try:
            self.fs, base = fsspec.core.url_to_fs(self.root)
        except ImportError as e:  # "Install s3fs to access S3"
            raise StorageError(f"output {self.root}: {e}") from None
        except ValueError as e:  # "Protocol not known: x"
            raise StorageError(f"output {self.root}: {e}") from None
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols
        self.base = os.path.abspath(base) if self.is_local else base.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])

    # -- paths
    def path(self, rel: str = "") -> str:
        """Path of `rel` as the filesystem object understands it."""
        return f"{self.base}/{rel}" if rel else self.base

    def url(self, rel: str = "") -> str:
        """A location another program can open: a local path, or protocol://path."""
        if self.is_local:
            return self.path(rel)
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{proto}://{self.path(rel)}"

    # -- reads
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def list(self, rel: str) -> list[str]:
        """Base names in folder `rel`; empty if it does not exist."""
        if self.is_local:
            try:
                return sorted(os.listdir(self.path(rel)))
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    # -- writes (each is all-or-nothing for a reader)
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_local:
            atomic_write_local(self.path(rel), data)
        else:
            # One PUT: an object store shows the object only once it is whole.
            self.fs.pipe_file(self.path(rel), data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def commit_file(self, local_path: str, rel: str) -> None:
        """Move a finished local file to `rel`, so that `rel` appears only whole."""
        if self.is_local:
            dest = self.path(rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(local_path, "rb+") as f:
                os.fsync(f.fileno())
            try:
                os.replace(local_path, dest)
            except OSError:
                # Scratch on another filesystem: copy next to the target first, then rename.
                tmp = f"{dest}.{uuid.uuid4().hex[:8]}.tmp"
                shutil.copyfile(local_path, tmp)
                os.replace(tmp, dest)
            _fsync_dir(os.path.dirname(dest))
        else:
            self.fs.put_file(local_path, self.path(rel))

    def remove(self, rel: str) -> None:
        try:
            if self.is_local:
                os.unlink(self.path(rel))
            else:
                self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def remove_tree(self, rel: str) -> None:
        if self.is_local:
            shutil.rmtree(self.path(rel), ignore_errors=True)
        elif self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)

    # -- scratch space
    def scratch_dir(self, name: str) -> str:
        """A fresh local folder for one attempt's outputs; on the same disk as the output if local."""
        token = f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        if self.is_local:
            d = Path(self.path(TMP_DIR)) / token
            d.mkdir(parents=True, exist_ok=False)
            return str(d)
        return tempfile.mkdtemp(prefix=f"dgaug-{token}-")

    def clean_scratch(self) -> int:
        """Remove what killed runs left in the scratch folder; returns how many entries went."""
        if not self.is_local:
            return 0
        root = self.path(TMP_DIR)
        entries = os.listdir(root) if os.path.isdir(root) else []
        for e in entries:
            p = os.path.join(root, e)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
        return len(entries)

    def clean_stray_temporaries(self, rel: str, *, recursive: bool = False) -> int:
        """Remove `.name.xxxx.tmp` files that an atomic write killed half-way left in `rel` (and,
        if `recursive`, in its subfolders: local outputs only). Call it under the run lock."""
        if recursive and self.is_local:
            n = 0
            for folder, _, names in os.walk(self.path(rel)):
                for name in names:
                    if name.startswith(".") and name.endswith(".tmp"):
                        try:
                            os.unlink(os.path.join(folder, name))
                            n += 1
                        except FileNotFoundError:
                            pass
            return n
        n = 0
        for name in self.list(rel):
            if name.endswith(".tmp"):
                self.remove(f"{rel}/{name}")
                n += 1
        return n
