"""In-process harness: the strategy objects + real local training, no Flower.

It exists as a test harness and as the baseline that measures Flower's overhead. Each client keeps
its own model (its frozen base delta, and FedSA's personal B and head, persist in it across rounds);
the server evaluates the global model (``W0 + global_delta`` with the global head) on a held-out set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fedlora.client import RankSelfPruning, apply_payload, load_global, make_update
from fedlora.lora import LoRAConfig, inject_lora, lora_layers
from fedlora.models import get_model
from fedlora.strategies import LayerSpec, Strategy, create_strategy, strategy_class
from fedlora.synthetic import SyntheticTask, make_loader
from fedlora.train import OptimConfig, accumulate_weight_gradients, evaluate, train_local


@dataclass
class HarnessResult:
    strategy: Strategy
    rounds: list[dict] = field(default_factory=list)
    clients: dict[str, nn.Module] = field(default_factory=dict)


def run_harness(strategy_name: str, ranks: list[int], rounds: int = 3, local_steps: int = 10,
                  seed: int = 0, lr: float = 1e-2, alpha: float = 16.0, batch_size: int = 32,
                  examples_per_client: int = 256, fraction: float = 1.0,
                  strategy_options: dict | None = None) -> HarnessResult:
    r_max = max(ranks)
    scale = alpha / r_max  # one scale for every client, whatever its rank
    cls = strategy_class(strategy_name)
    mode = cls.adapter
    task = SyntheticTask()
    base = get_model("tiny", seed=seed)
    cfg = LoRAConfig(targets=["attn.q", "attn.v"], rank=r_max, scale=scale, mode=mode,
                     trainable=["head"], seed=seed)
    server_model = copy.deepcopy(base)
    names = inject_lora(server_model, cfg)
    layers = {n: LayerSpec(m.out_features, m.in_features) for n, m in lora_layers(server_model).items()}
    strategy = create_strategy(strategy_name, layers=layers, r_max=r_max, scale=scale, seed=seed,
                               dtype=torch.float32, **(strategy_options or {}))
    test = make_loader(task.generate(512, seed=seed + 10_000), 256, shuffle=False)
    if cls.init_from == "server-gradients":  # server-side init on a public split
        public = make_loader(task.generate(64, seed=seed + 20_000), 32, shuffle=False)
        strategy.initialize(accumulate_weight_gradients(server_model, public, names, 2, "cpu"), eta=lr)
    clients: dict[str, nn.Module] = {}
    data = {}
    held = {}
    for i, r in enumerate(ranks):
        cid = f"client-{i}"
        m = copy.deepcopy(base)
        inject_lora(m, LoRAConfig(targets=cfg.targets, rank=r, scale=scale, mode=mode,
                                  trainable=["head"], seed=seed))
        clients[cid] = m
        data[cid] = task.generate(examples_per_client, seed=seed * 1000 + i)
        held[cid] = 0
    result = HarnessResult(strategy, [], clients)
    gen = torch.Generator().manual_seed(seed)
    for t in range(rounds):
        ids = [c for c in clients if torch.rand(1, generator=gen).item() < fraction] or list(clients)[:1]
        updates, losses, personal = [], {}, {}
        for cid in ids:
            m = clients[cid]
            p = strategy.payload(cid, ranks[int(cid.split("-")[1])], held[cid])
            apply_payload(m, p)
            held[cid] = p.base_version
            pruning = RankSelfPruning.from_payload(m, p)
            res = train_local(m, make_loader(data[cid], batch_size, seed=seed + t), steps=local_steps,
                              optim=OptimConfig(lr=lr), device="cpu",
                              before_step=pruning.before_step if pruning else None)
            if pruning is not None:
                pruning.finish()
            losses[cid] = res.loss
            updates.append(make_update(m, p, len(data[cid]), head_names=["head"]))
            if not strategy.has_global_model:
                personal[cid] = evaluate(m, test, device="cpu").accuracy
        report = strategy.aggregate(updates)
        row = {"round": t + 1, "train_loss": sum(losses.values()) / len(losses),
               "accepted": report.accepted, "rejected": report.rejected,
               "aggregation_error": report.aggregation_error,
               "bytes_up": sum(report.bytes_up.values()), "bytes_down": sum(report.bytes_down.values())}
        if strategy.has_global_model:
            load_global(server_model, strategy)
            ev = evaluate(server_model, test, device="cpu")
            row |= {"accuracy": ev.accuracy, "loss": ev.loss}
        else:
            row |= {"accuracy": sum(personal.values()) / len(personal)}
        result.rounds.append(row)
    return result
