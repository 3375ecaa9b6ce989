"""Per-round time of fedlora on Flower's simulation engine against the in-process harness, like for like.

Same work and the same parallelism on both sides: **one client at a time, one torch thread**.
The work: the smoke run (tiny model, 6 clients of ranks 2/4/8, 10 local steps of batch 32, FedEx,
server-side evaluation every round) for ``1 + K`` rounds. Per-round times after start-up:

- ``harness``: ``fedlora.testing.run_harness`` (strategy objects + local training in one loop, no
  Flower, the clients one after another): ``(T(1 + K rounds) − T(1 round)) / K``;
- ``loopback``: the real ServerApp + ClientApp over ``fedlora.loopback.LoopbackGrid`` (Flower records
  and messages in this process, the clients one after another, no Ray): the server-measured
  ``round_seconds`` of rounds 2..1+K;
- ``flower``: ``flwr run`` on Flower's simulation engine with ``client-resources-num-cpus`` = all of
  this machine's CPUs, so Ray runs ONE actor: the clients one after another, as in the harness.
  ``OMP_NUM_THREADS=1`` (Ray would otherwise give the actor one thread per CPU it holds):
  ``round_seconds`` of rounds 2..1+K; the start-up (SuperLink, Ray, first round) is printed apart.

The three are interleaved ``--reps`` times (machine load drifts); each row is the median over all
timed rounds of all repetitions. (The engine's default, ``num_cpus=1`` on 2 cores, trains two
clients at once: faster than either sequential side, and no measure of overhead.)

    python benchmarks/flower_overhead.py [--rounds-after 4] [--clients 6] [--reps 2]
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

os.environ["OMP_NUM_THREADS"] = "1"  # before torch: this process and every one it starts

import torch  # noqa: E402

from fedlora.config import load_config  # noqa: E402
from fedlora.loopback import run_loopback  # noqa: E402
from fedlora.sim import prepare_run_dir, run_flower  # noqa: E402
from fedlora.testing import run_harness as harness  # noqa: E402


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds-after", type=int, default=4, help="rounds timed after the first")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of the three")
    a = ap.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(1)
    k, n = a.rounds_after, a.clients
    cpus = os.cpu_count() or 1
    ranks = [[2, 4, 8][i % 3] for i in range(n)]
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-overhead-"))

    def timed_harness(rounds: int) -> float:
        t0 = time.perf_counter()
        harness("fedex", ranks, rounds=rounds, local_steps=10, seed=0)
        return time.perf_counter() - t0

    def cfg(name: str):
        return load_config(None, [f"run_dir={json.dumps(str(tmp / name))}", f"rounds={1 + k}",
                                  f"clients.num={n}", f"clients.num_cpus={cpus}"])

    timed_harness(1)  # warm-up (imports, allocator)
    h, loop, fl, starts, walls = [], [], [], [], []
    for rep in range(a.reps):
        t1, tk = timed_harness(1), timed_harness(1 + k)
        h.append((tk - t1) / k)
        c = cfg(f"loopback-{rep}")
        run_loopback(c)
        loop += [r["round_seconds"] for r in _rows(c.resolved_run_dir())[1:]]
        c = cfg(f"flower-{rep}")
        path = prepare_run_dir(c)
        t0 = time.perf_counter()
        res = run_flower({"config-path": str(path)}, n, cpus, log_dir=tmp / f"flower-{rep}" / "logs")
        walls.append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise SystemExit(f"flwr run failed (rc={res.returncode}):\n{res.tail()}")
        rows = _rows(c.resolved_run_dir())
        fl += [r["round_seconds"] for r in rows[1:]]
        starts.append(rows[0]["round_seconds"])
    h_med = statistics.median(h)
    print(f"# fedlora Flower overhead, like for like — {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
          f"{platform.machine()}, {cpus} CPUs; {n} clients (ranks {sorted(set(ranks))}), {k} timed rounds "
          f"after the first x {a.reps} reps; one client at a time, one torch thread, on every side")
    print(f"{'engine':<10} {'s/round (median)':>17} {'mean':>8} {'ratio vs harness':>17}")
    print(f"{'harness':<10} {h_med:>17.3f} {statistics.mean(h):>8.3f} {1.0:>17.2f}")
    for name, xs in (("loopback", loop), ("flower", fl)):
        med = statistics.median(xs)
        print(f"{name:<10} {med:>17.3f} {statistics.mean(xs):>8.3f} {med / h_med:>17.2f}")
    print(f"flower start-up: first round {statistics.median(starts):.2f} s; `flwr run` wall "
          f"{statistics.median(walls):.1f} s for {1 + k} rounds (SuperLink + Ray + FAB install included)")


if __name__ == "__main__":
    main()
