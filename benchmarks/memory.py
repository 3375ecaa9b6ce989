"""Memory of a whole Flower simulation: many virtual clients, one shared frozen model per process.

Runs ``fedlora simulate``'s path (``fedlora.sim.run_flower``: SuperLink, ``flwr run``, Ray actors)
and samples every process it starts, every 0.5 s, for the whole run. Two numbers per sample:

- **PSS** (proportional set size, ``/proc/<pid>/smaps_rollup``): each shared page (torch's
  libraries, the memory-mapped model) counted once, split among the processes sharing it — the
  memory the run really takes;
- **RSS sum**: every process's resident set added up (shared pages counted once per process).

What is claimed (issue 4): 100 virtual clients of the tiny model, and 20 of a MiniLM-sized model,
fit in 4 GiB. Virtual clients are served by ``clients.num_cpus``-CPU Ray actors (2 here); each
actor process builds the model once and every client it serves reuses it (``clients/app.py``);
a client's own state (its base delta, FedSA's B, the DP accountant) lives in Flower's
``context.state``.

    python benchmarks/memory.py tiny      # 100 clients, tiny model, synthetic data, 2 rounds
    python benchmarks/memory.py minilm    # 20 clients, all-MiniLM-L6-v2 on SST-2, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from fedlora.config import load_config
from fedlora.sim import prepare_run_dir, run_flower

GiB = 2**30
SETUPS = {
    "tiny": (100, ["rounds=2", "clients.num=100", "train.local_steps=2", "data.examples_per_client=64"]),
    "minilm": (20, ["rounds=2", "clients.num=20", 'model.name="minilm"', 'data.name="sst2"',
                    "data.limit=2000", "data.server_examples=200", "data.max_length=64",
                    "train.local_steps=2", "clients.ranks=[4,8,16]", "lora.alpha=16.0"]),
}


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(root: int) -> list[int]:
    kids, out, stack = _children(), [], [root]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB of one process (0, 0 when it is gone)."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    words = [Path(a.decode(errors="replace")).name for a in argv[:3] if a]
    return " ".join(w for w in words if w not in ("python", "python3"))[:48] or "?"


class Sampler(threading.Thread):
    """Peak PSS / RSS-sum over this process's descendants (the benchmark itself excluded)."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.peak_pss = self.peak_rss = self.peak_procs = 0
        self.at_peak: list[tuple[str, int]] = []  # (process, PSS bytes) at the PSS peak

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            pids = _descendants(me)
            mem = [_mem_kb(p) for p in pids]
            pss = sum(m[0] for m in mem) * 1024
            if pss > self.peak_pss:
                self.peak_pss = pss
                self.at_peak = sorted(((_name(p), m[0] * 1024) for p, m in zip(pids, mem)),
                                      key=lambda x: -x[1])
            self.peak_rss = max(self.peak_rss, sum(m[1] for m in mem) * 1024)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.stop.wait(self.every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("setup", choices=sorted(SETUPS))
    ap.add_argument("--strategy", default="fedex")
    ap.add_argument("--num-cpus", type=int, default=1, help="Ray CPUs per virtual client")
    a = ap.parse_args()
    n, sets = SETUPS[a.setup]
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-memory-"))
    cfg = load_config(None, sets + [f"strategy.name={json.dumps(a.strategy)}",
                                    f"run_dir={json.dumps(str(tmp / a.setup))}",
                                    f"clients.num_cpus={a.num_cpus}"])
    path = prepare_run_dir(cfg)
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    r = run_flower({"config-path": str(path), "resume": False}, n, a.num_cpus, log_dir=tmp / "logs")
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if r.returncode != 0:
        raise SystemExit(f"flwr run failed ({r.returncode}):\n{r.tail(40)}")
    rows = [json.loads(x) for x in (tmp / a.setup / "metrics.jsonl").read_text().splitlines()]
    clients = {c["id"] for row in rows for c in row["clients"] if c["accepted"]}
    print(f"# fedlora memory — {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"setup {a.setup}: {n} virtual clients ({len(clients)} trained), {a.strategy}, "
          f"{len(rows)} rounds, num_cpus={a.num_cpus}, wall {wall:.1f} s, final accuracy "
          f"{rows[-1].get('accuracy')}")
    print(f"peak PSS (whole run, {sampler.peak_procs} processes): {sampler.peak_pss / GiB:.2f} GiB"
          f"   peak RSS sum: {sampler.peak_rss / GiB:.2f} GiB   target: 4 GiB")
    print("at the peak: " + ", ".join(f"{n} {b / GiB:.2f}" for n, b in sampler.at_peak if b > 0.05 * GiB))


if __name__ == "__main__":
    main()
