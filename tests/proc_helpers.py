"""Find the processes a test started, however they detached: by a marker in their environment
(every descendant inherits it; a new session or a re-parenting does not shed it)."""

from __future__ import annotations

import contextlib
import os
import time
import uuid


def marker_env() -> tuple[str, dict]:
    """A fresh marker and the environment that carries it."""
    token = uuid.uuid4().hex
    return token, {**os.environ, "FEDLORA_TEST_MARK": token}


def marked(token: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment holds the marker."""
    needle = f"FEDLORA_TEST_MARK={token}".encode()
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{e}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{e}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if needle in env.split(b"\0") and stat[stat.rfind(b")") + 2:][:1] != b"Z":
            out.append((int(e), cmd))
    return out


def wait_none_marked(token: str, timeout: float) -> list[tuple[int, str]]:
    """Wait until no marked process is alive; return those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := marked(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_marked(token: str) -> None:
    """Clean up after a failed test (so one failure does not leave daemons for the next)."""
    import signal

    for pid, _ in marked(token):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
