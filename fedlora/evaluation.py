"""Server-side evaluation of a round: the global model on the server's held-out split, or (a
strategy without a global model) the clients' personalised accuracies from their replies.

Classification: ``accuracy`` and ``loss``. Causal LM: ``loss`` (mean NLL per scored token),
``perplexity`` and ``token_accuracy``; with ``eval.generate = N``, greedy generations for the first N
held-out prompts (``eval.max_new_tokens``; a plain ``text`` row is split: its first half of words
is the prompt, the rest the reference) are appended to ``<run_dir>/generations.jsonl`` (round,
prompt, reference, output) and scored: ``gen_exact_match`` (output = reference, whitespace
stripped) and ``gen_contains`` (the reference appears in the output)."""

from __future__ import annotations

import math

import torch.nn as nn

from fedlora import rundata
from fedlora.client import load_global
from fedlora.config import ClientSpec
from fedlora.runlog import number
from fedlora.strategies import Strategy
from fedlora.train import evaluate, release_memory


class ServerEvaluator:
    def __init__(self, model: nn.Module, spec: ClientSpec, run_dir=None) -> None:
        self.model, self.spec, self.run_dir = model, spec, run_dir
        self._loader = None

    def loader(self):
        if self._loader is None:  # built once, on first use
            ds = rundata.server_eval_data(self.spec)
            self._loader = rundata.loader(self.spec, ds, self.spec.eval.batch_size, False, 0)
        return self._loader

    def global_model(self, strategy: Strategy, rnd: int = 0) -> dict:
        load_global(self.model, strategy)
        ev = evaluate(self.model, self.loader(), device="cpu")
        release_memory()
        if not rundata.is_causal(self.spec):
            return {"accuracy": ev.accuracy, "loss": ev.loss, "eval_examples": ev.num_examples}
        out = {"loss": ev.loss, "perplexity": ev.perplexity, "token_accuracy": ev.accuracy,
               "eval_examples": ev.num_examples, "eval_tokens": ev.tokens}
        if self.spec.eval.generate:
            out |= self.generations(rnd)
        return out

    def generations(self, rnd: int) -> dict:
        """Greedy continuations of the first ``eval.generate`` held-out prompts, written and scored."""
        import json

        import torch

        from fedlora.hf_models import get_tokenizer

        tok = get_tokenizer(self.spec.model.name)
        records, exact, contains = [], 0, 0
        self.model.eval()
        for prompt, reference, templated in rundata.server_prompts(self.spec, self.spec.eval.generate):
            ids = tok(prompt, add_special_tokens=not templated, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:  # an empty prompt and no BOS added: start from BOS, else EOS (GPT-2's way)
                start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
                ids = torch.tensor([[start]])
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=self.spec.eval.max_new_tokens, use_cache=True,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            exact += text.strip() == reference.strip()
            contains += bool(reference.strip()) and reference.strip() in text
            records.append({"round": rnd, "prompt": prompt, "reference": reference, "output": text})
        if self.run_dir is not None:
            with open(f"{self.run_dir}/generations.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        n = max(len(records), 1)
        return {"gen_exact_match": exact / n, "gen_contains": contains / n}

    @staticmethod
    def personal(rows: list[dict], causal: bool = False) -> dict:
        """Mean and example-weighted mean of the accepted clients' own ``eval-accuracy``; for a
        causal LM, the perplexity of the example-weighted mean of their own ``eval-loss``."""
        key = "eval-loss" if causal else "eval-accuracy"
        # a client's word, so within what the metric can be: a loss >= 0, an accuracy in [0, 1]
        pers = [(a, n) for r in rows if r.get("accepted")
                and (a := number(r.get("metrics", {}).get(key))) is not None
                and 0 <= a <= (math.inf if causal else 1)
                and (n := number(r["metrics"].get("eval-examples", 1))) is not None
                and 0 < n <= max(1, r.get("examples") or 0)]  # at most the client's own size
        if not pers:
            return {}
        weighted = sum(a * n for a, n in pers) / sum(n for _, n in pers)
        if causal:
            ppl = math.exp(min(weighted, 700.0))
            return {"personal_loss_weighted": weighted, "personal_perplexity_weighted": ppl,
                    "perplexity": ppl}
        return {"personal_accuracy_mean": sum(a for a, _ in pers) / len(pers),
                "personal_accuracy_weighted": weighted, "accuracy": weighted}

    def round_metrics(self, strategy: Strategy, rnd: int, rounds: int, rows: list[dict]) -> dict:
        """What the round reports: every ``eval.every`` rounds (and the last) for a global model."""
        if not strategy.has_global_model:
            return self.personal(rows, rundata.is_causal(self.spec))
        every = self.spec.eval.every
        if (every and rnd % every == 0) or rnd == rounds:
            return self.global_model(strategy, rnd)
        return {}
