"""Run a command so that nothing it starts outlives it, or outlives the process that asked for it.

Flower's daemons detach their children: ``flower-superlink`` starts ``flower-superexec`` in a new
session, which starts ``flwr-serverapp`` / ``flwr-simulation``, which starts Ray's ``gcs_server``,
``raylet`` and workers. Killing a process group therefore misses most of a run, and an orphaned
ServerApp goes on writing checkpoints. So every daemon fedlora starts runs under this reaper::

    python fedlora/reaper.py --parent PID -- CMD [ARG ...]

The reaper is a Linux *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): a descendant whose
parent exits is re-parented to the reaper, not to init, so the whole tree stays visible under it,
however it detaches. It ends that tree

- when CMD exits: leftovers get SIGTERM, then SIGKILL after a grace period; the exit code is CMD's;
- on SIGTERM, SIGINT or SIGHUP: the same, then it exits 128 + the signal;
- on SIGUSR1 (``ManagedProcess.kill``, a simulated crash), or when its parent ``PID`` is gone —
  the ``fedlora`` command was killed, even with ``kill -9``: SIGKILL at once, until nothing is
  left (a killed run must not go on and write).

It imports nothing from fedlora (it starts in milliseconds) and is run as a file, not a module.
Elsewhere than Linux it still waits and signals, but cannot adopt detached grandchildren.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.1
GRACE_S = 5.0


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (from /proc; empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields and fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(e))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Reaper:
    def __init__(self, cmd: list[str], parent: int) -> None:
        self.parent = parent
        self.rc: int | None = None
        self.stop_signal: int | None = None
        self.child = subprocess.Popen(cmd)

    def reap(self) -> None:
        """Collect exited children (adopted orphans too); record CMD's exit code."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child.pid:
                self.rc = os.waitstatus_to_exitcode(status)
                self.child.returncode = self.rc

    def end_tree(self, grace: float) -> None:
        """SIGTERM every descendant once, SIGKILL all that are left after ``grace`` s (at once if 0);
        repeat until none is left (a process may fork while it is being ended)."""
        deadline, asked = time.monotonic() + grace, set()
        while True:
            self.reap()
            pids = descendants(os.getpid())
            if not pids:
                return
            hard = time.monotonic() >= deadline
            for pid in pids:
                if hard or pid not in asked:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
                    asked.add(pid)
            time.sleep(0.05)

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent

    def run(self) -> int:
        while True:
            self.reap()
            if self.stop_signal == signal.SIGUSR1 or self.parent_gone():
                self.end_tree(0)
                return self.rc if self.rc is not None else 137
            if self.stop_signal is not None:
                self.end_tree(GRACE_S)
                return 128 + self.stop_signal
            if self.rc is not None:
                self.end_tree(GRACE_S)
                return self.rc
            time.sleep(POLL_S)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        print("usage: reaper.py --parent PID -- CMD [ARG ...]", file=sys.stderr)
        return 2
    become_subreaper()
    reaper = Reaper(argv[3:], int(argv[1]))

    def on_signal(signum, _frame) -> None:
        reaper.stop_signal = signum

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(s, on_signal)
    return reaper.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
