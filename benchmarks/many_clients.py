"""Many virtual clients: does a round cost more when more clients are NOT sampled?

Two Flower simulations (``fedlora simulate``'s path, ``fedlora.sim.run_flower``: SuperLink, ``flwr
run``, Ray actors) with the same number of clients sampled per round — 100 clients × fraction 0.2
and 1,000 clients × fraction 0.02, 20 each — on the tiny model and synthetic data of
``simulations/smoke.toml``; printed side by side with the ratio 1,000 / 100:

- **per-round time after round 1**: the median wall time between successive rounds' ``metrics.jsonl``
  lines (rounds 2..R: everything, Flower's scheduling included), and the median of the ServerApp's
  own ``round_seconds`` (configure_train → aggregate_train);
- **server process CPU per round** after round 1 (``flwr-simulation``'s user + system time between
  successive rounds' ends): the ServerApp's work and Flower's simulation engine's, which polls its
  link state once per node every 0.1 s (``vce_api.add_messages_to_queue``: ``get_message_ins`` for
  each of the N nodes, each scanning the stored messages) — a per-node cost inside Flower;
- **round 1**: it includes the capability query the ServerApp sends to every node it has not seen
  (``server/app.py`` ``discover``): that one scales with the number of clients, once;
- **server process memory**: ``flwr-simulation``, the process that runs the ServerApp (and Flower's
  simulation engine, whose per-node state lives there too): its peak RSS (``VmHWM``, the kernel's
  own high-water mark) and peak PSS; the SuperLink's peak RSS; the **whole run**'s peak PSS (every
  process it starts, sampled every 0.25 s; shared pages counted once).

A third table times a client's data (``fedlora.rundata.client_data``) in this process for a
``shards`` partition at 100 and 1,000 clients: the one-off partitioning of the pool and then each
further client (it used to partition the whole pool again for every client: O(clients) each).

    python benchmarks/many_clients.py                   # 4 rounds each (~2 min on 2 CPUs)
    python benchmarks/many_clients.py --rounds 6 --sampled 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import _descendants, _mem_kb  # noqa: E402 (the sibling benchmark's /proc readers)

from fedlora.config import load_config  # noqa: E402
from fedlora.sim import prepare_run_dir, run_flower  # noqa: E402

MiB = 2**20


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Watch(threading.Thread):
    """Peaks of the run's processes, and when each metrics.jsonl line appeared."""

    def __init__(self, metrics: Path, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.metrics, self.every, self.stop = metrics, every, threading.Event()
        self.server_hwm = self.server_pss = self.link_hwm = self.total_pss = 0
        self.round_end: list[float] = []
        self.round_cpu: list[float] = []  # the server process's CPU seconds at each round's end

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            total, server = 0, None
            for p in _descendants(me):
                pss, _ = _mem_kb(p)
                total += pss
                cmd = _cmd(p)
                if "flwr-simulation" in cmd:
                    server = p
                    self.server_hwm = max(self.server_hwm, _hwm_kb(p) * 1024)
                    self.server_pss = max(self.server_pss, pss * 1024)
                elif "flower-superlink" in cmd and "reaper" not in cmd:
                    self.link_hwm = max(self.link_hwm, _hwm_kb(p) * 1024)
            self.total_pss = max(self.total_pss, total * 1024)
            try:
                n = len(self.metrics.read_text().splitlines())
            except OSError:
                n = 0
            while len(self.round_end) < n:
                self.round_end.append(time.perf_counter())
                self.round_cpu.append(_cpu_s(server) if server else float("nan"))
            self.stop.wait(self.every)


def simulate(num: int, fraction: float, rounds: int, tmp: Path) -> dict:
    run_dir = tmp / f"clients-{num}"
    cfg = load_config(None, [f"clients.num={num}", f"clients.fraction_train={fraction}", f"rounds={rounds}",
                             "data.examples_per_client=64", "train.local_steps=2",
                             f"run_dir={json.dumps(str(run_dir))}"])
    path = prepare_run_dir(cfg)
    w = Watch(run_dir / "metrics.jsonl")
    w.start()
    t0 = time.perf_counter()
    r = run_flower({"config-path": str(path), "resume": False}, num, cfg.clients.num_cpus,
                   log_dir=tmp / f"logs-{num}")
    wall = time.perf_counter() - t0
    w.stop.set()
    w.join()
    if r.returncode != 0:
        raise SystemExit(f"flwr run ({num} clients) failed ({r.returncode}):\n{r.tail(40)}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    gaps = [b - a for a, b in zip(w.round_end, w.round_end[1:])]
    cpu = [b - a for a, b in zip(w.round_cpu, w.round_cpu[1:])]
    return {"sampled": sorted({len(r["clients"]) for r in rows}), "rounds": len(rows),
            "round1_s": rows[0]["round_seconds"],
            "wall_per_round_s": statistics.median(gaps) if gaps else float("nan"),
            "server_round_s": statistics.median(r["round_seconds"] for r in rows[1:]),
            "server_cpu_s": statistics.median(cpu) if cpu else float("nan"),
            "server_hwm": w.server_hwm, "server_pss": w.server_pss, "link_hwm": w.link_hwm,
            "total_pss": w.total_pss, "wall_s": wall, "accuracy": rows[-1].get("accuracy")}


def data_timing(num: int, clients: int = 30) -> tuple[float, float]:
    """(first client_data call, mean of the next ``clients``) in ms, shards partition, ``num`` clients."""
    from fedlora import rundata

    spec = load_config(None, [f"clients.num={num}", 'data.partition="shards"',
                              "data.examples_per_client=64"]).client_spec()
    t = time.perf_counter()
    rundata.client_data(spec, 0, num)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for pid in range(1, clients + 1):
        rundata.client_data(spec, pid * (num // (clients + 1)), num)
    return first * 1e3, (time.perf_counter() - t) / clients * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sampled", type=int, default=20, help="clients sampled per round in both settings")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-many-"))
    settings = [(100, a.sampled / 100), (1000, a.sampled / 1000)]
    res = {n: simulate(n, f, a.rounds, tmp) for n, f in settings}
    small, big = res[100], res[1000]
    print(f"# fedlora many clients — {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f} (CPU shared)")
    print(f"# tiny model, synthetic iid data (64 examples/client), 2 local steps, fedex, {a.rounds} rounds, "
          "Flower simulation engine (Ray, 1 CPU per client)")
    print(f"{'':38}{'100 × 0.2':>14}{'1000 × 0.02':>14}{'ratio':>8}")

    def line(label: str, key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> None:
        x, y = small[key] / scale, big[key] / scale
        print(f"{label:38}{fmt.format(x):>14}{fmt.format(y):>14}{y / x:>8.2f}")

    print(f"{'clients sampled per round':38}{str(small['sampled']):>14}{str(big['sampled']):>14}")
    line("per round after round 1, wall (s)", "wall_per_round_s")
    line("per round after round 1, server (s)", "server_round_s")
    line("  server process CPU per round (s)", "server_cpu_s")
    line("round 1, server (s) [queries all nodes]", "round1_s")
    line("server process peak RSS (MiB)", "server_hwm", MiB, "{:.0f}")
    line("server process peak PSS (MiB)", "server_pss", MiB, "{:.0f}")
    line("SuperLink peak RSS (MiB)", "link_hwm", MiB, "{:.0f}")
    line("whole run peak PSS (MiB)", "total_pss", MiB, "{:.0f}")
    line("whole run wall (s)", "wall_s", fmt="{:.1f}")
    print(f"{'final accuracy':38}{small['accuracy']:>14.4f}{big['accuracy']:>14.4f}")
    print("\n# a client's data, shards partition, in this process (ms)")
    print(f"{'':38}{'100':>14}{'1000':>14}{'ratio':>8}")
    d = {n: data_timing(n) for n in (100, 1000)}
    for i, label in enumerate(("first client (partitions the pool)", "each further client")):
        print(f"{label:38}{d[100][i]:>14.1f}{d[1000][i]:>14.1f}{d[1000][i] / d[100][i]:>8.2f}")


if __name__ == "__main__":
    main()
