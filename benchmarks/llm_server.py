"""The server at LLM scale: one aggregation round on Llama-7B-shaped adapters, fedlora against the
same rule written minimally (``minimal_rules.py``), time and peak memory.

32 layers × (q, v) of 4096×4096, client ranks cycling {8, 16} (r_max 16), K = 16 clients, float32,
``check_exactness=False``. Each side runs in its own process (so neither's memory counts for the
other), builds the same state (seeded; one warm-up round so that the dense state is written), then
times ``--repeats`` rounds of the same decoded updates (medians). Memory: what a round allocates
beyond what the process held when it started (the peak resident set ``VmHWM``, reset through
``/proc/self/clear_refs`` just before the round, minus the resident set then; the largest over the
rounds), added to the **floor** — the server's state (the tensors of fedlora's checkpoint) plus one
round's uploads — and divided by it: ``(floor + transient) / floor``. Both sides end in the same
model: each prints a fingerprint of ``W_g − W0`` (``xᵀ·ΔW_l·y`` for fixed random x, y, summed over
layers), compared here.

    python benchmarks/llm_server.py [--strategies fedavg,...] [--repeats 3] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from fedlora.strategies.registry import strategy_names

D = 4096
RANKS = (8, 16)
R_MAX = 16
K = 16
SCALE = 2.0


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current one
        f.write("5")


def _bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_bytes(v) for v in obj)
    return 0


def child(name: str, side: str, layers_n: int, repeats: int) -> dict:
    from aggregation import make_updates
    from minimal_rules import MINIMAL, fingerprint, state_of

    from fedlora.strategies import LayerSpec, create_strategy

    layers = {f"model.layers.{i}.self_attn.{p}_proj": LayerSpec(D, D) for i in range(layers_n) for p in "qv"}
    gen = torch.Generator().manual_seed(0)
    s = create_strategy(name, layers=layers, r_max=R_MAX, scale=SCALE, check_exactness=False)
    if s.init_from:  # Fed-SB: frozen orthonormal factors and a diagonal R, as its initialisation
        # gives (the init's d×k SVDs are not part of a round and take minutes at this size)
        for n in layers:
            s.A[n] = torch.linalg.qr(torch.randn(D, R_MAX, generator=gen))[0].T.contiguous()
            s.B[n] = torch.linalg.qr(torch.randn(D, R_MAX, generator=gen))[0].contiguous()
            s.R[n] = torch.diag(torch.rand(R_MAX, generator=gen))
        s.initialized, s.version = True, 1
        s.R_at = {1: dict(s.R)}
    s.aggregate(make_updates(s, K, RANKS, gen))  # round 1: the dense state is written
    ups = make_updates(s, K, RANKS, gen)
    state = state_of(s) if side == "minimal" else None
    if side == "minimal":
        del s
    floor = (_bytes(s.state_dict()) if side == "fedlora" else 0) + _bytes([u.flat for u in ups])
    times, fp, transient = [], None, 0
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(D, generator=g), torch.randn(D, generator=g)
    for _ in range(repeats):
        if side == "fedlora":
            if sorted(s.round_uploads()) != sorted(ups[0].factors[next(iter(layers))]):
                ups = None  # RoLoRA: the next round trains the other factor
                ups = make_updates(s, K, RANKS, gen)
            for u in ups:
                u.base_version = s.version
            _reset_peak()
            held = _rss_kib("VmRSS")
            t0 = time.perf_counter()
            rep = s.aggregate(ups)
            times.append(time.perf_counter() - t0)
            assert len(rep.accepted) == K, rep.rejected
            if fp is None:  # after one round from the shared start, as the minimal side
                fp = fingerprint(name, state_of(s, clone=False), x, y, SCALE)
        else:
            out = None
            _reset_peak()
            held = _rss_kib("VmRSS")
            t0 = time.perf_counter()
            out = MINIMAL[name](state, ups, SCALE, R_MAX)
            times.append(time.perf_counter() - t0)
            if fp is None:
                fp = fingerprint(name, {**state, **out}, x, y, SCALE)
        transient = max(transient, (_rss_kib("VmHWM") - held) * 1024)
    return {"seconds": statistics.median(times), "transient_bytes": transient, "floor_bytes": floor,
            "fingerprint": fp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default=",".join(strategy_names()))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32, help="transformer blocks (q and v each)")
    ap.add_argument("--child", nargs=2, metavar=("STRATEGY", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.layers, args.repeats)))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, {2 * args.layers} layers "
          f"{D}x{D}, ranks {RANKS}, K {K}, medians of {args.repeats}; memory: peak RSS in the round "
          "(floor + what a round allocates) / floor")
    print(f"{'strategy':9} {'fedlora s':>9} {'minimal s':>9} {'ratio':>6} {'floor GB':>8} "
          f"{'+fedlora GB':>11} {'ratio':>6} {'+minimal GB':>11} {'ratio':>6}  same result")
    t_start = time.perf_counter()
    for name in args.strategies.split(","):
        res = {}
        for side in ("fedlora", "minimal"):
            out = subprocess.run([sys.executable, os.path.join(here, "llm_server.py"), "--child", name, side,
                                  "--layers", str(args.layers), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, cwd=here)
            if out.returncode:
                raise SystemExit(f"{name} {side} failed:\n{out.stderr[-3000:]}")
            res[side] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = res["fedlora"], res["minimal"]
        rel = abs(a["fingerprint"] - b["fingerprint"]) / max(abs(b["fingerprint"]), 1e-30)
        gb, floor = 1e9, a["floor_bytes"]
        print(f"{name:9} {a['seconds']:>9.3f} {b['seconds']:>9.3f} {a['seconds'] / b['seconds']:>6.2f} "
              f"{floor / gb:>8.2f} {a['transient_bytes'] / gb:>11.2f} "
              f"{(floor + a['transient_bytes']) / floor:>6.2f} {b['transient_bytes'] / gb:>11.2f} "
              f"{(floor + b['transient_bytes']) / floor:>6.2f}  rel. diff {rel:.1e}", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
