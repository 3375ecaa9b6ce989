"""A strategy that exists nowhere else (FFA-LoRA, arXiv 2403.12313), registered from this file.

It runs through the in-process harness, the loopback Flower grid and ``fedlora simulate``
(``strategy.plugins`` names this file) with no other file of the project knowing about it: the
clients learn from each payload what to train (only B) and what to upload.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora.lora import lora_layers
from fedlora.strategies import (
    BaseDelta,
    ClientPayload,
    ClientUpdate,
    LayerSpec,
    LowRank,
    Strategy,
    create_strategy,
    register_strategy,
    strategy_names,
)
from fedlora.strategies.exactness import Term, low_rank
from fedlora.strategies.sums import GroupSums

ROOT = Path(__file__).resolve().parents[1]
HERE = str(Path(__file__).resolve())


@register_strategy
class FFATest(Strategy):
    """FFA-LoRA: A frozen at its seeded initialisation, only B trained and averaged (exact).

    A client of rank r trains ``B[:, :r]`` against ``A[:r]`` and holds the tail
    ``s·B̄[:, r:]·A[r:]`` in its base (sent as a factored reset each round), so with
    ``B̃_i = [B_i, B̄_old[:, r_i:]]``::

        B̄ = Σ p_i B̃_i,      W_g = W0 + s·B̄·A = Σ p_i W_i
    """

    name = "ffa_test"
    trains = frozenset({"B"})
    uploads = frozenset({"B"})
    exact = True

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.A = {n: self._init_a(i, s) for i, (n, s) in enumerate(self.layers.items())}
        self.B = {n: self._zeros(s.d_out, self.r_max) for n, s in self.layers.items()}

    def _payload(self, client_id: str, rank: int, base_version: int) -> ClientPayload:
        factors = {n: {"A": self.A[n][:rank].clone(), "B": self.B[n][:, :rank].clone()} for n in self.layers}
        deltas = []
        if rank < self.r_max:
            deltas = [BaseDelta(self.version, {n: LowRank(self.scale * self.B[n][:, rank:], self.A[n][rank:])
                                               for n in self.layers}, reset=True)]
        elif base_version:
            deltas = [BaseDelta(self.version, {n: LowRank(self._zeros(s.d_out, 1), self._zeros(1, s.d_in))
                                               for n, s in self.layers.items()}, reset=True)]
        return ClientPayload(client_id, rank, factors, deltas, self.version)

    def _aggregate(self, updates: list[ClientUpdate], p: list[float], sums: GroupSums) -> None:
        self._old = self.B
        new = {}
        for i, n in enumerate(self.layers):
            B = torch.zeros_like(self.B[n])
            for r, by in sums.by_key.items():
                B[:, :r] += by["B"][i]
                B[:, r:] += sums.weight[r] * self.B[n][:, r:]
            new[n] = B
        self.B = new

    def client_change(self, u: ClientUpdate, layer: str) -> list[Term]:
        r = u.rank
        return [low_rank(self.scale, u.factors[layer]["B"] - self.B[layer][:, :r], self.A[layer][:r])]

    def global_change(self, layer: str) -> list[Term]:
        return [low_rank(self.scale, self.B[layer] - self._old[layer], self.A[layer])]

    def global_delta(self, layer: str) -> torch.Tensor:
        return self.scale * self.B[layer] @ self.A[layer]

    def _state(self) -> dict:
        return {"A": self.A, "B": self.B}

    def _load_state(self, st: dict) -> None:
        self.A = {n: t.to(self.dtype).clone() for n, t in st["A"].items()}
        self.B = {n: t.to(self.dtype).clone() for n, t in st["B"].items()}


def test_registered_and_exact_with_mixed_ranks_frozen_a():
    # (imported here: `fedlora simulate` loads this file as a plugin, outside the tests' path)
    from strategy_helpers import SHAPES, Multi, apply_payload, effective, layer_specs, make_update, w0

    assert "ffa_test" in strategy_names()
    s = create_strategy("ffa_test", layers=layer_specs(), r_max=4, scale=1.5, dtype=torch.float64, seed=3)
    gen = torch.Generator().manual_seed(0)
    ranks, n_ex = [1, 4, 2, 4], [5, 9, 3, 7]
    clients = [Multi(0, r, 1.5, "lora") for r in ranks]
    base = w0(clients[0])
    for _ in range(3):
        ups, W = [], []
        for i, m in enumerate(clients):
            p = s.payload(f"c{i}", ranks[i], s.version)
            apply_payload(m, p)
            for n in SHAPES:  # Sync: every client starts on the global model
                torch.testing.assert_close(effective(m)[n], base[n] + s.global_delta(n), rtol=1e-12,
                                           atol=1e-12)
            for lin in lora_layers(m).values():  # local "training": what the payload left trainable
                assert not lin.lora_a.weight.requires_grad and lin.lora_b.weight.requires_grad
                with torch.no_grad():
                    lin.lora_b.weight.add_(torch.randn(lin.lora_b.weight.shape, generator=gen,
                                                       dtype=torch.float64))
            ups.append(make_update(m, p, n_ex[i]))
            assert all(set(f) == {"B"} for f in ups[-1].factors.values())
            W.append(effective(m))
        rep = s.aggregate(ups)
        assert rep.rejected == {} and rep.aggregation_error < 1e-12
        total = sum(n_ex)
        for n in SHAPES:  # Exact: W_g = Σ p_i W_i, against the clients' own weights
            target = sum(n_ex[i] / total * W[i][n] for i in range(len(ranks)))
            torch.testing.assert_close(base[n] + s.global_delta(n), target, rtol=1e-10, atol=1e-10)


def test_harness_learns_with_the_plugin():
    from fedlora.testing import run_harness

    res = run_harness("ffa_test", [2, 4, 4], rounds=3, local_steps=10, seed=0)
    assert res.strategy.name == "ffa_test"
    assert all(r["rejected"] == {} for r in res.rounds)
    assert res.rounds[-1]["accuracy"] > 0.6  # chance is 0.5 on the synthetic task


def _cfg_values(tmp_path: Path, name: str) -> dict:
    return {"strategy.name": "ffa_test", "strategy.plugins": [HERE], "rounds": 2,
            "clients.num": 3, "clients.ranks": [2, 4], "train.local_steps": 5,
            "run_dir": str(tmp_path / name)}


def test_loopback_grid_runs_the_plugin(tmp_path):
    from fedlora.config import load_config
    from fedlora.loopback import run_loopback

    cfg = load_config(None, values=_cfg_values(tmp_path, "loop"))
    summary = run_loopback(cfg)
    rows = [json.loads(x) for x in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["strategy"] for r in rows] == ["ffa_test"] * 2
    assert all(c["accepted"] for r in rows for c in r["clients"])
    assert all(r["aggregation_error"] < 1e-6 for r in rows)
    assert summary["final_accuracy"] is not None


def _simulate(tmp_path: Path, engine: str) -> subprocess.CompletedProcess:
    run = tmp_path / f"sim-{engine}"
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate", "--strategy", "ffa_test", "--rounds", "2",
         "--engine", engine, "--set", f"strategy.plugins=[{json.dumps(HERE)}]", "--set", "clients.num=3",
         "--set", "train.local_steps=5", "--set", f"run_dir={json.dumps(str(run))}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_fedlora_simulate_runs_the_plugin_in_process(tmp_path):
    res = _simulate(tmp_path, "inprocess")
    assert res.returncode == 0, res.stdout + res.stderr
    s = json.loads((tmp_path / "sim-inprocess" / "summary.json").read_text())
    assert s["rounds"] == 2 and s["final_accuracy"] is not None


@pytest.mark.slow
def test_fedlora_simulate_runs_the_plugin_on_flowers_engine(tmp_path):
    res = _simulate(tmp_path, "flower")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = (tmp_path / "sim-flower" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["strategy"] for r in rows] == ["ffa_test"] * 2


# ---- what a plugin author meets -------------------------------------------------------------------

TRIMMED = '''
from fedlora.strategies import register_strategy
from fedlora.strategies.fedavg import FedAvg


@register_strategy
class Trimmed(FedAvg):
    """FedAvg with a setting of its own (to show it arrives)."""
    name = "trimmed_test"
    config_keys = ("trim",)

    def __init__(self, *args, trim: float, **kw):
        super().__init__(*args, **kw)
        self.trim = trim
'''


@pytest.fixture(scope="module")
def trimmed_plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "trimmed_rule.py"
    path.write_text(TRIMMED)
    return path


def test_a_rule_missing_a_hook_is_refused_when_it_registers_naming_the_hooks():
    class Half(Strategy):
        name = "half_test"

        def _payload(self, client_id, rank, base_version):
            raise AssertionError

        def _aggregate(self, updates, p, sums):
            raise AssertionError

    with pytest.raises(TypeError, match=r"'half_test' \(.*Half\) does not implement _state, _load_state, "
                                        r"global_delta, client_change, global_change"):
        register_strategy(Half)
    Half._aggregation_error = lambda self, clients, p: 0.0  # its own error measure: no global_change
    with pytest.raises(TypeError, match=r"does not implement _state, _load_state, global_delta, "
                                        r"client_change:"):  # (collected for the diagnostic anyway)
        register_strategy(Half)
    Half.has_global_model = False  # (no global model: no delta or diagnostic to give)
    with pytest.raises(TypeError, match=r"does not implement _state, _load_state:"):
        register_strategy(Half)
    assert "half_test" not in strategy_names()


def test_a_plugins_own_settings_arrive_through_strategy_options(tmp_path, trimmed_plugin):
    from fedlora.config import load_config

    base = {"strategy.name": "trimmed_test", "strategy.plugins": [str(trimmed_plugin)],
            "run_dir": str(tmp_path / "r")}
    cfg = load_config(None, ["strategy.options.trim=0.2"], values=base)
    assert cfg.strategy_kwargs() == {"trim": 0.2}
    assert cfg.to_dict()["strategy"]["options"] == {"trim": 0.2}  # written to the run's config.toml
    with pytest.raises(ValueError, match=r"strategy.options: no strategy takes \['trimm'\]"):
        load_config(None, ["strategy.options.trimm=0.2"], values=base)
    with pytest.raises(ValueError, match=r"needs the settings \['trim'\]: set them in \[strategy.options\]"):
        load_config(None, values=base)
    with pytest.raises(ValueError, match=r"strategy.options: \['hetlora_gamma'\] are \[strategy\] keys: "
                                         r"set strategy.hetlora_gamma"):
        load_config(None, ["strategy.options.trim=0.2", "strategy.options.hetlora_gamma=2.0"], values=base)


def test_a_plugin_setting_with_a_default_may_be_left_out(tmp_path):
    from fedlora.config import load_config

    path = tmp_path / "trim_default.py"
    path.write_text(TRIMMED.replace("trimmed_test", "trim_default_test")
                    .replace("trim: float,", "trim: float = 0.3,"))
    cfg = load_config(None, values={"strategy.name": "trim_default_test", "strategy.plugins": [str(path)],
                                    "run_dir": str(tmp_path / "r")})
    assert cfg.strategy_kwargs() == {}
    s = create_strategy("trim_default_test", layers={"l": LayerSpec(3, 4)}, r_max=2, scale=1.0,
                        **cfg.strategy_kwargs())
    assert s.trim == 0.3


def test_a_relative_plugin_path_is_found_next_to_the_config_or_else_in_the_working_directory(
        tmp_path, monkeypatch, trimmed_plugin):
    from fedlora.config import load_config

    monkeypatch.chdir(trimmed_plugin.parent)
    conf = tmp_path / "conf"
    conf.mkdir()
    toml = conf / "run.toml"
    toml.write_text('[strategy]\nname = "fedavg"\n')
    cfg = load_config(toml, ['strategy.plugins=["trimmed_rule.py"]'])  # only in the working directory
    assert cfg.strategy.plugins == [str(trimmed_plugin.resolve())]
    (conf / "trimmed_rule.py").write_text(TRIMMED)  # the same class from another file: next to the config
    with pytest.raises(ValueError, match=r"strategy name 'trimmed_test' is taken"):
        load_config(toml, ['strategy.plugins=["trimmed_rule.py"]'])  # (it is preferred, so it loads)


def test_fedlora_compare_runs_a_plugins_strategy(tmp_path, trimmed_plugin):
    res = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "compare", "--strategies", "fedavg,trimmed_test",
         "--rounds", "1",
         "--engine", "inprocess", "--set", f"strategy.plugins=[{json.dumps(str(trimmed_plugin))}]",
         "--set", "strategy.options.trim=0.1", "--set", "clients.num=2", "--set", "train.local_steps=2",
         "--set", f"run_dir={json.dumps(str(tmp_path / 'cmp'))}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "trimmed_test" in (tmp_path / "cmp" / "report.md").read_text()


def test_a_plugin_that_registers_nothing_is_named(tmp_path):
    from fedlora.config import load_config

    path = tmp_path / "undecorated.py"
    path.write_text(TRIMMED.replace("@register_strategy\n", "").replace("trimmed_test", "undecorated_test"))
    with pytest.raises(ValueError, match=r"strategy.plugins: .*undecorated.py' could not be loaded: strategy "
                                         r"plugin .* registers no strategy: decorate its Strategy subclass"):
        load_config(None, values={"strategy.name": "undecorated_test", "strategy.plugins": [str(path)]})


def test_a_plugin_package_that_registers_in_a_submodule_is_accepted(tmp_path, monkeypatch):
    from fedlora.strategies import load_plugin

    pkg = tmp_path / "myrules_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import rules  # noqa: F401\n")
    (pkg / "rules.py").write_text(TRIMMED.replace("trimmed_test", "pkg_rule_test"))
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugin("myrules_pkg")
    load_plugin("myrules_pkg")  # (imported before: still a plugin that registered its rule)
    assert "pkg_rule_test" in strategy_names()
