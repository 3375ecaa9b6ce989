"""Server-side evaluation of a round: the global model on the server's held-out split, or (a
strategy without a global model) the clients' personalised accuracies from their replies."""

from __future__ import annotations

import torch.nn as nn

from fedlora import rundata
from fedlora.client import load_global
from fedlora.config import ClientSpec
from fedlora.ledger import number
from fedlora.strategies import Strategy
from fedlora.train import evaluate, release_memory


class ServerEvaluator:
    def __init__(self, model: nn.Module, spec: ClientSpec) -> None:
        self.model, self.spec = model, spec
        self._loader = None

    def loader(self):
        if self._loader is None:  # built once, on first use
            ds = rundata.server_eval_data(self.spec)
            self._loader = rundata.loader(self.spec, ds, self.spec.eval.batch_size, False, 0)
        return self._loader

    def global_model(self, strategy: Strategy) -> dict:
        load_global(self.model, strategy)
        ev = evaluate(self.model, self.loader(), device="cpu")
        release_memory()
        return {"accuracy": ev.accuracy, "loss": ev.loss, "eval_examples": ev.num_examples}

    @staticmethod
    def personal(rows: list[dict]) -> dict:
        """Mean and example-weighted mean of the accepted clients' own ``eval-accuracy``."""
        pers = [(a, n) for r in rows if r.get("accepted")
                and (a := number(r.get("metrics", {}).get("eval-accuracy"))) is not None
                and (n := number(r["metrics"].get("eval-examples", 1))) is not None
                and 0 < n <= max(1, r.get("examples") or 0)]  # at most the client's own size
        if not pers:
            return {}
        weighted = sum(a * n for a, n in pers) / sum(n for _, n in pers)
        return {"personal_accuracy_mean": sum(a for a, _ in pers) / len(pers),
                "personal_accuracy_weighted": weighted, "accuracy": weighted}

    def round_metrics(self, strategy: Strategy, rnd: int, rounds: int, rows: list[dict]) -> dict:
        """What the round reports: every ``eval.every`` rounds (and the last) for a global model."""
        if not strategy.has_global_model:
            return self.personal(rows)
        every = self.spec.eval.every
        if (every and rnd % every == 0) or rnd == rounds:
            return self.global_model(strategy)
        return {}
