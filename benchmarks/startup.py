"""Start-up of ``fedlora simulate`` against Flower's own minimal app, started the same way.

Both sides: a fresh process that starts a local simulation SuperLink and runs ``flwr run`` on it
(``fedlora.sim.run_flower``: what ``fedlora simulate`` does), 6 simulated SuperNodes,
``client-resources-num-cpus=1`` (two Ray actors on 2 cores).

- ``fedlora``: ``fedlora simulate simulations/smoke.toml --rounds R`` (tiny model, 6 clients of
  ranks 2/4/8, 10 local steps of batch 32, FedEx, server-side evaluation);
- ``minimal``: ``benchmarks/minimal_flower_app`` (the ``flwr new`` PyTorch layout: FedAvg, a small
  MLP, 8 local steps of batch 32, client-side evaluation), launched by ``python -c`` calling the
  same ``run_flower``.

Both ClientApps append a timestamp to ``$FEDLORA_TRACE_DIR`` when a train message reaches them and
when they reply. Printed, per side (median of ``--runs`` runs, the two sides interleaved):

- ``first train``: launch → the first train message reaching a client (CLI, SuperLink, FAB
  install, ServerApp start and set-up, Ray and the actors' start; fedlora also asks every node
  for its capabilities first, one QUERY message each);
- ``round 1``: the first train message received → the last round-1 train reply sent (the clients'
  side of round 1: actors' imports, model and data building; the server's polling interval, 0.2 s
  for fedlora and 3 s for Flower's grid, is not in it);
- ``to round 1 done``: the sum: launch → every round-1 client has replied;
- ``wall``: the whole process (``--rounds`` rounds, shut-down included).

    python benchmarks/startup.py [--runs 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = ROOT / "benchmarks" / "minimal_flower_app"
CLIENTS = 6


def _events(trace_dir: Path) -> tuple[list[float], list[float]]:
    recv, done = [], []
    for p in trace_dir.glob("trace-*"):
        for line in p.read_text().splitlines():
            ev, t = line.split()[:2]
            (recv if ev == "train-recv" else done).append(float(t))
    return sorted(recv), sorted(done)


def run_once(side: str, tmp: Path, i: int, rounds: int) -> dict:
    trace = tmp / f"{side}-{i}" / "trace"
    trace.mkdir(parents=True)
    env = {**os.environ, "FEDLORA_TRACE_DIR": str(trace), "PYTHONPATH": str(ROOT)}
    if side == "fedlora":
        cmd = [sys.executable, "-m", "fedlora.cli", "simulate", str(ROOT / "simulations" / "smoke.toml"),
               "--rounds", str(rounds), "--set", f'run_dir="{tmp / f"{side}-{i}" / "run"}"']
    else:
        code = ("import sys; from fedlora.sim import run_flower; "
                f"r = run_flower({{'num-server-rounds': {rounds}}}, {CLIENTS}, 1, app_dir={str(MINIMAL)!r}, "
                f"log_dir={str(tmp / f'{side}-{i}' / 'logs')!r}); sys.exit(r.returncode)")
        cmd = [sys.executable, "-c", code]
    t0 = time.time()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"{side} run failed (rc={res.returncode}):\n"
                         f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    recv, done = _events(trace)
    if len(recv) < CLIENTS or len(done) < CLIENTS:
        raise SystemExit(f"{side}: {len(recv)} train messages traced, expected ≥ {CLIENTS} "
                         f"($FEDLORA_TRACE_DIR did not reach the ClientApps?)")
    first = recv[0] - t0
    r1 = done[CLIENTS - 1] - recv[0]  # a round's messages all reach clients before the next round's
    return {"first": first, "round1": r1, "done1": first + r1, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-startup-"))
    res: dict[str, list[dict]] = {"fedlora": [], "minimal": []}
    try:
        for i in range(a.runs):
            order = ["fedlora", "minimal"] if i % 2 == 0 else ["minimal", "fedlora"]
            for side in order:
                res[side].append(run_once(side, tmp, i, a.rounds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# fedlora start-up vs Flower's minimal app — {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{platform.node()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; {CLIENTS} simulated SuperNodes, num_cpus=1, "
          f"{a.rounds} rounds, median of {a.runs} interleaved runs")
    print(f"{'seconds':<18} {'fedlora':>8} {'minimal':>8} {'ratio':>6}   runs (fedlora | minimal)")
    for key, label in (("first", "first train"), ("round1", "round 1"), ("done1", "to round 1 done"),
                       ("wall", "wall")):
        f = statistics.median(r[key] for r in res["fedlora"])
        m = statistics.median(r[key] for r in res["minimal"])
        runs = " ".join(f"{r[key]:.1f}" for r in res["fedlora"]) + " | " + " ".join(
            f"{r[key]:.1f}" for r in res["minimal"])
        print(f"{label:<18} {f:>8.2f} {m:>8.2f} {f / m:>6.2f}   {runs}")


if __name__ == "__main__":
    main()
