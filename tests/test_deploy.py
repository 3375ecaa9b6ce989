"""Loopback deployments on Flower's real engine: SuperLink + SuperNodes on 127.0.0.1, TLS + node auth.

- ``test_launcher_tls_auth_teardown``: the launcher itself, against a throw-away two-file app: TLS,
  node authentication (an unregistered key is refused), node config reaches the ClientApp, and
  nothing is left running afterwards (~35 s).
- ``test_the_deploy_script_itself_completes_like_the_simulation`` (``deploy/run_local_tls.sh``, as
  documented) and the slow ``test_node_killed_and_resynced`` (the launcher): the real fedlora apps
  (skipped until ``server/app.py`` and ``clients/app.py`` exist); see
  ``APP_CONTRACT`` below for what they rely on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedlora.deploy import LocalDeployment, ManagedProcess, NodeSpec, free_port

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink") is None and not (BIN / "flower-superlink").exists(),
    reason="flwr deployment binaries not installed")

TRIVIAL_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "trivialapp"
version = "0.1.0"
description = "launcher test"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedlora-tests"

[tool.flwr.app.components]
serverapp = "trivialapp.server:app"
clientapp = "trivialapp.client:app"

[tool.flwr.app.config]
num-server-rounds = 1
out = ""
"""

TRIVIAL_CLIENT = """
import os
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    arrays = [a + float(context.node_config["rank"]) for a in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"num-examples": 1, "rank": int(context.node_config["rank"]),
                            "pid": os.getpid()})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)
"""

TRIVIAL_SERVER = """
import json
import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context):
    n = 2
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n,
                      min_train_nodes=n)
    res = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(3)]),
                         num_rounds=int(context.run_config["num-server-rounds"]))
    metrics = {int(k): dict(v) for k, v in res.train_metrics_clientapp.items()}
    with open(context.run_config["out"], "w") as f:
        json.dump({"arrays": res.arrays.to_numpy_ndarrays()[0].tolist(), "metrics": metrics}, f)
"""


def _write_trivial_app(root):
    pkg = root / "trivialapp"
    pkg.mkdir(parents=True)
    (root / "pyproject.toml").write_text(TRIVIAL_PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "client.py").write_text(textwrap.dedent(TRIVIAL_CLIENT))
    (pkg / "server.py").write_text(textwrap.dedent(TRIVIAL_SERVER))
    return root


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # pragma: no cover
        return False
    # a zombie leader keeps the group "alive" until init reaps it: accept zombies only
    try:
        with open(f"/proc/{pgid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _assert_all_gone(pgids, timeout=10.0):
    deadline = time.monotonic() + timeout
    left = list(pgids)
    while left and time.monotonic() < deadline:
        left = [g for g in left if not _group_gone(g)]
        time.sleep(0.2)
    assert not left, f"process groups still running after teardown: {left}"


def test_launcher_tls_auth_teardown(tmp_path):
    app = _write_trivial_app(tmp_path / "app")
    out = tmp_path / "result.json"
    nodes = [NodeSpec({"rank": 2, "device": "cpu"}), NodeSpec({"rank": 8, "device": "cpu"})]
    dep = LocalDeployment(tmp_path / "dep", nodes, tls=True, node_auth=True)
    pgids = []
    try:
        t0 = time.monotonic()
        dep.start(timeout=90)
        start_s = time.monotonic() - t0
        pgids = [dep.superlink.pid] + [p.pid for p in dep.supernodes.values()]
        assert dep.certs is not None and (dep.flwr_home / "config.toml").exists()
        assert "--enable-supernode-auth" in dep.superlink.cmd and "--insecure" not in dep.superlink.cmd

        # a node whose key was never registered is refused (exit code 305 in flwr 1.41/1.42)
        from fedlora.certs import make_node_key

        rogue_key, _ = make_node_key(tmp_path / "rogue")
        rogue = ManagedProcess("rogue", [
            str(BIN / "flower-supernode"),
            "--superlink", dep.address, "--root-certificates", str(dep.certs.ca_cert),
            "--auth-supernode-private-key", str(rogue_key), "--port", str(free_port()),
            "--max-retries", "1", "--node-config", "rank=4"], dep.env, dep.logs / "rogue.log", tmp_path)
        pgids.append(rogue.pid)
        try:
            rc = rogue.proc.wait(timeout=60)
        finally:
            rogue.stop()
        # Flower logs its exit code 305 ("Failed to activate SuperNode"); the process exits with 1
        assert rc != 0 and "Exit Code: 305" in rogue.log_path.read_text(), rogue.tail()

        res = dep.run(app, {"out": str(out)}, timeout=120)
        assert res.returncode == 0, res.output[-4000:]
        result = json.loads(out.read_text())
        # FedAvg of (0 + 2) and (0 + 8) with equal weights: the node config reached each ClientApp
        assert result["arrays"] == [5.0, 5.0, 5.0]
        print(f"\n[deploy timings] start {start_s:.1f} s ({dep.timings}), 1 round run "
              f"{res.wall_s:.1f} s")
    except Exception:
        for name, text in dep.logs_text().items():
            print(f"--- {name} ---\n{text[-3000:]}")
        raise
    finally:
        dep.stop()
    _assert_all_gone(pgids)
    assert not any(p.alive() for p in dep.supernodes.values()) and not dep.superlink.alive()


# ---- the real fedlora apps ------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
#: What these tests rely on from server/app.py, clients/app.py and `fedlora simulate`:
APP_CONTRACT = """
- run config keys (declared in [tool.flwr.app.config], settable with `flwr run -c` and
  `fedlora simulate --set`): strategy, num-server-rounds, seed, run-dir (absolute output folder;
  empty = runs/<name>), round-timeout (seconds a round waits for replies), min-nodes;
- node config keys: rank, device, partition-id, num-partitions, cache-dir (the ClientApp keeps its
  base in fedlora.node_cache.NodeCache(cache-dir));
- at the end of a run the ServerApp writes <run-dir>/global_delta.safetensors ({layer: W - W0})
  and <run-dir>/metrics.jsonl (one line per round, per-client rows under "clients" carrying the
  ClientApp metrics overhead-process-s, overhead-load-s, overhead-apply-s, train-time-s).
"""
HAVE_APPS = (ROOT / "server" / "app.py").exists() and (ROOT / "clients" / "app.py").exists()
needs_apps = pytest.mark.skipif(not HAVE_APPS, reason="server/app.py + clients/app.py not built yet")
RANKS = (2, 4, 8)
RUN = {"strategy": "fedex", "num-server-rounds": 2, "seed": 0, "min-nodes": 3}


def _nodes(cache_root: Path) -> list[NodeSpec]:
    return [NodeSpec({"rank": r, "device": "cpu", "partition-id": i, "num-partitions": len(RANKS),
                      "cache-dir": str(cache_root / f"node{i}")}) for i, r in enumerate(RANKS)]


def _global_delta(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "global_delta.safetensors"))


def _simulate(tmp_path: Path, run: dict) -> Path:
    """The same run through `fedlora simulate` (Flower's simulation engine)."""
    run_dir = tmp_path / "sim-run"
    sets = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in
            {**run, "run-dir": str(run_dir), "num-clients": len(RANKS),
             "ranks": "[" + ",".join(map(str, RANKS)) + "]"}.items()]
    cmd = [str(BIN / "fedlora"), "simulate", str(ROOT / "simulations" / "smoke.toml")]
    for kv in sets:
        cmd += ["--set", kv]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "sim-flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def _overhead_table(run_dir: Path) -> str:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for c in rec.get("clients", []):
            m = c.get("metrics", c)
            rows.append((rec.get("round"), c.get("rank", m.get("rank")),
                         *(float(m.get(k, float("nan"))) for k in (
                             "overhead-process-s", "overhead-load-s", "overhead-apply-s", "train-time-s"))))
    lines = ["round rank process_s load_s apply_s train_s overhead/train"]
    for r in rows:
        over = r[2] + r[3] + r[4]
        lines.append(f"{r[0]} {r[1]} {r[2]:.2f} {r[3]:.3f} {r[4]:.3f} {r[5]:.2f} {over / r[5]:.2f}")
    return "\n".join(lines)


def _dump_logs(dep: LocalDeployment) -> None:
    for name, text in dep.logs_text().items():
        print(f"--- {name} ---\n{text[-4000:]}")


def _free_port_run(n: int) -> int:
    """A port p such that p, p+1, ..., p+n-1 are free on 127.0.0.1 now (the script's node ports)."""
    import random
    import socket

    for _ in range(200):
        p = random.randint(20000, 60000 - n)
        try:
            for q in range(p, p + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


@needs_apps
def test_the_deploy_script_itself_completes_like_the_simulation(tmp_path):
    """``deploy/run_local_tls.sh`` as the README runs it (TLS + node auth, 3 SuperNodes of ranks
    2/4/8, the smoke defaults; only strategy, rounds, seed and run dir given): it completes, leaves
    no process behind, and its global delta equals the simulation's for the same seed and partitions."""
    import torch
    from proc_helpers import kill_marked, marker_env, wait_none_marked

    run_dir = tmp_path / "deploy-run"
    token, env = marker_env()
    env.update(WORK=str(tmp_path / "work"), SUPERLINK_PORT=str(free_port()),
               NODE_PORT0=str(_free_port_run(3)), DEVICE="cpu", PYTHON=sys.executable,
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    run = {k: v for k, v in RUN.items() if k != "min-nodes"}  # the script passes min-nodes itself
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**run, "run-dir": str(run_dir)}.items())
    try:
        res = subprocess.run(["bash", str(ROOT / "deploy" / "run_local_tls.sh"), "-c", overrides], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=400)
        logs = "".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted((tmp_path / "work" / "logs").glob("*.log")))
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:] + logs
        assert json.loads((run_dir / "summary.json").read_text())["rounds"] == RUN["num-server-rounds"]
        print(f"\n[deploy script] 2 rounds, 3 nodes\n{_overhead_table(run_dir)}")
        assert wait_none_marked(token, 10) == []  # no flwr-serverapp (or anything else) left running
    finally:
        kill_marked(token)
    deployed = _global_delta(run_dir)
    simulated = _global_delta(_simulate(tmp_path, RUN))
    assert set(deployed) == set(simulated) and deployed
    for k in deployed:
        torch.testing.assert_close(deployed[k], simulated[k], rtol=1e-5, atol=1e-6, msg=k)


def _wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path} after {timeout:.0f} s")


@pytest.mark.slow
@needs_apps
def test_node_killed_and_resynced(tmp_path):
    """Node 2 is SIGKILLed while training in round 1: round 1 completes with the other two after the
    round timeout; node 2 restarts with an EMPTY cache before round 2 (as soon as the SuperLink lets
    its old session go), re-syncs from base version 0, and ends round 2 in sync with the others."""
    import torch

    from fedlora.node_cache import read_safetensors

    cache = tmp_path / "cache"
    run_dir = tmp_path / "deploy-run"
    dep = LocalDeployment(tmp_path / "dep", _nodes(cache), tls=True, node_auth=True)
    try:
        dep.start(timeout=90)
        # round 1 waits for the dead node up to the timeout: long enough for Flower to drop the
        # crashed session (≤ 2 heartbeats of 30 s) and for the node to come back before round 2
        run = dep.run(ROOT, {**RUN, "run-dir": str(run_dir), "round-timeout": 100, "min-nodes": 3},
                      background=True)
        node2_log = dep.logs / "node2.log"
        _wait_for(node2_log, "Receiving: train message", 180)
        dep.kill_node(2)  # mid round 1: SuperNode and its ClientApp die, no reply
        shutil.rmtree(cache / "node2", ignore_errors=True)  # and it comes back with nothing
        dep.restart_node(2, timeout=90)
        dep.wait_nodes_online(60)
        res = dep.wait_run(run, timeout=400)
        assert res.returncode == 0, res.output[-4000:]
    except Exception:
        _dump_logs(dep)
        raise
    finally:
        dep.stop()
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    r1, r2 = rounds
    # round 1 went on without the dead node (its row says why) and stayed exact
    assert sorted(c["id"] for c in r1["clients"] if c["accepted"]) == ["client-0", "client-1"]
    dead = next(c for c in r1["clients"] if c["id"] == "client-2")
    assert not dead["accepted"] and dead.get("error") and r1["failures"]
    assert r1["aggregation_error"] < 1e-4
    # round 2: all three, the restarted node re-synced from W0 (a full reset delta, far more bytes)
    assert all(c["accepted"] for c in r2["clients"]) and r2["aggregation_error"] < 1e-4, json.dumps(r2)[:2000]
    down = {c["id"]: c["bytes_down"] for c in r2["clients"]}
    assert down["client-2"] > down["client-0"]
    # in sync: every node's cached base (version 1, after its round-2 payload) is exactly what the
    # server's version-1 state gives a node of its rank starting from W0: base_g + its rank tail,
    # so W0 + D + s·B̄[:, :r]·Ā[:r] = W_g. Node 2 got there through the re-sync, 0 and 1 step by step.
    from fedlora.checkpoint import load_checkpoint
    from server.app import FedLoraStrategy, resolve_config

    server = FedLoraStrategy(resolve_config({**RUN, "run-dir": str(tmp_path / "check")}), tmp_path / "check")
    server.fl.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "round-0001.ckpt").state["strategy"])
    for i, rank in enumerate(RANKS):
        (f,) = sorted((cache / f"node{i}").glob("*/base.safetensors"))
        tensors, meta = read_safetensors(f)
        assert int(meta["version"]) == server.fl.version == 1
        (want,) = server.fl.payload(f"client-{i}", rank, 0).base_deltas
        assert want.reset and set(tensors) == set(want.layers)
        for k, t in tensors.items():
            torch.testing.assert_close(t, want.layers[k].to_dense().float(), rtol=1e-5, atol=1e-6,
                                       msg=f"node{i} {k}")


def test_the_fab_carries_the_apps_and_nodes_import_their_installed_fedlora(tmp_path):
    """What `flwr run` ships to a node: the two apps, not the library, configs, tests or docs.
    A ClientApp process puts the installed FAB first on sys.path; fedlora must then still come from
    the node's installation, whose package data (the Shakespeare texts: .txt, which a FAB cannot
    carry) is there."""
    import zipfile
    from io import BytesIO

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(Path(__file__).resolve().parents[1])
    names = {n for n in zipfile.ZipFile(BytesIO(fab)).namelist() if not n.startswith(".info/")}
    assert {"clients/app.py", "server/app.py", "pyproject.toml"} <= names
    assert {n.split("/")[0] for n in names} == {"clients", "server", "pyproject.toml"}

    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    probe = textwrap.dedent(f"""
        import sys
        from flwr.cli.install import install_from_fab
        app_dir = install_from_fab({fab!r}, skip_prompt=True)
        sys.path.insert(0, str(app_dir))  # what Flower's load_app does in a ClientApp process
        import clients.app, fedlora.shakespeare
        assert clients.app.__file__.startswith(str(app_dir)), clients.app.__file__
        assert not fedlora.__file__.startswith(str(app_dir)), fedlora.__file__
        assert fedlora.shakespeare.PLAYS_DIR.is_dir(), fedlora.shakespeare.PLAYS_DIR
        print("ok")
    """)
    # cwd outside the checkout: `python -c` puts the working directory first on sys.path
    res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_the_library_version_names_the_code_not_only_the_release(tmp_path):
    """The string a node reports at its capability query: equal for the same code wherever it is
    installed, different when any module differs (the release number alone would not be)."""
    import fedlora
    from fedlora.version import PACKAGE, code_fingerprint, library_version

    copy = tmp_path / "fedlora"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    assert code_fingerprint(copy) == code_fingerprint() and len(code_fingerprint()) == 12
    assert library_version() == f"{fedlora.__version__}+{code_fingerprint()}"
    edited = copy / "strategies" / "fedavg.py"
    edited.write_text(edited.read_text() + "\n# one more line\n")
    assert code_fingerprint(copy) != code_fingerprint()


def test_each_node_of_the_local_deployment_gets_its_own_data_path():
    from fedlora.deploy import node_configs

    nodes = node_configs([2, 4], "cpu", "data/node{i}.jsonl")
    assert [(n["partition-id"], n["rank"], n["data-path"]) for n in nodes] == [
        (0, 2, "data/node0.jsonl"), (1, 4, "data/node1.jsonl")]
    assert "data-path" not in node_configs([2])[0]
