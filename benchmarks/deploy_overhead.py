"""Per-round client overhead in a real deployment (SuperLink + SuperNodes on 127.0.0.1, TLS + auth).

A deployed ClientApp process serves one message and exits, so every round a node pays: the process
start (Python + torch + flwr + fedlora imports, up to the handler), the model load (``W0`` memory-
mapped from the node cache after the first round) and the payload apply. The ClientApp reports the
three next to its training time in every reply (``overhead-process-s``, ``overhead-load-s``,
``overhead-apply-s``, ``train-time-s``); this script runs all-MiniLM-L6-v2 on SST-2 and prints
them, per node and round, with the ratio overhead / training (issue 7's target: ≤ 10 %).

    python benchmarks/deploy_overhead.py [--steps 6,48] [--nodes 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from fedlora.deploy import LocalDeployment, NodeSpec
from fedlora.sim import prepare_run_dir

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("overhead-process-s", "overhead-load-s", "overhead-apply-s", "train-time-s")


def run(tmp: Path, steps: int, nodes: int, rounds: int) -> list[dict]:
    from fedlora.config import load_config

    cfg = load_config(ROOT / "simulations" / "sst2-minilm.toml", [
        f"rounds={rounds}", f"clients.num={nodes}", f"train.local_steps={steps}",
        "clients.fraction_train=1.0", "data.limit=1000", "data.server_examples=200",
        f"run_dir={json.dumps(str(tmp / f'run-{steps}'))}", "clients.poll_interval=0.5"])
    path = prepare_run_dir(cfg)
    specs = [NodeSpec({"rank": cfg.rank_for(i), "device": "cpu", "partition-id": i, "num-partitions": nodes,
                       "cache-dir": str(tmp / f"cache-{steps}" / f"node{i}")}) for i in range(nodes)]
    dep = LocalDeployment(tmp / f"dep-{steps}", specs, tls=True, node_auth=True)
    try:
        dep.start(timeout=120)
        res = dep.run(ROOT, {"config-path": str(path)}, timeout=1800)
        if res.returncode != 0:
            raise SystemExit(f"flwr run failed:\n{res.output[-3000:]}")
    finally:
        dep.stop()
    out = []
    for line in (cfg.resolved_run_dir() / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for c in r["clients"]:
            m = c.get("metrics") or {}
            if all(k in m for k in KEYS):
                out.append({"round": r["round"], "rank": c["rank"], **{k: float(m[k]) for k in KEYS}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="6,48", help="local steps per round (comma-separated runs)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    logging.disable(logging.INFO)
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-deploy-overhead-"))
    print(f"# fedlora deployment overhead — {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; all-MiniLM-L6-v2 on SST-2, {a.nodes} nodes "
          f"on one machine, TLS + node auth, batch 32, max 64 tokens")
    print(f"{'steps':>5} {'round':>5} {'rank':>4} {'process s':>9} {'load s':>7} {'apply s':>7} "
          f"{'train s':>8} {'overhead/train':>14}")
    for steps in [int(s) for s in a.steps.split(",")]:
        rows = run(tmp, steps, a.nodes, a.rounds)
        for r in rows:
            over = r["overhead-process-s"] + r["overhead-load-s"] + r["overhead-apply-s"]
            print(f"{steps:>5} {r['round']:>5} {r['rank']:>4} {r['overhead-process-s']:>9.2f} "
                  f"{r['overhead-load-s']:>7.3f} {r['overhead-apply-s']:>7.3f} {r['train-time-s']:>8.2f} "
                  f"{over / r['train-time-s']:>14.2f}")
        later = [r for r in rows if r["round"] > 1]  # the first round also builds the node cache
        if later:
            ratio = statistics.median((r["overhead-process-s"] + r["overhead-load-s"] + r["overhead-apply-s"])
                                      / r["train-time-s"] for r in later)
            print(f"{steps:>5} steps: median overhead / train after round 1 = {ratio:.2f}")


if __name__ == "__main__":
    main()
