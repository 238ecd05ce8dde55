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

from dgaug.core.atomic import remove_temporaries
from dgaug.core.errors import REFUSED, DgaugError
from dgaug.core.storage import DGAUG_DIR, Storage, pid_alive

log = logging.getLogger(__name__)

LOCK_REL = f"{DGAUG_DIR}/lock.json"
GUARD_REL = f"{DGAUG_DIR}/lock.guard"  # flocked while a run takes the lock (local outputs)


class LockHeld(DgaugError):
    """Another live run holds the output folder."""

    exit_code = REFUSED

    def __init__(self, holder: dict[str, Any], path: str):
        self.holder = holder
        super().__init__(
            f"another run is using {path}: pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started_at')} (lock {path}/{LOCK_REL}). Wait for it to finish, "
            "or stop it; a lock whose run died is detected and taken over automatically."
        )


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

    settle_s: float = 0.5  # object stores: how long to wait before reading the lock back

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
            if pid <= 0 or not pid_alive(pid):
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
        if self.storage.is_local:
            # Serialized: two runs that both find a stale lock would otherwise both take it over,
            # the later one removing the lock the earlier one had just made.
            with _acquiring(self.storage.path(GUARD_REL)):
                remove_temporaries(self.storage.path(DGAUG_DIR), os.path.basename(LOCK_REL))
                self._create()
        else:
            self._create()
            # No guard spans hosts: a run that took over a stale lock just before us could have
            # removed ours, or a store without conditional writes let both PUTs through. The
            # lock is the object that is there once the writes settle.
            time.sleep(self.settle_s)
            if (self.read_holder() or {}).get("token") != self.token:
                raise LockHeld(self.read_holder() or {}, self.storage.root)
        self._thread = threading.Thread(target=self._beat, name="dgaug-lock-heartbeat", daemon=True)
        self._thread.start()

    def _create(self) -> None:
        """Create the lock file exclusively; take over a stale one (once); else LockHeld.

        The record is whole when the name appears (a hard link locally, one conditional PUT on
        S3), so `dgaug status` or a second run never reads a half-made lock.
        """
        data = json.dumps(self._record()).encode()
        for _ in range(2):
            if self.storage.create_exclusive(LOCK_REL, data) is not False:
                return
            holder = self.read_holder() or {}
            if holder and not self.is_stale(holder):
                raise LockHeld(holder, self.storage.root)
            self._take_over(holder)
        raise LockHeld(self.read_holder() or {}, self.storage.root)

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
