"""``fedlora compare``: the same run once per strategy, then one report.

Every strategy gets the same config, seed, partitions and rank assignment; only
``strategy.name`` (and the run folder) changes. ``--centralized`` adds the pooled-data baseline:
one client holding every client's data, at rank ``r_max``, taking as many local steps per round as
all the round's clients together. Results: ``<output_dir>/<name>/<strategy>/`` per run and
``<output_dir>/<name>/report.md`` with ``accuracy_vs_round.png`` and ``accuracy_vs_mb.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from fedlora.config import STRATEGY_NAMES, RunConfig, load_config
from fedlora.report import write_report


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGY_NAMES]
    if bad or not names:
        raise ValueError(f"--strategies: unknown {bad or text!r}; choose from {list(STRATEGY_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--strategies lists a strategy twice: {names}")
    return names


def plan(config: Path | None, strategies: list[str], overrides: list[str],
         centralized: bool = False) -> tuple[Path, list[tuple[str, RunConfig]]]:
    """Validate every run's config before any of them starts."""
    base = load_config(config, overrides)
    root = Path(base.run_dir) if base.run_dir else Path(base.output_dir) / base.name
    runs = []
    for s in strategies:
        cfg = load_config(config, overrides + [f"strategy.name={json.dumps(s)}",
                                               f"run_dir={json.dumps(str(root / s))}"])
        runs.append((s, cfg))
    if centralized:
        per_round = max(1, math.ceil(base.clients.num * base.clients.fraction_train))
        cfg = load_config(config, overrides + [
            'strategy.name="fedavg"', f"run_dir={json.dumps(str(root / 'centralized'))}",
            "clients.num=1", f"clients.ranks=[{base.r_max}]", "clients.fraction_train=1.0",
            f"train.local_steps={base.train.local_steps * per_round}",
            # synthetic data is drawn per client: the pooled client draws everybody's examples
            f"data.examples_per_client={base.data.examples_per_client * base.clients.num}"])
        runs.append(("centralized", cfg))
    return root, runs


def compare(config: Path | None, strategies: list[str], overrides: list[str],
            run_one: Callable[[RunConfig], Path], centralized: bool = False,
            target: float | None = None) -> Path:
    """Run each planned config with ``run_one`` (returns its run folder), then write the report."""
    root, runs = plan(config, strategies, overrides, centralized)
    dirs = [run_one(cfg) for _, cfg in runs]
    base = runs[0][1]
    notes = (f"Config `{config or 'simulations/smoke.toml'}`"
             + (f" with `{' '.join(overrides)}`" if overrides else "")
             + f": model `{base.model.name}`, data `{base.data.name}` ({base.data.partition}), "
             f"{base.clients.num} clients of ranks {base.clients.ranks}, {base.rounds} rounds, "
             f"{base.train.local_steps} local steps, seed {base.seed}."
             + (" `centralized`: one client with all the data (same total steps)." if centralized else ""))
    return write_report(dirs, root, title=f"fedlora compare: {base.name}", target=target, notes=notes)


def run_config(cfg: RunConfig, engine: str = "flower", timeout: float = 24 * 3600.0) -> Path:
    """One run through the same path as ``fedlora simulate`` (Flower's engine or the in-process
    grid); returns its run folder. Raises ``RuntimeError`` when the run fails."""
    from fedlora import sim

    run_dir = cfg.resolved_run_dir()
    if engine == "inprocess":
        sim.run_inprocess(cfg)
    elif engine == "flower":
        cfg_path = sim.prepare_run_dir(cfg)
        r = sim.run_flower({"config-path": str(cfg_path), "resume": False}, cfg.clients.num,
                           cfg.clients.num_cpus, cfg.clients.num_gpus, log_dir=run_dir / "logs",
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{cfg.strategy.name}: flwr run exited with {r.returncode}; logs in "
                               f"{run_dir / 'logs'}\n{r.tail(30)}")
    else:
        raise ValueError(f"--engine must be 'flower' or 'inprocess', got {engine!r}")
    if not (run_dir / "summary.json").exists():
        raise RuntimeError(f"{cfg.strategy.name}: the run ended without {run_dir / 'summary.json'}")
    return run_dir
