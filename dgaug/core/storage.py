"""The output folder on local disk or any fsspec store, with writes that a reader never sees half done."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec

from dgaug.core.atomic import atomic_write, fsync_dir
from dgaug.core.errors import FAILED, INVALID, DgaugError

# Everything dgaug keeps for itself (lock, plan, scratch, generated sources) lives under this folder.
DGAUG_DIR = "_dgaug"
TMP_DIR = f"{DGAUG_DIR}/tmp"
PLAN_REL = f"{DGAUG_DIR}/plan.json"  # what a run planned: stages, shards, fingerprints


class StorageError(DgaugError):
    """The output location cannot be opened (unknown protocol, its fsspec package missing, an
    object store that cannot be reached, a missing bucket, refused credentials)."""

    exit_code = INVALID


# Exception class names of botocore / aiobotocore (s3fs) and gcsfs/adlfs cousins, matched by name
# so that this module imports none of them.
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError")
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId")


def store_problem(exc: BaseException, root: str) -> str | None:
    """One line saying why the object store at `root` refused us, or None if `exc` is not that:
    an unreachable endpoint, missing or refused credentials, a bucket that does not exist."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        text = (str(e).splitlines() or [name])[0][:300]
        if name in _UNREACHABLE:
            return f"output {root}: cannot reach the object store: {text}"
        if (
            name in _NO_CREDENTIALS
            or "InvalidAccessKeyId" in text
            or "SignatureDoesNotMatch" in text
        ):
            return (
                f"output {root}: the object store refused the credentials ({text}). dgaug reads "
                "them from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE; "
                "AWS_ENDPOINT_URL for an S3-compatible server) or the node's role."
            )
        if isinstance(e, PermissionError) and not e.filename:
            return f"output {root}: access denied by the object store ({text})"
        e = e.__cause__ or e.__context__
    return None


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


class DiskFull(OSError, DgaugError):
    """The output (or scratch) device is full: no shard can be made until space is freed, so the
    run stops instead of failing every remaining shard in turn."""

    exit_code = FAILED

    def __init__(self, where: str):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), where)

    def lines(self) -> list[str]:
        return [
            f"error: no space left on the output device ({self.filename or 'output'}). Committed "
            "shards are intact; free some space and run the same command again."
        ]


def _parse_timestamp(text: str) -> Any:
    """botocore's timestamp parser, with a fast path for the ISO 8601 form S3 listings use:
    botocore parses each with dateutil, which is most of the client's CPU in a 1,000-key
    listing page (0.17 of 0.29 s measured); the value is the same aware datetime."""
    if "T" in text:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(text)
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    return DEFAULT_TIMESTAMP_PARSER(text)


@functools.cache
def _s3_session() -> Any:
    """One aiobotocore session per process for s3fs, whose response parser uses
    _parse_timestamp (botocore's public parser defaults). One object, so fsspec's instance
    cache, keyed by the options, still reuses the filesystem."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=_parse_timestamp
    )
    return session


class Storage:
    """A root folder (local path or fsspec URL) and the few operations the pipeline needs."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") or "/"
        # Other processes (Ray workers, another host) write to an object store output: a cached
        # listing would hide their shards and markers from this one.
        protocol = fsspec.utils.get_protocol(self.root)
        local = protocol in ("file", "local")
        options: dict[str, Any] = {} if local else {"use_listings_cache": False}
        if protocol in ("s3", "s3a"):
            options["session"] = _s3_session()
        try:
            self.fs, base = fsspec.core.url_to_fs(self.root, **options)
        except ImportError as e:  # "Install s3fs to access S3"
            raise StorageError(f"output {self.root}: {e}") from None
        except ValueError as e:  # "Protocol not known: x"
            raise StorageError(f"output {self.root}: {e}") from None
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.protocols: tuple[str, ...] = tuple(protocols)
        self.is_local = "file" in protocols or "local" in protocols
        self.base = os.path.abspath(base) if self.is_local else base.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])

    def check(self) -> None:
        """Fail early, in one line, if an object store output cannot be used: its endpoint is
        unreachable, the credentials are refused, or the bucket does not exist."""
        if self.is_local:
            return
        try:
            self.fs.ls(self.base, detail=False, refresh=True)
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                top = self.base.split("/", 1)[0]
                raise StorageError(
                    f"output {self.root}: the bucket {top!r} does not exist; create it first, or "
                    "fix `output`"
                ) from None
            # Only the output folder is missing: the run's first write makes it.
        except Exception as e:
            raise StorageError(store_problem(e, self.root) or f"output {self.root}: {e}") from None

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
        if "s3" in self.protocols:
            # One GET: by default s3fs first asks the size (a HEAD) to choose ranged reads,
            # which doubles the requests of reading many small markers.
            return self.fs.cat_file(self.path(rel), max_concurrency=1)
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

    def list_detail(self, rel: str) -> dict[str, tuple[int, str]]:
        """Files in folder `rel` -> (size, stamp): one listing (on an object store, one request
        per 1,000 names), no request per file. The stamp changes whenever the file is rewritten
        (local: size, mtime and inode, as an atomic write makes a new inode; object stores:
        the ETag, else size and modification time), so a cache keyed by it can be trusted."""
        out: dict[str, tuple[int, str]] = {}
        if self.is_local:
            try:
                with os.scandir(self.path(rel)) as it:
                    for e in it:
                        if e.is_file(follow_symlinks=False):
                            st = e.stat(follow_symlinks=False)
                            out[e.name] = (st.st_size, f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
            except (FileNotFoundError, NotADirectoryError):
                pass
            return out
        try:
            entries = self.fs.ls(self.path(rel), detail=True, refresh=True)
        except FileNotFoundError:
            return out
        for e in entries:
            if e.get("type") == "directory":
                continue
            size = int(e.get("size") or 0)
            etag = e.get("ETag") or e.get("etag") or e.get("md5")
            stamp = (
                str(etag).strip('"')
                if etag
                else f"{size}:{e.get('LastModified') or e.get('mtime')}"
            )
            out[e["name"].rstrip("/").rsplit("/", 1)[-1]] = (size, stamp)
        return out

    def list_sizes(self, rel: str) -> dict[str, int]:
        """Files in folder `rel` -> size, from one listing: list_detail without the stamps, for
        folders of shards, where only the sizes are compared (a third of the cost locally)."""
        if not self.is_local:
            return {name: size for name, (size, _) in self.list_detail(rel).items()}
        out: dict[str, int] = {}
        try:
            with os.scandir(self.path(rel)) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        out[e.name] = e.stat(follow_symlinks=False).st_size
        except (FileNotFoundError, NotADirectoryError):
            pass
        return out

    def open_read(self, rel: str) -> Any:
        """A binary file object streaming `rel` (for hashing shards without holding them)."""
        return self.fs.open(self.path(rel), "rb")

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    # -- writes (each is all-or-nothing for a reader)
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_local:
            atomic_write(self.path(rel), data)
        else:
            # One PUT: an object store shows the object only once it is whole.
            self.fs.pipe_file(self.path(rel), data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def create_exclusive(self, rel: str, data: bytes) -> bool | None:
        """Create `rel` holding `data` only if it does not exist: True if made, False if it
        existed. None where the store offers no conditional create (the object was written
        anyway; the caller must read it back to learn whether another writer won).

        Local: a temporary file hard-linked into place (atomic, fails if the name exists, never
        seen empty). S3 and compatible stores: a PUT with `If-None-Match: *`.
        """
        if self.is_local:
            path = self.path(rel)
            folder, name = os.path.split(path)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return True
        try:
            self.fs.pipe_file(self.path(rel), data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError):
            self.fs.pipe_file(self.path(rel), data)  # this store knows no create mode
            return None
        # s3fs sends If-None-Match: *, which the store decides atomically; fsspec's generic
        # create mode checks existence first and then writes, which two writers can both pass.
        return True if "s3" in self.protocols else None

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
            fsync_dir(os.path.dirname(dest))
        else:
            # One object: a single PUT, or a multipart upload that the store shows only once it
            # is completed, so a reader never sees part of it. A killed upload leaves no object.
            self.fs.put_file(local_path, self.path(rel))

    def upload_tree(self, local_dir: str, rel: str) -> int:
        """Copy the files under `local_dir` to `rel/` (same relative paths); returns the count."""
        n = 0
        for folder, _, names in os.walk(local_dir):
            for name in sorted(names):
                src = os.path.join(folder, name)
                dest = os.path.relpath(src, local_dir).replace(os.sep, "/")
                if self.is_local:
                    os.makedirs(os.path.dirname(self.path(f"{rel}/{dest}")), exist_ok=True)
                    shutil.copyfile(src, self.path(f"{rel}/{dest}"))
                else:
                    self.fs.put_file(src, self.path(f"{rel}/{dest}"))
                n += 1
        return n

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
        return tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{token}-")

    def clean_scratch(self) -> int:
        """Remove what killed runs left in the scratch folder; returns how many entries went."""
        if not self.is_local:
            return clean_dead_local_scratch()
        root = self.path(TMP_DIR)
        entries = os.listdir(root) if os.path.isdir(root) else []
        for e in entries:
            p = os.path.join(root, e)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
        return len(entries)

    def clean_stray_temporaries(self, rel: str, *, recursive: bool = False) -> int:
        """Remove `.name.xxxx.tmp` files that an atomic write killed half-way left in `rel` (and,
        if `recursive`, in its subfolders). Call it under the run lock. Local outputs only: on an
        object store every write is one PUT or a multipart upload, which leave no object when
        killed, so there is nothing to remove, and listing a stage folder there costs a request
        per 1,000 shards (a rerun at 41,000 shards per stage would list everything twice)."""
        if not self.is_local:
            return 0
        if recursive:
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


_SCRATCH_PREFIX = "dgaug-"


def clean_dead_local_scratch() -> int:
    """Remove this machine's scratch folders (object store outputs) whose process is gone.

    Each is `dgaug-<stage>-<shard>.<pid>.<hex>-*` in the temp folder (Storage.scratch_dir); a
    killed worker runs no `finally`, so on a long run its partial shards would fill the disk.
    """
    root = tempfile.gettempdir()
    n = 0
    for name in os.listdir(root):
        if not name.startswith(_SCRATCH_PREFIX):
            continue
        parts = name[len(_SCRATCH_PREFIX) :].split(".")
        if len(parts) < 3 or not parts[1].isdigit() or pid_alive(int(parts[1])):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        n += 1
    return n


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
