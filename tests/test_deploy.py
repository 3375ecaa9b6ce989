"""Loopback deployments on Flower's real engine: SuperLink + SuperNodes on 127.0.0.1, TLS + node auth.

- ``test_launcher_tls_auth_teardown``: the launcher itself, against a throw-away two-file app: TLS,
  node authentication (an unregistered key is refused), node config reaches the ClientApp, a fresh
  ClientApp process per message, and nothing is left running afterwards.
- ``test_deployment_fedex_matches_simulation`` (in test_deploy_fedlora.py style, below): the real
  fedlora apps.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time

import pytest

from fedlora.deploy import LocalDeployment, ManagedProcess, NodeSpec, free_port

pytestmark = pytest.mark.skipif(shutil.which("flower-superlink") is None and not os.path.exists(
    os.path.join(os.path.dirname(os.sys.executable), "flower-superlink")),
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
            os.path.join(os.path.dirname(os.sys.executable), "flower-supernode"),
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
