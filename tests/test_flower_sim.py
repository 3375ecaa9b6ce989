"""`fedlora simulate` on Flower's simulation engine (`flwr run`, Ray): the real apps end to end.

The default suite runs one (fedex, 3 virtual clients of ranks 2/4/8, 2 rounds, tiny model) and checks
it against the same run over the in-process LoopbackGrid, and one HetLoRA run whose clients prune
their rank; the other strategies are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.config import load_config
from fedlora.loopback import run_loopback

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RANKS = [2, 4, 8]


def _flower_sections() -> str:
    """pyproject's Flower tables (what `flwr run` would rewrite when migrating federations)."""
    text = (ROOT / "pyproject.toml").read_text()
    return text[text.index("[tool.flwr"):]


def _simulate(tmp_path: Path, strategy: str, *sets: str) -> Path:
    run_dir = tmp_path / f"sim-{strategy}"
    cmd = [str(BIN / "fedlora"), "simulate", "--strategy", strategy, "--rounds", "2",
           "--set", f"run-dir={json.dumps(str(run_dir))}", "--set", f"num-clients={len(RANKS)}",
           "--set", f"ranks={RANKS}"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    return run_dir


def _check(tmp_path: Path, strategy: str) -> None:
    before = _flower_sections()
    run_dir = _simulate(tmp_path, strategy)
    assert _flower_sections() == before  # flwr run rewrote nothing in pyproject
    assert "federations" not in before
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert not r["failures"] and sorted(c["rank"] for c in r["clients"]) == RANKS
        assert all(c["accepted"] and c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in r["clients"])
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and (run_dir / "config.toml").is_file()
    assert sorted((run_dir / "checkpoints").iterdir())
    if strategy == "fedsa":
        return
    # the same run through the LoopbackGrid: the same global delta (Flower's engine adds no math)
    cfg = load_config(run_dir / "config.toml", [f"run_dir={json.dumps(str(tmp_path / 'loop'))}"])
    run_loopback(cfg)
    a = load_file(str(run_dir / "global_delta.safetensors"))
    b = load_file(str(tmp_path / "loop" / "global_delta.safetensors"))
    assert set(a) == set(b) and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_flwr_run_fedex(tmp_path):
    _check(tmp_path, "fedex")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "flora", "fedsb", "fedsa",
                                      "ffa", "rolora", "fedsvd", "flexlora", "hetlora"])
def test_flwr_run_other_strategies(tmp_path, strategy):
    _check(tmp_path, strategy)


def test_flwr_run_hetlora_clients_prune_on_flowers_engine(tmp_path):
    """The default engine run of issue #15's rules: HetLoRA's pruning fields travel in Flower's
    records to Ray-hosted ClientApps, whose replies come back at the pruned rank, accepted."""
    run_dir = _simulate(tmp_path, "hetlora", "strategy.hetlora_lambda=20.0", "strategy.hetlora_gamma=0.5",
                        "train.local_steps=5")
    r1, r2 = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not r1["failures"] and not r2["failures"]
    assert all(c["accepted"] for r in (r1, r2) for c in r["clients"])
    assert sorted(c["metrics"]["upload-rank"] for c in r1["clients"]) == RANKS
    up = {c["rank"]: c["metrics"]["upload-rank"] for c in r2["clients"]}
    assert up[2] == 1 and up[4] == 2  # pruned to floor(γ·r), and the server took them
    assert r2["tensor_bytes_up"] < r1["tensor_bytes_up"]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2


def test_cli_inprocess_then_resume(tmp_path):
    """`fedlora simulate --engine inprocess`, then `--resume` that run folder for one more round."""
    run_dir = tmp_path / "run"
    base = [str(BIN / "fedlora"), "simulate", "--engine", "inprocess"]
    first = subprocess.run(base + ["--rounds", "2", "--set", f"run-dir={json.dumps(str(run_dir))}",
                                   "--set", "clients.num=3"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = subprocess.run(base + ["--resume", str(run_dir), "--rounds", "3"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and not any(r["failures"] for r in rows)
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
    assert "rounds = 3" in (run_dir / "config.toml").read_text()


@pytest.mark.slow
def test_flowers_engine_repeats_bit_for_bit_also_after_a_resume(tmp_path):
    def run(name: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "fedlora"), "simulate", "--rounds", "3", "--set",
               f"run-dir={json.dumps(str(tmp_path / name))}", "--set", "train.local_steps=3", *extra]
        env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    for name in ("a", "b"):
        assert run(name).returncode == 0
    assert run("c", "--rounds", "2").returncode == 0  # stopped after round 2 ...
    res = run("c", "--resume", str(tmp_path / "c"))  # ... and resumed (fresh client processes)
    assert res.returncode == 0, res.stdout[-3000:]
    a, b, c = (load_file(str(tmp_path / n / "global_delta.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a), max(float((a[k] - c[k]).abs().max()) for k in a)
