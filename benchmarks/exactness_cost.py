"""Cost of the exactness diagnostic next to the aggregation it checks, per strategy and K.

24 layers of 768×768, r_max 16, client ranks cycling {4, 8, 16}, float32, updates decoded from
Flower records (as the server receives them). For each strategy with a global model and each K,
the same round is aggregated with ``check_exactness`` off and on, interleaved, ``--repeats``
times; the table prints the medians of ``agg_seconds`` (off), the diagnostic's own seconds (on:
``RoundReport.diagnostic_seconds``, part of its ``agg_seconds``) and their ratio.

    python benchmarks/exactness_cost.py [--clients 8,32,128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from aggregation import R_MAX, RANKS, bert_layers, make_strategy, make_updates

from fedlora.strategies import strategy_class
from fedlora.strategies.registry import strategy_names

LAYERS = bert_layers()


def measure(name: str, k: int, repeats: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    start = make_strategy(name, LAYERS, R_MAX, gen)  # (Fed-SB initialised once)
    start.check_exactness = True
    # the aggregation benchmark's updates, as the server receives them (decoded from records)
    ups = make_updates(start, k, RANKS, gen)
    off, diag = [], []
    for _ in range(repeats):
        for check in (False, True):
            s = copy.deepcopy(start)
            s.check_exactness = check
            rep = s.aggregate(ups)
            assert len(rep.accepted) == k, rep.rejected
            (diag if check else off).append(rep.diagnostic_seconds if check else rep.agg_seconds)
    return statistics.median(off), statistics.median(diag)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="8,32,128")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
          f"{len(LAYERS)} layers 768x768, r_max {R_MAX}, ranks {RANKS}")
    print(f"{'strategy':8} {'K':>4} {'aggregate s':>11} {'diagnostic s':>12} {'ratio':>6}")
    for k in [int(x) for x in args.clients.split(",")]:
        for name in [n for n in strategy_names() if strategy_class(n).has_global_model]:
            agg, diag = measure(name, k, args.repeats)
            print(f"{name:8} {k:>4} {agg:>11.4f} {diag:>12.4f} {diag / agg:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
