"""Time ``aggregate`` per strategy on BERT-base-sized layers against a floor measured in the same run.

24 layers of 768×768, r_max 16, client ranks cycling {4, 8, 16}, K ∈ {8, 32, 128}, float32,
``check_exactness=False`` (the dense diagnostic is not part of the rule). The updates reach
``aggregate`` as the server receives them: encoded to Flower records and decoded by
``fedlora.flower_io`` (the ``wire`` column); ``tensors`` times the same updates held as separate
tensors (how the in-process harness and the tests hand them over). Floors, on memory of the same
size (a separate buffer per layer, so nothing is served from cache):
- fedex / flora: one GEMM with the same FLOPs as the dense residual/stack product (d×ρ·ρ×k per
  layer, ρ the residual's column count);
- fedavg / fedsa / fedsb: one pass over the uploaded factor bytes (a weighted sum of the clients'
  tensors already stacked in memory: the faster of ``w @ X`` and ``(X * w).sum(0)``).

    python benchmarks/aggregation.py [--clients 8,32,128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.flower_io import record_to_update, update_to_record
from fedlora.strategies import ClientUpdate, LayerSpec, create_strategy, strategy_class

LAYERS = {f"encoder.{i}.{p}": LayerSpec(768, 768) for i in range(12) for p in ("query", "value")}
RANKS = (4, 8, 16)
R_MAX = 16


SHAPE = {"A": lambda r: (r, 768), "B": lambda r: (768, r), "R": lambda r: (r, r)}


def _updates(name: str, k: int, version: int, gen: torch.Generator) -> list[ClientUpdate]:
    keys = sorted(strategy_class(name).uploads)  # what the rule's clients upload
    ups = []
    for i in range(k):
        r = RANKS[i % len(RANKS)]
        f = {n: {key: torch.randn(*SHAPE[key](r), generator=gen) for key in keys} for n in LAYERS}
        ups.append(ClientUpdate(f"c{i}", r, 100 + i, version, f))
    return ups


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _timed_aggregate(name: str, k: int, repeats: int, wire: bool,
                     gen: torch.Generator) -> tuple[float, list[int]]:
    times = []
    for _ in range(repeats):
        s = create_strategy(name, layers=LAYERS, r_max=R_MAX, scale=2.0, check_exactness=False)
        if s.init_from:
            s.initialize({n: torch.randn(768, 768, generator=gen) for n in LAYERS})
        ups = _updates(name, k, s.version, gen)
        if wire:
            ups = [record_to_update(update_to_record(u)) for u in ups]
        t0 = time.perf_counter()
        rep = s.aggregate(ups)
        times.append(time.perf_counter() - t0)
        assert len(rep.accepted) == k, rep.rejected
    return min(times), [u.rank for u in ups]


def time_strategy(name: str, k: int, repeats: int) -> tuple[float, float, float, str]:
    gen = torch.Generator().manual_seed(0)
    t_wire, ranks = _timed_aggregate(name, k, repeats, True, gen)
    t_tensors, _ = _timed_aggregate(name, k, repeats, False, gen)
    if name in ("fedex", "flora"):
        rho = sum(ranks) + (R_MAX + sum(R_MAX - r for r in set(ranks) if r < R_MAX)
                            if name == "fedex" else 0)
        UV = [(torch.randn(768, rho), torch.randn(rho, 768)) for _ in LAYERS]
        floor = _best(lambda: [U @ V for U, V in UV], repeats)
        what = f"GEMM 768x{rho}x768 x{len(LAYERS)}"
    else:
        per = {"fedsb": lambda r: r * r, "fedsa": lambda r: r * 768,
               "fedavg": lambda r: 2 * r * 768}[name]
        numel = sum(per(r) for r in ranks)
        Xs = [torch.randn(k, numel // k + 1) for _ in LAYERS]
        w = torch.rand(1, k)
        floor = min(_best(lambda: [w @ X for X in Xs], repeats),
                    _best(lambda: [(X * w.T).sum(0) for X in Xs], repeats))
        what = f"weighted sum of {numel * 4 * len(LAYERS) / 2**20:.0f} MiB"
    return t_wire, t_tensors, floor, what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="8,32,128")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
          f"{len(LAYERS)} layers 768x768, r_max {R_MAX}, ranks {RANKS}")
    print(f"{'strategy':8} {'K':>4} {'wire s':>8} {'tensors s':>9} {'floor s':>8} "
          f"{'ratio':>6} {'(tensors)':>9}  floor")
    for k in [int(x) for x in args.clients.split(",")]:
        for name in ("fedavg", "fedex", "flora", "fedsb", "fedsa"):
            t, t_sep, floor, what = time_strategy(name, k, args.repeats)
            print(f"{name:8} {k:>4} {t:>8.4f} {t_sep:>9.4f} {floor:>8.4f} {t / floor:>6.2f} "
                  f"{t_sep / floor:>9.2f}  {what}", flush=True)


if __name__ == "__main__":
    main()
