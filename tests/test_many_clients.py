"""Thousands of virtual clients and an existing Ray cluster (issue 16, item 6).

- A client's data: the pool is partitioned once per process, not once per virtual client (it made
  every client's first call O(clients)), with the same rows as before; the per-process cache of
  clients' data sets is bounded.
- ``clients.ray_address``: validated (errors name the key and the fix); the slow test starts a Ray
  head on loopback, runs ``fedlora simulate`` attached to it and checks that the clients ran as
  actors of that cluster, that the run started no Ray of its own, and that nothing is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from proc_helpers import kill_marked, marked, marker_env, wait_none_marked

from fedlora import data as fdata
from fedlora import rundata
from fedlora.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _spec(n: int, partition: str = "shards", examples: int = 16):
    return load_config(None, [f"clients.num={n}", f'data.partition="{partition}"',
                              f"data.examples_per_client={examples}"]).client_spec()


def _clear_caches() -> None:
    rundata._CLIENT_DATA.clear()
    rundata._partitions.cache_clear()
    rundata._synthetic_pool.cache_clear()


def test_partitioned_once_per_process_same_rows(monkeypatch):
    n = 1000
    spec = _spec(n)
    calls = []
    real = fdata.partition_indices
    monkeypatch.setattr(fdata, "partition_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    _clear_caches()
    pids = [0, 1, 499, 998, 999, 7, 500]
    got = {pid: rundata.client_data(spec, pid, n) for pid in pids}
    assert len(calls) == 1  # one partitioning for all the virtual clients this process serves
    # the rows are what partitioning the whole pool and taking the client's share gives
    pool = rundata.SyntheticTask().generate(spec.data.examples_per_client * n, seed=spec.seed)
    parts = fdata.partition(pool, n, "shards", shards_per_partition=spec.data.shards_per_partition,
                            seed=spec.seed)
    for pid, (train, val) in got.items():
        want_train, want_val = fdata.train_val_split(parts[pid], spec.data.val_fraction, seed=spec.seed + pid)
        for a, b in ((train, want_train), (val, want_val)):
            assert len(a) == len(b) > 0
            torch.testing.assert_close(a.labels, b.labels)
            for k in a.tensors:
                torch.testing.assert_close(a.tensors[k], b.tensors[k])
    _clear_caches()


def test_client_data_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(rundata, "CLIENT_DATA_CACHE", 5)
    _clear_caches()
    spec = _spec(200, "iid")
    first = rundata.client_data(spec, 0, 200)
    for pid in range(1, 12):
        rundata.client_data(spec, pid, 200)
        assert len(rundata._CLIENT_DATA) <= 5
    assert rundata.client_data(spec, 11, 200) is rundata.client_data(spec, 11, 200)  # still cached
    again = rundata.client_data(spec, 0, 200)  # evicted, rebuilt: the same data
    assert again is not first
    torch.testing.assert_close(again[0].labels, first[0].labels)
    _clear_caches()


@pytest.mark.parametrize("address", ["", "auto", "127.0.0.1:6379", "head-0.cluster.local:6379", "[::1]:6380"])
def test_ray_address_accepted(address):
    cfg = load_config(None, [f"clients.ray_address={json.dumps(address)}"])
    assert cfg.clients.ray_address == address


@pytest.mark.parametrize("address, hint", [
    ("127.0.0.1", "host:port"), ("10.0.0.5:0", "host:port"), ("10.0.0.5:99999", "host:port"),
    ("ray://10.0.0.5:10001", "ray://"), ("local", "host:port"), ("auto ", "host:port")])
def test_ray_address_rejected_names_key_and_fix(address, hint):
    with pytest.raises(ValueError) as e:
        load_config(None, [f"clients.ray_address={json.dumps(address)}"])
    msg = str(e.value)
    assert msg.startswith("clients.ray_address:") and repr(address) in msg
    assert "ray start --head" in msg and hint in msg


def test_launcher_hands_the_address_to_ray(monkeypatch, tmp_path):
    """sim.run_flower puts clients.ray_address in RAY_ADDRESS ('' -> 'local': a private instance)."""
    from fedlora import deploy, sim

    seen = []

    class Stop(Exception):
        pass

    def fake_managed(name, cmd, env, log_path, cwd):
        seen.append(env.get("RAY_ADDRESS"))
        raise Stop

    monkeypatch.setattr(deploy, "ManagedProcess", fake_managed)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    for address in ("", "10.0.0.5:6379"):
        with pytest.raises(Stop):
            sim.run_flower({}, 2, ray_address=address)
    assert seen == ["local", "10.0.0.5:6379"]


# ---- an existing Ray cluster -----------------------------------------------------------------------

QUERY = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
jobs = [{"id": j["JobID"], "dead": j["IsDead"], "entry": str(j.get("Entrypoint", ""))} for j in state.jobs()]
actors = [{"cls": a.get("ActorClassName"), "state": a.get("State"), "job": a.get("JobID")}
          for a in state.actors().values()]
print("RESULT " + json.dumps({"jobs": jobs, "actors": actors}))
"""


def _watch(tokens: dict[str, str], seen: dict[str, set], stop: threading.Event) -> None:
    while not stop.is_set():
        for name, tok in tokens.items():
            seen[name].update(cmd for _, cmd in marked(tok))
        stop.wait(0.3)


@pytest.mark.slow
def test_simulate_on_an_existing_ray_cluster(tmp_path):
    from fedlora.deploy import ManagedProcess, free_port, wait_for_port

    cluster_tok, cluster_env = marker_env()
    run_tok, run_env = marker_env()
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), run_env.get("PYTHONPATH", "")) if p)
    run_env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    run_env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short: Ray's socket paths have a limit
    # the head runs under fedlora's reaper (--block keeps `ray start` as the parent of its daemons):
    # stopping it ends the whole cluster; `ray stop` would end every Ray on this machine
    head = ManagedProcess("ray-head", [str(BIN / "ray"), "start", "--head", "--block",
                                       "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                                       f"--temp-dir={ray_tmp}", "--include-dashboard=false",
                                       "--disable-usage-stats"],
                          cluster_env, tmp_path / "ray-head.log", tmp_path)
    seen: dict[str, set] = {"cluster": set(), "run": set()}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=({"cluster": cluster_tok, "run": run_tok}, seen, stop),
                               daemon=True)
    try:
        wait_for_port("127.0.0.1", port, 90, head.proc, "ray start --head")
        watcher.start()
        run_dir = tmp_path / "run"
        res = subprocess.run(
            [str(BIN / "fedlora"), "simulate", "--rounds", "2", "--set", "clients.num=3",
             "--set", "train.local_steps=2", "--set", f"run_dir={json.dumps(str(run_dir))}",
             "--set", f"clients.ray_address={json.dumps(address)}"],
            cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=400)
        stop.set()
        watcher.join()
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + head.tail()
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2] and all(len(r["clients"]) == 3 for r in rows)
        assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
        # the run started no Ray of its own: no GCS / raylet ever ran in its process tree ...
        own = [c for c in seen["run"] if "gcs_server" in c or "raylet" in c]
        assert not own, own
        assert any("flwr-simulation" in c for c in seen["run"])  # (the watcher did see the run)
        # ... its clients ran as actors of the cluster's raylet ...
        assert any("ClientAppActor" in c for c in seen["cluster"]), sorted(seen["cluster"])
        # ... and the cluster's GCS records the run's driver (flwr-simulation, finished) and its actors
        q = subprocess.run([sys.executable, "-c", QUERY, address], cwd=tmp_path, env=cluster_env,
                           capture_output=True, text=True, timeout=120)
        line = [x for x in q.stdout.splitlines() if x.startswith("RESULT ")]
        assert q.returncode == 0 and line, q.stdout[-2000:] + q.stderr[-2000:]
        st = json.loads(line[0][len("RESULT "):])
        sim_jobs = [j for j in st["jobs"] if "flwr-simulation" in j["entry"]]
        assert len(sim_jobs) == 1 and sim_jobs[0]["dead"], st["jobs"]
        actors = [a for a in st["actors"] if a["job"] == sim_jobs[0]["id"]]
        assert actors and all(a["cls"] == "ClientAppActor" and a["state"] == "DEAD" for a in actors), actors
        # the run's processes are all gone, and the cluster outlived the run
        assert wait_none_marked(run_tok, 30) == []
        assert head.alive()
    finally:
        stop.set()
        head.stop()
        left = wait_none_marked(cluster_tok, 30)
        kill_marked(cluster_tok)
        kill_marked(run_tok)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert left == [], left  # stopping the head ended every process of the cluster
