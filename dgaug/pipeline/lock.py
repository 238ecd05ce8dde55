"""One run per output folder: a lock file naming its holder, refreshed by a heartbeat, taken over when stale."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from dgaug.pipeline.storage import DGAUG_DIR, Storage

log = logging.getLogger(__name__)

LOCK_REL = f"{DGAUG_DIR}/lock.json"
GUARD_REL = f"{DGAUG_DIR}/lock.guard"  # flocked while a run takes the lock (local outputs)


def _create_whole(path: str, record: dict[str, Any]) -> None:
    """Create `path` holding `record` as JSON, or raise FileExistsError: exclusive, never seen
    empty.

    The JSON goes to a temporary file first, then a hard link gives it the name (atomic, and it
    fails if the name exists), so `dgaug status` or a second run never reads a half-made lock; a
    full disk fails before the name exists, leaving no empty lock behind. Call it holding the
    guard.
    """
    folder, name = os.path.split(path)
    # Only one process is here at a time (the guard): any other such temporary is a dead run's.
    for stale in os.listdir(folder):
        if stale.startswith(f".{name}.") and stale.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, stale))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class LockHeld(Exception):
    """Another live run holds the output folder."""

    def __init__(self, holder: dict[str, Any], path: str):
        self.holder = holder
        super().__init__(
            f"another run is using {path}: pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started_at')} (lock {path}/{LOCK_REL}). Wait for it to finish, "
            "or stop it; a lock whose run died is detected and taken over automatically."
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), so a reused pid is not mistaken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def _acquiring(guard: str) -> Iterator[None]:
    """Hold an exclusive flock on `guard` while the lock is checked and taken (processes of this
    machine, and of others where the filesystem supports flock). Where flock is not supported the
    exclusive create of the lock file alone decides, as before."""
    try:
        fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


class RunLock:
    """Context manager: acquire on enter (or raise LockHeld), heartbeat while held, release on exit."""

    def __init__(
        self, storage: Storage, *, stale_after_s: float = 120.0, heartbeat_s: float = 15.0
    ):
        self.storage = storage
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "proc_start": _proc_start_ticks(os.getpid()),
            "token": self.token,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "heartbeat": time.time(),
        }

    def is_stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            if pid <= 0 or not _pid_alive(pid):
                return True
            start = holder.get("proc_start")
            return start is not None and _proc_start_ticks(pid) not in (None, start)
        # Another host: its liveness is only known through the heartbeat.
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s

    def read_holder(self) -> dict[str, Any] | None:
        try:
            return self.storage.read_json(LOCK_REL)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half-written by a killed run on a store without atomic writes: stale

    def acquire(self) -> None:
        self.storage.makedirs(DGAUG_DIR)
        record = self._record()
        if self.storage.is_local:
            path = self.storage.path(LOCK_REL)
            # Serialized: two runs that both find a stale lock would otherwise both take it over,
            # the later one removing the lock the earlier one had just made.
            with _acquiring(self.storage.path(GUARD_REL)):
                for _ in range(2):
                    try:
                        _create_whole(path, record)
                    except FileExistsError:
                        holder = self.read_holder() or {}
                        if holder and not self.is_stale(holder):
                            raise LockHeld(holder, self.storage.root) from None
                        self._take_over(holder)
                        continue
                    break
                else:
                    raise LockHeld(self.read_holder() or {}, self.storage.root)
        else:
            holder = self.read_holder()
            if holder is not None and holder and not self.is_stale(holder):
                raise LockHeld(holder, self.storage.root)
            if holder is not None:
                self._take_over(holder)
            self.storage.write_json(LOCK_REL, record)
            # Object stores have no exclusive create: read back to learn who won a race.
            time.sleep(0.2)
            if (self.read_holder() or {}).get("token") != self.token:
                raise LockHeld(self.read_holder() or {}, self.storage.root)
        self._thread = threading.Thread(target=self._beat, name="dgaug-lock-heartbeat", daemon=True)
        self._thread.start()

    def _take_over(self, holder: dict[str, Any]) -> None:
        log.warning(
            "taking over a stale lock from pid %s on %s (started %s): that run is gone",
            holder.get("pid"),
            holder.get("host"),
            holder.get("started_at"),
        )
        self.took_over = holder
        self.storage.remove(LOCK_REL)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.read_holder() or {}
                if holder.get("token") != self.token:
                    log.error("the run lock was taken by another process; stopping the heartbeat")
                    return
                holder["heartbeat"] = time.time()
                self.storage.write_json(LOCK_REL, holder)
            except OSError:
                log.warning("could not refresh the run lock", exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.read_holder()
        if holder and holder.get("token") == self.token:
            self.storage.remove(LOCK_REL)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
