"""``fedlora compare``: the same run once per strategy, then one report (optionally swept over a key).

Every strategy gets the same config, seed, partitions and rank assignment; only
``strategy.name`` (and the run folder) changes. ``--centralized`` adds the pooled-data baseline:
one client holding every client's data, at rank ``r_max``, taking as many local steps per round as
all the round's clients together. Results: ``<output_dir>/<name>/<strategy>/`` per run and
``<output_dir>/<name>/report.md`` with ``accuracy_vs_round.png`` and ``accuracy_vs_mb.png``.

``--sweep key=v1,v2,...`` repeats the whole comparison for each value of one config key (the
heterogeneity sweep ``data.alpha=0.1,0.5,10``; accuracy against the privacy budget
``privacy.target_epsilon=3,8``): ``<root>/<key>-<v>/`` holds each value's runs and report, and
``<root>/sweep.md`` the final/best accuracy of every strategy at every value with ``sweep.png``
(final accuracy against the value).

``--seeds 0,1,2`` repeats the comparison once per seed (``<root>/seed-<s>/``) and writes
``<root>/seeds.md``: each strategy's final and best metric as mean ± standard deviation over the
seeds, with the mean MB up / down.

``--resume`` continues a comparison that was stopped (or extends it with ``--rounds``): each run
whose summary covers the rounds asked for is kept, one with checkpoints continues from the newest
that verifies, the others start (``resume_state``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from fedlora.config import RunConfig, load_config, parse_value
from fedlora.report import write_report, write_seed_summary, write_sweep_report
from fedlora.strategies import strategy_names


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in strategy_names()]
    if bad or not names:
        raise ValueError(f"--strategies: unknown {bad or text!r}; choose from {strategy_names()} (a "
                         "plugin's strategy: list its file in strategy.plugins)")
    if len(set(names)) != len(names):
        raise ValueError(f"--strategies lists a strategy twice: {names}")
    return names


def compare_root(base: RunConfig) -> Path:
    """Where a comparison goes: ``run_dir`` when given, else ``<output_dir>/<name>-compare`` — never
    the folder a ``fedlora simulate`` of the same config writes."""
    return Path(base.run_dir) if base.run_dir else Path(base.output_dir) / f"{base.name}-compare"


def plan(config: Path | None, strategies: list[str], overrides: list[str],
         centralized: bool = False, values: dict | None = None) -> tuple[Path, list[tuple[str, RunConfig]]]:
    """Validate every run's config before any of them starts (``overrides``: the user's ``--set``
    strings; ``values``: dotted key -> value set on top, e.g. one sweep value)."""
    values = dict(values or {})
    base = load_config(config, overrides, values=values)
    root = compare_root(base)
    runs = []
    for s in strategies:
        cfg = load_config(config, overrides, values=values | {"strategy.name": s, "run_dir": str(root / s)})
        runs.append((s, cfg))
    if centralized:
        per_round = max(1, math.ceil(base.clients.num * base.clients.fraction_train))
        cfg = load_config(config, overrides, values=values | {
            "strategy.name": "fedavg", "run_dir": str(root / "centralized"),
            "clients.num": 1, "clients.ranks": [base.r_max], "clients.fraction_train": 1.0,
            "data.partition": "iid",  # one client holds everything (a natural split would need one per value)
            "train.local_steps": base.train.local_steps * per_round,
            # synthetic data is drawn per client: the pooled client draws everybody's examples
            "data.examples_per_client": base.data.examples_per_client * base.clients.num})
        runs.append(("centralized", cfg))
    return root, runs


def compare(config: Path | None, strategies: list[str], overrides: list[str],
            run_one: Callable[[RunConfig], Path], centralized: bool = False,
            target: float | None = None, values: dict | None = None) -> Path:
    """Run each planned config with ``run_one`` (returns its run folder), then write the report."""
    root, runs = plan(config, strategies, overrides, centralized, values)
    dirs = [run_one(cfg) for _, cfg in runs]
    base = runs[0][1]
    shown = overrides + [f"{k}={v}" for k, v in (values or {}).items() if k != "run_dir"]
    notes = f"Config `{config or 'simulations/smoke.toml'}`" + (f" with `{' '.join(shown)}`" if shown else "")
    notes += "."
    if centralized:
        notes += " `centralized`: one client with all the data (same total steps)."
    return write_report(dirs, root, title=f"fedlora compare: {base.name}", target=target, notes=notes)


def resume_state(cfg: RunConfig) -> str:
    """What ``--resume`` does with one planned run: ``"done"`` (its summary covers ``cfg.rounds``:
    kept), ``"resume"`` (it has checkpoints: continue from the newest that verifies) or ``"fresh"``.
    A run folder made with another config (any key but ``rounds``) is an error naming the keys."""
    run_dir = cfg.resolved_run_dir()
    saved = run_dir / "config.toml"
    if not saved.is_file():
        return "fresh"
    old = load_config(saved).to_dict()
    new = cfg.to_dict()
    # rounds may grow; the run folder and a data root the run pinned itself (sim.prepare_run_dir) are not
    # the user's choices
    ignore = {"rounds", "run_dir"} | ({"data.root"} if not cfg.data.root else set())
    differ = sorted(_diff(old, new) - ignore)
    if differ:
        raise ValueError(f"--resume: {run_dir} was run with another config ({', '.join(differ)} differ); "
                         "remove that folder, or compare without --resume")
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("rounds") == cfg.rounds:
        return "done"
    return "resume" if any((run_dir / "checkpoints").glob("*")) else "fresh"


def _diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.add(prefix + k)
    return out


def run_config(cfg: RunConfig, engine: str = "flower", timeout: float = 24 * 3600.0,
               resume: bool = False) -> Path:
    """One run through the same path as ``fedlora simulate`` (Flower's engine or the in-process
    grid), from its last checkpoint when ``resume``; returns its run folder. Raises
    ``RuntimeError`` when the run fails."""
    from fedlora import sim

    run_dir = cfg.resolved_run_dir()
    if engine == "inprocess":
        from fedlora.loopback import run_loopback

        run_loopback(cfg, resume=resume)
    elif engine == "flower":
        cfg_path = sim.prepare_run_dir(cfg, resume=resume)
        r = sim.run_flower({"config-path": str(cfg_path), "resume": resume}, cfg.clients.num,
                           cfg.clients.num_cpus, cfg.gpu_fraction(), log_dir=run_dir / "logs",
                           timeout=timeout, ray_address=cfg.clients.ray_address)
        if r.returncode != 0:
            raise RuntimeError(f"{cfg.strategy.name}: flwr run exited with {r.returncode}; logs in "
                               f"{run_dir / 'logs'}\n{r.tail(30)}")
    else:
        raise ValueError(f"--engine must be 'flower' or 'inprocess', got {engine!r}")
    if not (run_dir / "summary.json").exists():
        cause = r.cause() if engine == "flower" else None
        raise RuntimeError(f"{cfg.strategy.name}: the run ended without {run_dir / 'summary.json'}"
                           + (f": {cause}" if cause else ""))
    return run_dir


def parse_sweep(text: str) -> tuple[str, list]:
    """``"data.alpha=0.1,0.5,10"`` → ``("data.alpha", [0.1, 0.5, 10.0])`` (values read as TOML)."""
    key, eq, values = text.partition("=")
    key = key.strip()
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not eq or not key or not items:
        raise ValueError(f"--sweep {text!r} must look like section.key=v1,v2,... "
                         "(e.g. data.alpha=0.1,0.5,10)")
    parsed = [parse_value(v) for v in items]
    if len({json.dumps(v) for v in parsed}) != len(parsed):
        raise ValueError(f"--sweep {text!r} lists a value twice")
    return key, parsed


def sweep_tag(key: str, value) -> str:
    """The folder of one sweep value: ``alpha-0.1`` for ``data.alpha=0.1``."""
    return f"{key.rpartition('.')[2]}-{value}".replace("/", "_")


def plan_sweep(config: Path | None, strategies: list[str], overrides: list[str], key: str,
               values: list, centralized: bool = False) -> tuple[Path, list[tuple[object, dict]]]:
    """Every value's settings, each validated (all its runs planned) before anything runs."""
    base = load_config(config, overrides)
    root = compare_root(base)
    out = []
    for v in values:
        setting = {key: v, "run_dir": str(root / sweep_tag(key, v))}
        plan(config, strategies, overrides, centralized, setting)  # raises on a bad value, first
        out.append((v, setting))
    return root, out


def sweep(config: Path | None, strategies: list[str], overrides: list[str], key: str, values: list,
          run_one: Callable[[RunConfig], Path], centralized: bool = False,
          target: float | None = None) -> Path:
    """``compare`` once per value of ``key``; then ``sweep.md`` + ``sweep.png`` over all of them."""
    root, planned = plan_sweep(config, strategies, overrides, key, values, centralized)
    per_value = []
    for v, setting in planned:
        report = compare(config, strategies, overrides, run_one, centralized, target, setting)
        per_value.append((v, report.parent))
    names = strategies + (["centralized"] if centralized else [])
    runs = [(v, [d / n for n in names]) for v, d in per_value]
    name = load_config(config, overrides).name
    if key == "seed":  # repeats of one comparison: mean ± standard deviation over the seeds
        write_sweep_report(root, key, runs, title=f"fedlora runs per seed: {name}")
        return write_seed_summary(root, runs, title=f"fedlora compare over seeds: {name}")
    return write_sweep_report(root, key, runs, title=f"fedlora sweep of {key}: {name}")
