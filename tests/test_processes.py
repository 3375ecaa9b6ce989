"""No process left behind: the reaper (fedlora/reaper.py) ends everything a command started,
detached grandchildren included, when the command ends, is stopped, or its parent is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proc_helpers import kill_marked, marked, marker_env, wait_none_marked

from fedlora.deploy import reaped

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")

# a command that starts a grandchild in a new session (as Flower's SuperLink starts its superexec),
# prints its pid, then sleeps or exits with code 3
DETACH = ("import subprocess, sys, time; "
          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
          "start_new_session=True); print(p.pid, flush=True); "
          "time.sleep(120) if sys.argv[1] == 'sleep' else sys.exit(3)")


def _wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def test_the_command_exiting_ends_its_detached_children_and_passes_its_exit_code():
    token, env = marker_env()
    try:
        p = subprocess.run(reaped([sys.executable, "-c", DETACH, "exit"]), env=env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 3, p.stderr
        assert p.stdout.strip().isdigit()
        assert wait_none_marked(token, 2) == []
    finally:
        kill_marked(token)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_whole_tree(sig):
    token, env = marker_env()
    try:
        p = subprocess.Popen(reaped([sys.executable, "-c", DETACH, "sleep"]), env=env,
                             stdout=subprocess.PIPE, text=True)
        int(p.stdout.readline())  # the detached grandchild exists
        assert len(marked(token)) == 3  # reaper, command, grandchild
        p.send_signal(sig)
        assert p.wait(timeout=30) == 128 + sig
        assert wait_none_marked(token, 2) == []
    finally:
        kill_marked(token)


def test_kill_9_of_the_parent_ends_the_whole_tree():
    """The parent stands for the `fedlora` command: it dies by SIGKILL, with no chance to clean up."""
    token, env = marker_env()
    parent_code = ("import subprocess, sys; sys.path.insert(0, sys.argv[1]); "
                   "from fedlora.deploy import reaped; "
                   f"subprocess.Popen(reaped([sys.executable, '-c', {DETACH!r}, 'sleep']), "
                   "start_new_session=True).wait()")
    try:
        parent = subprocess.Popen([sys.executable, "-c", parent_code, str(Path(__file__).parents[1])],
                                  env=env)
        assert _wait_for(lambda: len(marked(token)) == 4), marked(token)  # parent, reaper, cmd, grandchild
        parent.kill()
        parent.wait()
        assert wait_none_marked(token, 3) == []
    finally:
        kill_marked(token)


def test_kill_9_of_fedlora_simulate_leaves_no_process_and_no_later_checkpoint(tmp_path):
    """`fedlora simulate` on Flower's engine (SuperLink, superexec, simulation, Ray) is killed with
    SIGKILL once round 1 is in: every process it started is gone, and nothing is written after."""
    token, env = marker_env()
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("fedlora")), "simulate", "--rounds", "40",
           "--set", f'run-dir="{run_dir}"', "--set", "num-clients=2", "--set", "ranks=[2, 4]"]
    metrics = run_dir / "metrics.jsonl"
    try:
        with open(tmp_path / "out.log", "wb") as out:
            p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
            ckpts = run_dir / "checkpoints"  # (the metrics line is written just before the checkpoint)
            assert _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1
                             and ckpts.is_dir() and any(ckpts.iterdir()), 300), \
                (tmp_path / "out.log").read_text()[-3000:]
            names = " ".join(c for _, c in marked(token))
            for daemon in ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet"):
                assert daemon in names, names  # the tree that used to be orphaned is there
            p.kill()
            p.wait()
        assert wait_none_marked(token, 10) == []
        written = (sorted((run_dir / "checkpoints").iterdir()), metrics.read_text())
        time.sleep(3)
        assert (sorted((run_dir / "checkpoints").iterdir()), metrics.read_text()) == written
        assert written[1].count("\n") < 40
    finally:
        kill_marked(token)


@pytest.mark.parametrize("engine", ["inprocess", pytest.param("flower", marks=pytest.mark.slow)])
def test_sigterm_to_fedlora_simulate_says_how_to_continue_and_leaves_no_process(tmp_path, engine):
    token, env = marker_env()
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("fedlora")), "simulate", "--rounds", "200", "--engine", engine,
           "--set", f'run-dir="{run_dir}"', "--set", "num-clients=2", "--set", "ranks=[2, 4]"]
    try:
        with open(tmp_path / "out.log", "wb") as out:
            p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
            ckpts = run_dir / "checkpoints"
            assert _wait_for(lambda: ckpts.is_dir() and any(ckpts.glob("*.ckpt")), 300), \
                (tmp_path / "out.log").read_text()[-3000:]
            p.send_signal(signal.SIGTERM)
            assert p.wait(60) == 143
        said = " ".join((tmp_path / "out.log").read_text().split())
        assert "stopped (SIGTERM): checkpoint round-" in said, said[-2000:]
        assert f"continue with: fedlora simulate --resume {run_dir}" in said
        assert wait_none_marked(token, 10) == []
    finally:
        kill_marked(token)
