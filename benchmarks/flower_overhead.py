"""Per-round time of the Flower simulation against the in-process harness, for the same work.

The work: the smoke run (tiny model, 6 clients of ranks 2/4/8, 10 local steps of batch 32, FedEx,
server-side evaluation every round) for ``1 + K`` rounds. Per-round times after start-up:

- ``harness``: ``fedlora.testing.run_harness`` (strategy objects + local training in one loop, no
  Flower): ``(T(1 + K rounds) − T(1 round)) / K`` — set-up and the first round excluded;
- ``loopback``: the real ServerApp strategy loop + ClientApp over ``fedlora.loopback.LoopbackGrid`` (Flower
  records and messages, no Ray): the server-measured ``round_seconds`` of rounds 2..1+K;
- ``flower``: ``flwr run`` on Flower's simulation engine (Ray, ``clients.num_cpus`` CPUs per virtual
  client): ``round_seconds`` of rounds 2..1+K; the start-up (SuperLink, Ray, first round) is printed
  apart.

    python benchmarks/flower_overhead.py [--rounds-after 4] [--clients 6] [--num-cpus 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

from fedlora.config import load_config
from fedlora.loopback import run_loopback
from fedlora.sim import prepare_run_dir, run_flower
from fedlora.testing import run_harness as harness


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds-after", type=int, default=4, help="rounds timed after the first")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--num-cpus", type=int, default=1, help="Ray CPUs per virtual client")
    a = ap.parse_args()
    logging.disable(logging.INFO)
    k, n = a.rounds_after, a.clients
    ranks = [[2, 4, 8][i % 3] for i in range(n)]
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-overhead-"))

    def timed_harness(rounds: int) -> float:
        t0 = time.perf_counter()
        harness("fedex", ranks, rounds=rounds, local_steps=10, seed=0)
        return time.perf_counter() - t0

    timed_harness(1)  # warm-up (imports, allocator)
    t1 = min(timed_harness(1) for _ in range(2))
    tk = min(timed_harness(1 + k) for _ in range(2))
    h_round = (tk - t1) / k

    def cfg(name: str):
        return load_config(None, [f"run_dir={json.dumps(str(tmp / name))}", f"rounds={1 + k}",
                                  f"clients.num={n}", f"clients.num_cpus={a.num_cpus}"])

    c = cfg("loopback")
    run_loopback(c)
    loop = [r["round_seconds"] for r in _rows(tmp / "loopback")[1:]]

    c = cfg("flower")
    path = prepare_run_dir(c)
    t0 = time.perf_counter()
    res = run_flower({"config-path": str(path)}, n, a.num_cpus, log_dir=tmp / "flower" / "logs")
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"flwr run failed (rc={res.returncode}):\n{res.tail()}")
    rows = _rows(tmp / "flower")
    fl = [r["round_seconds"] for r in rows[1:]]
    fl_med, loop_med = statistics.median(fl), statistics.median(loop)
    print(f"# fedlora Flower overhead — {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, {n} clients (ranks {sorted(set(ranks))}), "
          f"{k} timed rounds after the first, num_cpus={a.num_cpus}")
    print(f"{'engine':<10} {'s/round (median)':>17} {'mean':>8} {'ratio vs harness':>17}")
    print(f"{'harness':<10} {h_round:>17.3f} {h_round:>8.3f} {1.0:>17.2f}")
    print(f"{'loopback':<10} {loop_med:>17.3f} {statistics.mean(loop):>8.3f} {loop_med / h_round:>17.2f}")
    print(f"{'flower':<10} {fl_med:>17.3f} {statistics.mean(fl):>8.3f} {fl_med / h_round:>17.2f}")
    print(f"flower start-up: first round {rows[0]['round_seconds']:.2f} s; `flwr run` wall {wall:.1f} s "
          f"for {1 + k} rounds (SuperLink + Ray + FAB install included)")


if __name__ == "__main__":
    main()
