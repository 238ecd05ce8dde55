"""One run per output folder: a live holder is named and refused, a dead one is taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dgaug.core.storage import Storage
from dgaug.pipeline.lock import LOCK_REL, LockHeld, RunLock


def test_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    with RunLock(s):
        with pytest.raises(LockHeld) as exc:
            RunLock(s).acquire()
        msg = str(exc.value)
        assert f"pid {__import__('os').getpid()}" in msg and socket.gethostname() in msg
    assert not (tmp_path / LOCK_REL).exists(), "released on exit"
    with RunLock(s):
        pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "_dgaug").mkdir()
    (tmp_path / LOCK_REL).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()})
    )
    lock = RunLock(s)
    with lock:
        assert lock.took_over["pid"] == dead.pid
        assert json.loads((tmp_path / LOCK_REL).read_text())["token"] == lock.token


def test_lock_of_a_live_process_is_held(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "_dgaug").mkdir()
        (tmp_path / LOCK_REL).write_text(
            json.dumps({"host": socket.gethostname(), "pid": live.pid, "heartbeat": time.time()})
        )
        with pytest.raises(LockHeld):
            RunLock(s).acquire()
    finally:
        live.kill()
        live.wait()


def test_other_host_is_stale_only_after_its_heartbeat_stops(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    (tmp_path / "_dgaug").mkdir()
    holder = {"host": "elsewhere", "pid": 1, "heartbeat": time.time()}
    (tmp_path / LOCK_REL).write_text(json.dumps(holder))
    with pytest.raises(LockHeld):
        RunLock(s).acquire()
    holder["heartbeat"] = time.time() - 3600
    (tmp_path / LOCK_REL).write_text(json.dumps(holder))
    with RunLock(s) as lock:
        assert lock.took_over["host"] == "elsewhere"


def test_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    with RunLock(s, heartbeat_s=0.05):
        first = json.loads((tmp_path / LOCK_REL).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / LOCK_REL).read_text())["heartbeat"] > first


def test_lock_on_object_storage() -> None:
    s = Storage("memory://dgaug-lock-test")
    with RunLock(s), pytest.raises(LockHeld):
        RunLock(s).acquire()
    with RunLock(s):
        pass
