"""Headless Chromium for tests: find (or install with apt-get) the browser, load a page through the
DevTools protocol, and evaluate JavaScript in it once it has loaded."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome")
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find() -> str | None:
    return next((p for p in map(shutil.which, NAMES) if p), None)


def install() -> tuple[str | None, str]:
    """Install Debian's chromium when we are root with apt-get; (path or None, what happened)."""
    if os.name != "posix" or os.geteuid() != 0:
        return None, "chromium is not on PATH and we are not root: cannot apt-get install it"
    if not shutil.which("apt-get"):
        return None, "chromium is not on PATH and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    log = []
    for update_first in (False, True):
        if update_first:  # an image with empty package lists: fetch them, then try again
            r = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
            log.append(r.stdout[-1500:] + r.stderr[-1500:])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        log.append(r.stdout[-1500:] + r.stderr[-1500:])
        if r.returncode == 0 and find():
            return find(), "installed with apt-get"
    return None, "apt-get install chromium failed:\n" + "\n".join(log)


class Chromium:
    """One headless browser process, driven over its DevTools websocket (websocket-client)."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0):
        import websocket

        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",  # we run as root, where Chromium's sandbox cannot start
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = self._read_endpoint(timeout)
        # Keep draining stderr, or a chatty browser would block on a full pipe.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read_endpoint(self, timeout: float) -> str:
        lines: list[str] = []
        found: list[str] = []

        def read() -> None:
            for line in self.proc.stderr:
                lines.append(line)
                m = _LISTENING.search(line)
                if m:
                    found.append(m.group(1))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            self.close()
            raise RuntimeError("Chromium did not report its DevTools endpoint:\n" + "".join(lines))
        return found[0]

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Call a DevTools method and return its result; events met meanwhile are kept."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _wait_event(self, method: str, session: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout}s")
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, url: str, expression: str, timeout: float = 60.0) -> tuple[Any, list[str]]:
        """Open `url` in a new tab, wait for its load event, evaluate `expression` there.

        Returns (the expression's value, the URLs of every request the page made).
        """
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        try:
            self.send("Page.enable", session=session)
            self.send("Network.enable", session=session)
            self.send("Page.navigate", {"url": url}, session=session)
            self._wait_event("Page.loadEventFired", session, timeout)
            result = self.send(
                "Runtime.evaluate",
                {"expression": expression, "returnByValue": True, "awaitPromise": True},
                session=session,
            )
            if "exceptionDetails" in result:
                raise RuntimeError(f"the page's script failed: {result['exceptionDetails']}")
            requests = [
                ev["params"]["request"]["url"]
                for ev in self.events
                if ev.get("method") == "Network.requestWillBeSent"
                and ev.get("sessionId") == session
            ]
            return result["result"].get("value"), requests
        finally:
            self.events = [e for e in self.events if e.get("sessionId") != session]
            self.send("Target.closeTarget", {"targetId": target})

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.send("Browser.close")
                except Exception:
                    pass  # the browser may already be gone; the process is ended below
                self.ws.close()
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
