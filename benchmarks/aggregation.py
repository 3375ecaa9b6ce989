"""Time ``Strategy.aggregate`` for every rule against the same rule written minimally, in one run.

24 layers of 768×768 (BERT-base's q and v), r_max 16, client ranks cycling {4, 8, 16}, K clients,
float32, ``check_exactness=False`` (the diagnostic is optional and not part of the rule). The
updates reach ``aggregate`` as the server receives them: encoded to Flower records by the client's
``update_to_record`` and decoded by ``flower_io.record_to_update`` (done once, outside the timing).
The baseline is ``benchmarks/minimal_rules.py``: the rule's arithmetic only, on the same decoded
updates. Both start from the same state — fedlora's after one round, so that the timed round is
a running server's (RoLoRA's is then an A round) — run interleaved, and the first repeat checks
that they end in the same global model (``W_g − W0`` of every layer, relative error ≤ 1e-4 in
float32). Prints the medians and their ratio (fedlora / minimal).

    python benchmarks/aggregation.py [--clients 8,32,128] [--repeats 5] [--strategies fedavg,...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from minimal_rules import MINIMAL, dense_state, state_of

from fedlora.flower_io import record_to_update, update_to_record
from fedlora.strategies import ClientUpdate, LayerSpec, create_strategy, strategy_class
from fedlora.strategies.registry import strategy_names

RANKS = (4, 8, 16)
R_MAX = 16
SCALE = 2.0
SHAPE = {"A": lambda r, s: (r, s.d_in), "B": lambda r, s: (s.d_out, r), "R": lambda r, s: (r, r)}


def bert_layers() -> dict[str, LayerSpec]:
    return {f"encoder.{i}.{p}": LayerSpec(768, 768) for i in range(12) for p in ("query", "value")}


def make_strategy(name: str, layers: dict[str, LayerSpec], r_max: int, gen: torch.Generator):
    s = create_strategy(name, layers=layers, r_max=r_max, scale=SCALE, check_exactness=False)
    if s.init_from:  # Fed-SB: once per setting (a d×k SVD per layer), never inside the timing
        s.initialize({n: torch.randn(sp.d_out, sp.d_in, generator=gen) for n, sp in layers.items()})
    return s


def make_updates(s, k: int, ranks, gen: torch.Generator, wire: bool = True) -> list[ClientUpdate]:
    keys = sorted(s.round_uploads())
    ups = []
    for i in range(k):
        r = ranks[i % len(ranks)]
        f = {n: {key: 0.1 * torch.randn(*SHAPE[key](r, sp), generator=gen) for key in keys}
             for n, sp in s.layers.items()}
        u = ClientUpdate(f"c{i}", r, 100 + i, s.version, f)
        ups.append(record_to_update(update_to_record(u)) if wire else u)
    return ups


def check_same(name: str, ours, mine, layers) -> float:
    """Largest relative difference of the two global models over the layers."""
    a, b = dense_state(name, state_of(ours), SCALE), dense_state(name, mine, SCALE)
    worst = 0.0
    for n in layers:
        worst = max(worst, float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)))
    return worst


def compare(name: str, layers, r_max: int, k: int, ranks, repeats: int,
            gen: torch.Generator) -> tuple[float, float, float]:
    """(median fedlora s, median minimal s, relative difference of the results)."""
    template = make_strategy(name, layers, r_max, gen)
    template.aggregate(make_updates(template, k, ranks, gen))  # round 1: the timed one is round 2
    ups = make_updates(template, k, ranks, gen)
    ours, mine, diff = [], [], None
    for _ in range(repeats):
        s = copy.deepcopy(template)
        t0 = time.perf_counter()
        rep = s.aggregate(ups)
        ours.append(time.perf_counter() - t0)
        assert len(rep.accepted) == k, rep.rejected
        st = state_of(template)
        t0 = time.perf_counter()
        out = MINIMAL[name](st, ups, SCALE, r_max)
        mine.append(time.perf_counter() - t0)
        if diff is None:
            diff = check_same(name, s, {**st, **out}, layers)
            if diff > 1e-4:
                raise SystemExit(f"{name} K={k}: fedlora and the minimal rule differ ({diff:.2e})")
        del s
    return statistics.median(ours), statistics.median(mine), diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="8,32,128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--strategies", default=",".join(strategy_names()))
    args = ap.parse_args()
    layers = bert_layers()
    gen = torch.Generator().manual_seed(0)
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, {len(layers)} layers "
          f"768x768, r_max {R_MAX}, ranks {RANKS}, medians of {args.repeats} (interleaved)")
    print(f"{'strategy':9} {'K':>4} {'fedlora s':>10} {'minimal s':>10} {'ratio':>6}  same result")
    for k in [int(x) for x in args.clients.split(",")]:
        for name in args.strategies.split(","):
            strategy_class(name)  # an unknown name fails here, with the known ones
            ours, mine, diff = compare(name, layers, R_MAX, k, RANKS, args.repeats, gen)
            print(f"{name:9} {k:>4} {ours:>10.4f} {mine:>10.4f} {ours / mine:>6.2f}  rel. diff {diff:.1e}",
                  flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
