"""``fedlora`` command line (typer + rich).

``fedlora simulate [CONFIG] [--strategy NAME] [--rounds N] [--set key=value ...] [--resume RUN_DIR]
[--engine flower|inprocess]``: validates the config first (nothing starts on a bad key or value),
writes the resolved config to ``runs/<name>/config.toml``, runs the Flower simulation (default:
Flower's engine through ``flwr run``; ``inprocess``: the same apps over an in-process grid, no Ray),
shows a live table per round and leaves ``metrics.jsonl``, ``summary.json``, ``checkpoints/``,
``global_delta.safetensors`` and ``adapter/`` in the run folder. No CONFIG: ``simulations/smoke.toml``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from fedlora.config import RunConfig, load_config
from fedlora.strategies import strategy_names

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated LoRA fine-tuning on Flower (exact aggregation, mixed ranks).")
console = Console()
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "simulations" / "smoke.toml"


@app.callback()
def _root() -> None:
    """fedlora: federated LoRA on Flower."""


def resolve(config: Path | None, strategy: str | None, rounds: int | None, sets: list[str],
            resume: Path | None) -> RunConfig:
    overrides = list(sets)
    values: dict = {}
    if strategy:
        values["strategy.name"] = strategy
    if rounds is not None:
        values["rounds"] = rounds
    if resume is not None:
        cfg_path = Path(resume) / "config.toml"
        if not cfg_path.is_file():
            raise ValueError(f"--resume {resume}: no config.toml there (give a run folder written by "
                             "`fedlora simulate`, e.g. runs/smoke)")
        cfg = load_config(cfg_path, overrides, values=values)
        was = load_config(cfg_path, validate_data=False).strategy.name
        if cfg.strategy.name != was:  # (checked before anything in the run folder is touched)
            raise ValueError(f"--resume {resume}: that run's strategy is {was!r}, not {cfg.strategy.name!r}: "
                             "leave out --strategy to continue it (another strategy is a new run: "
                             "fedlora simulate --strategy NAME --set name=NEW_NAME)")
        cfg.run_dir = str(Path(resume).absolute())
        return cfg
    path = config if config is not None else (SMOKE if SMOKE.is_file() else None)
    return load_config(path, overrides, values=values)


@app.command()
def simulate(
    config: Annotated[Path | None, typer.Argument(help="run TOML (default: simulations/smoke.toml)")] = None,
    strategy: Annotated[str | None, typer.Option(
        "--strategy", "-s", help="a registered strategy: " + " | ".join(strategy_names()))] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", "-r", help="number of rounds")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue runs/<name> from its "
                                                "last checkpoint")] = None,
    engine: Annotated[str, typer.Option("--engine", help="flower | inprocess (no Ray)")] = "flower",
    timeout: Annotated[float, typer.Option("--timeout", help="seconds before the run is stopped")] = 86400.0,
) -> None:
    """Run a federated simulation and write runs/<name>/.

    CONFIG: a run TOML (default: simulations/smoke.toml); every key is documented in
    fedlora/config.py.
    """
    from fedlora import sim
    from fedlora.runlog import follow, round_table

    try:
        cfg = resolve(config, strategy, rounds, set_ or [], resume)
        if engine not in ("flower", "inprocess"):
            raise ValueError(f"--engine must be 'flower' or 'inprocess', got {engine!r}")
        gpus, data_note = _preflight(cfg, engine)
    except ValueError as e:
        _fail("config error", e)
        raise typer.Exit(2) from e
    run_dir = cfg.resolved_run_dir()
    if resume is not None:
        _resume_note(run_dir)
    elif (before := sim.earlier_run(run_dir)) is not None:
        console.print(f"{run_dir} held {before}: replaced (--set name=... keeps runs apart)", markup=False,
                      style="yellow")
    cfg_path = sim.prepare_run_dir(cfg, resume=resume is not None)
    console.print(f"[bold]fedlora[/bold] {cfg.name}: {cfg.strategy.name}, {cfg.clients.num} clients "
                  f"(ranks {cfg.clients.ranks}), {cfg.rounds} rounds, engine {engine} -> {run_dir}")
    if data_note:
        console.print(data_note, markup=False)
    if engine == "flower":
        _gpu_note(cfg)
    result: dict = {}

    def work() -> None:
        try:
            if engine == "inprocess":
                from fedlora.loopback import run_loopback

                result["summary"] = run_loopback(cfg, resume=resume is not None)
                result["rc"] = 0
            else:
                r = sim.run_flower({"config-path": str(cfg_path), "resume": resume is not None},
                                   cfg.clients.num, cfg.clients.num_cpus, gpus,
                                   log_dir=run_dir / "logs", timeout=timeout,
                                   ray_address=cfg.clients.ray_address)
                result["rc"], result["run"] = r.returncode, r
        except BaseException as e:  # noqa: BLE001 - reported below
            result["rc"], result["error"] = 1, e

    def next_step() -> str:
        from fedlora.checkpoint import latest_valid_checkpoint

        ck, _ = latest_valid_checkpoint(run_dir)
        again = shlex.join(["fedlora", "simulate", "--resume", str(run_dir)]
                           + (["--engine", engine] if engine != "flower" else []))
        return f"checkpoint {ck.name} kept; continue with: {again}" if ck else "no round was checkpointed yet"

    th = threading.Thread(target=work, daemon=True)
    title = f"{cfg.name} · {cfg.strategy.name}"
    lm = cfg.model.task == "causal-lm"
    with _stoppable(next_step):
        th.start()
        with Live(round_table([], title, lm), console=console, refresh_per_second=2) as live:
            for rows in follow(run_dir / "metrics.jsonl", stop=lambda: not th.is_alive()):
                live.update(round_table(rows, title, lm))
        console.print()  # the live table's last line is left open when the output is not a terminal
        th.join()
    summary = run_dir / "summary.json"
    if result.get("rc") != 0 or not summary.exists():
        # whatever ended the run reaches the terminal with its cause, not only "see the logs"
        if "error" in result:
            err = result["error"]
            console.print(f"[red]run failed:[/red] {type(err).__name__}: {escape(str(err))}")
        elif "run" in result:
            cause = result["run"].cause()
            console.print("run failed: " + cause if cause else result["run"].tail(40), markup=False,
                          style="red" if cause else None)
            console.print(f"the run ended without {summary.name}"
                          + (f" (flwr run's exit code: {result['rc']})" if result["rc"] else "")
                          + f"; logs in {run_dir / 'logs'}", markup=False)
        else:
            console.print(f"[red]the run ended without {summary}[/red]")
        raise typer.Exit(1)
    s = json.loads(summary.read_text())
    metric = s.get("metric", "accuracy")
    console.print(f"final {metric} {_fmt(s.get('final_' + metric))}, MB up {s.get('bytes_up', 0) / 1e6:.3f}, "
                  f"MB down {s.get('bytes_down', 0) / 1e6:.3f} -> {run_dir}")
    idle = s.get("rounds_without_training") or []
    troubles = client_errors(run_dir / "metrics.jsonl", idle or None)
    if idle:
        console.print(f"[yellow]no client's update was accepted in round(s) {idle}[/yellow]")
    elif troubles:
        console.print("[yellow]some clients' replies failed or were rejected (each one is in "
                      "metrics.jsonl):[/yellow]")
    for reason, count in troubles:
        console.print(f"  {count}× {reason}", markup=False)
    if s.get("rounds") and len(idle) == s["rounds"]:
        console.print("[red]no client trained in any round: the model never moved[/red]")
        raise typer.Exit(1)


def client_errors(metrics: Path, rounds: list[int] | None = None, limit: int = 3) -> list[tuple[str, int]]:
    """The most frequent reasons the clients' replies failed or were rejected (in ``rounds``; None:
    all), each client's once per round."""
    from collections import Counter

    counts: Counter = Counter()
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        row = json.loads(line)
        if rounds is not None and row.get("round") not in rounds:
            continue
        counted = set()
        for c in row.get("clients", []):
            reason = c.get("error") or c.get("rejected")
            if not c.get("accepted") and reason:
                counts[str(reason)[:300]] += 1
                counted.add(c.get("id"))
        for f in row.get("failures", []):
            if f.get("error") and (f.get("client") is None or f["client"] not in counted):
                counts[str(f["error"])[:300]] += 1
    return counts.most_common(limit)


def _resume_note(run_dir: Path) -> None:
    """Say on the terminal which checkpoint a resume starts from (and which it skips); none that
    verifies is an error here, before anything starts."""
    from fedlora.checkpoint import latest_valid_checkpoint

    path, skipped = latest_valid_checkpoint(run_dir)
    for bad, reason in skipped:
        console.print(f"[yellow]skipping {bad.name}:[/yellow] {escape(str(reason))}")
    if path is None and skipped:
        console.print(f"[red]--resume {run_dir}: no checkpoint verifies[/red]")
        raise typer.Exit(1)
    console.print(f"resuming from {path.name}" if path else f"--resume {run_dir}: no checkpoint yet, "
                  "starting from round 1")


@contextlib.contextmanager
def _stoppable(next_step: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C or SIGTERM ends the command with what it got to and how to continue, exit 130 / 143
    (the processes it started are ended by their reaper, which sees this one go; an atomic
    checkpoint is whole or absent)."""
    got: list[int] = []

    def on_term(signum, _frame) -> None:
        got.append(signum)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        yield
    except KeyboardInterrupt:
        console.show_cursor(True)  # (a live table or progress bar hid it)
        console.print()
        console.print(f"stopped ({'SIGTERM' if got else 'Ctrl-C'}): {next_step()}", markup=False,
                      style="yellow")
        code = 143 if got else 130
        if not _ENTRY_POINT:  # called as a library (a notebook, a test): leave its process alone
            raise typer.Exit(code) from None
        sys.stdout.flush()
        sys.stderr.flush()
        # at once: an in-process run's worker thread is inside torch, which aborts the interpreter's
        # shutdown ("terminate called without an active exception")
        os._exit(code)
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _fail(what: str, e: Exception) -> None:
    console.print(f"[red]{what}:[/red] {escape(str(e))}")  # verbatim: "[data]" is text, not a style


def _preflight(cfg: RunConfig, engine: str) -> tuple[float, str]:
    """Before anything starts: ``(Ray's GPU share per client, a causal LM's data line)``, checking
    that the clients' device is on this machine and that their rows tokenise."""
    if engine == "flower":
        gpus = cfg.gpu_fraction()  # (checks the device too)
    else:
        cfg.check_simulation_device()
        gpus = 0.0
    return gpus, check_data(cfg)


def check_data(cfg: RunConfig) -> str:
    """A causal-LM run's rows, tokenised before anything starts (``rundata.check_causal_data``)."""
    if cfg.model.task != "causal-lm":
        return ""
    from fedlora import rundata

    return rundata.check_causal_data(cfg.client_spec(), cfg.clients.num)


def _gpu_note(cfg: RunConfig) -> None:
    if cfg.default_gpu_share():
        console.print(f"clients.device = {cfg.clients.device!r}: each virtual client takes a whole GPU (one "
                      "at a time per GPU); set clients.gpu_memory_gb (what one client needs) to run more at "
                      "once", markup=False)


@app.command()
def compare(
    config: Path = typer.Argument(None, help="run TOML (default: simulations/smoke.toml)"),
    strategies: str = typer.Option(",".join(strategy_names()), "--strategies",
                                   help="comma-separated strategy names"),
    set_: list[str] = typer.Option([], "--set", help="override: section.key=value (TOML value)"),
    centralized: bool = typer.Option(False, "--centralized", help="add the pooled-data baseline"),
    target: float = typer.Option(None, "--target", help="accuracy for the rounds-to-target column"),
    engine: str = typer.Option("flower", "--engine", help="flower (Flower simulation) | inprocess"),
    sweep: str = typer.Option(None, "--sweep", help="repeat for each value of one key: "
                              "section.key=v1,v2,... (e.g. data.alpha=0.1,0.5,10)"),
    rounds: int = typer.Option(None, "--rounds", "-r", help="number of rounds (overrides the config)"),
    seeds: str = typer.Option(None, "--seeds", help="repeat the comparison for each seed and report "
                              "mean ± std over them: 0,1,2"),
    resume: bool = typer.Option(False, "--resume", help="continue a stopped comparison: finished runs "
                                "are kept, interrupted ones continue from their last checkpoint"),
) -> None:
    """Run the same config once per strategy into runs/<name>-compare/; write report.md and plots.

    CONFIG: a run TOML (default: simulations/smoke.toml).
    """
    set_ = list(set_) + ([f"rounds={int(rounds)}"] if rounds is not None else [])
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from fedlora import compare as cmp

    try:
        load_config(config, list(set_), validate_data=False)  # (loads its strategy plugins: known names)
        names = cmp.parse_strategies(strategies)
        root, runs = cmp.plan(config, names, list(set_), centralized)
        if seeds and sweep:
            raise ValueError("--seeds and --sweep: give one of them (a sweep over seeds is --seeds)")
        swept = cmp.parse_sweep(f"seed={seeds}" if seeds else sweep) if (seeds or sweep) else None
        if swept:
            root, planned = cmp.plan_sweep(config, names, list(set_), *swept, centralized)
            runs = runs * len(planned)
        if engine not in ("flower", "inprocess"):
            raise ValueError(f"--engine must be 'flower' or 'inprocess', got {engine!r}")
        every = [c for _, c in runs] if not swept else [
            c for _, setting in planned for _, c in cmp.plan(config, names, list(set_), centralized,
                                                             setting)[1]]
        notes = {}  # every run's device and data checked before anything starts
        for c in every:
            key = (c.client_spec().key("data", "seed", "model"), c.clients.num)
            if key not in notes:
                notes[key] = _preflight(c, engine)[1]
        if resume:  # every run's folder checked before anything starts
            states = {str(c.resolved_run_dir()): cmp.resume_state(c) for c in every}
    except ValueError as e:
        _fail("config error", e)
        raise typer.Exit(2) from e
    console.print(f"[bold]fedlora compare[/bold] {len(runs)} runs -> {root}")
    for note in dict.fromkeys(n for n in notes.values() if n):
        console.print(note, markup=False)
    planned = {c.resolved_run_dir().absolute() for c in every}
    if not resume:  # what this comparison replaces, and what it leaves beside its report
        from fedlora import sim

        replaced = sorted(str(d.relative_to(root.absolute())) for d in planned
                          if d.is_relative_to(root.absolute()) and sim.earlier_run(d))
        if replaced:
            apart = "run_dir" if runs[0][1].run_dir else "name"
            console.print(f"replacing earlier runs in {root}: {', '.join(replaced)} (--resume keeps finished "
                          f"ones; --set {apart}=... keeps comparisons apart)", markup=False, style="yellow")
    top = root.absolute()
    others = sorted(str(m.parent.relative_to(top)) for m in top.glob("**/metrics.jsonl")
                    if m.parent not in planned) if top.is_dir() else []
    if others:
        console.print(f"{root} also holds runs this comparison does not make ({', '.join(others)}): they are "
                      "not in its report", markup=False, style="yellow")
    if engine == "flower" and runs:
        _gpu_note(runs[0][1])
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("", total=len(runs))

        def run_one(cfg: RunConfig) -> Path:
            what = cfg.strategy.name if cfg.clients.num > 1 else "centralized"
            if swept:
                what += f", {Path(cfg.run_dir).parent.name}"
            progress.update(task, description=f"{what} ({progress.tasks[0].completed + 1}/{len(runs)})")
            state = states.get(str(cfg.resolved_run_dir()), "fresh") if resume else "fresh"
            if state == "done":
                d = cfg.resolved_run_dir()
                progress.console.print(f"  {d.name}: finished earlier, kept")
                progress.advance(task)
                return d
            if state == "resume":
                progress.console.print(f"  {cfg.resolved_run_dir().name}: resuming from its last checkpoint")
            d = cmp.run_config(cfg, engine, resume=state == "resume")
            s = json.loads((d / "summary.json").read_text())
            metric = s.get("metric", "accuracy")
            where = f"{d.parent.name}/{d.name}" if swept else d.name
            progress.console.print(f"  {where}: final {metric} {_fmt(s.get('final_' + metric))}, "
                                   f"wall {s.get('wall_seconds', 0):.1f} s")
            progress.advance(task)
            return d

        again = shlex.join(["fedlora", *sys.argv[1:]] + ([] if resume else ["--resume"]))
        try:
            with _stoppable(lambda: f"finished runs are kept; continue with: {again}"):
                if swept:
                    report = cmp.sweep(config, names, list(set_), *swept, run_one, centralized, target)
                else:
                    report = cmp.compare(config, names, list(set_), run_one, centralized, target)
        except RuntimeError as e:
            _fail("run failed", e)
            raise typer.Exit(1) from e
    console.print(report.read_text(), markup=False)
    console.print(f"report: {report}")


shakespeare_app = typer.Typer(help="The Shakespeare causal-LM task: a small pretrained base and the "
                              "per-role client data.", no_args_is_help=True)
app.add_typer(shakespeare_app, name="shakespeare")


@shakespeare_app.command("prepare")
def shakespeare_prepare(
    out: Path = typer.Option(Path("runs/shakespeare"), "--out", help="where roles.jsonl and base/ go "
                             "(simulations/shakespeare-llama.toml reads runs/shakespeare)"),
    min_speeches: int = typer.Option(40, "--min-speeches", help="a role with fewer speeches is no client"),
    max_roles: int = typer.Option(12, "--max-roles", help="keep the roles with the most speeches (0: all)"),
    steps: int = typer.Option(None, "--steps", help="pretraining steps of the base (default: 600)"),
    force: bool = typer.Option(False, "--force", help="rebuild the base even if a finished one is there"),
) -> None:
    """Write OUT/roles.jsonl (one client per speaking role of the client plays) and build OUT/base, a
    small Llama pretrained on plays no client holds (once; about 3 minutes on 2 CPU cores)."""
    from fedlora import shakespeare

    try:
        rows = shakespeare.role_rows(min_speeches, max_roles or None)
        roles = shakespeare.write_roles(out / "roles.jsonl", min_speeches, max_roles or None)
        console.print(f"{len({r['role'] for r in rows})} roles, {len(rows)} rows -> {roles}")
        kw = {} if steps is None else {"steps": steps}
        base = shakespeare.build_base(out / "base", force=force, **kw)
        meta = shakespeare.base_metadata(base)
        console.print(f"base -> {base}: {meta['n_parameters']:,} parameters, held-out loss "
                      f"{meta['heldout_loss']:.3f} (untrained {meta['initial_heldout_loss']:.3f})",
                      markup=False)
    except (ValueError, OSError) as e:
        _fail("shakespeare error", e)
        raise typer.Exit(2) from e


dp_app = typer.Typer(help="Differential privacy: budgets before a run.", no_args_is_help=True)
app.add_typer(dp_app, name="dp")


@dp_app.command("plan")
def dp_plan(
    config: Path = typer.Argument(None, help="run TOML with [privacy] enabled"),
    set_: list[str] = typer.Option([], "--set", help="override: section.key=value (TOML value)"),
) -> None:
    """Each client's DP budget for the run, before any training: σ, q, steps, ε, δ.

    CONFIG: a run TOML with [privacy] enabled = true (default: simulations/smoke.toml).
    """
    from rich.table import Table

    from fedlora.dp_plan import plan_run

    try:
        cfg = resolve(config, None, None, list(set_), None)
        plans = plan_run(cfg)
    except ValueError as e:
        _fail("privacy error", e)
        raise typer.Exit(2) from e
    pc = cfg.privacy
    how = (f"σ calibrated for target ε = {pc['target_epsilon']}" if pc.get("target_epsilon") is not None
           else f"σ fixed at {pc.get('noise_multiplier')}")
    table = Table(title=f"{cfg.name}: {how}, accountant {pc.get('accountant', 'rdp')}, "
                        f"clip C = {pc.get('max_grad_norm', 1.0)}")
    for col in ("client", "examples n", "q = batch/n", "steps = rounds × local", "σ", "ε", "δ"):
        table.add_column(col, justify="right")
    for cid, p in plans:
        table.add_row(cid, str(p.num_examples), f"{p.sample_rate:.4g}", f"{p.steps}",
                      f"{p.noise_multiplier:.4g}", f"{p.epsilon:.4g}", f"{p.delta:.3g}")
    console.print(table)
    console.print("ε depends on σ, q, the steps and δ (default 1/(10·n)); σ on the target, q and the "
                  "steps. A client declines a round that would take it past its budget.")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="run folders (each with metrics.jsonl), or a "
                                          "comparison's folder (its runs)"),
    out: Path = typer.Option(None, "--out", help="where report.md and the plots go (default: the "
                             "runs' common parent)"),
    target: float = typer.Option(None, "--target", help="accuracy for the rounds-to-target column"),
) -> None:
    """Regenerate report.md and the plots from metrics files."""
    from fedlora.report import write_report

    # a comparison's folder stands for its runs (each sub-folder with metrics.jsonl)
    def runs_in(d: Path) -> list[Path]:  # (the centralized baseline last, as compare writes it)
        if (d / "metrics.jsonl").exists() or not d.is_dir():
            return [d]
        found = [x for x in d.iterdir() if (x / "metrics.jsonl").exists()]
        return sorted(found, key=lambda x: (x.name == "centralized", x.name)) or [d]

    run_dirs = [r for d in run_dirs for r in runs_in(d)]
    if out is None:
        try:
            out = Path(os.path.commonpath([Path(d).absolute().parent for d in run_dirs]))
        except ValueError:  # (runs on different drives)
            out = Path(run_dirs[0]).absolute().parent
    try:
        path = write_report(run_dirs, out, target=target)
    except (FileNotFoundError, PermissionError) as e:
        console.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    console.print(path.read_text(), markup=False)
    console.print(f"report: {path}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder (runs/<name>, with config.toml "
                                            "and checkpoints/)")],
    merged: Annotated[Path | None, typer.Option(
        "--merged", help="write the merged global model here as a transformers folder (save_pretrained "
        "+ tokenizer) for serving; models 'minilm' and 'hf:<path>' only")] = None,
) -> None:
    """Rewrite the run's PEFT adapter (adapter/, base/ for the tiny model) from its last checkpoint,
    or with --merged OUT write the merged global model as a transformers folder."""
    from fedlora.export import export_merged, export_run

    try:
        if merged is not None:
            path = export_merged(run_dir, merged)
            note = json.loads((path / "fedlora_merged.json").read_text())
            how = ", trust_remote_code=True" if note.get("trust_remote_code") else ""
            auto = "AutoModelForCausalLM" if note.get("task") == "causal-lm" else \
                "AutoModelForSequenceClassification"
            console.print(f"merged model -> {path} ({auto}.from_pretrained({str(path)!r}{how}))",
                          markup=False)
        else:
            path = Path(export_run(run_dir))
            meta = json.loads((path / "fedlora_adapter.json").read_text())
            console.print(f"PEFT adapter -> {path}: {meta['lora_parameters']} LoRA parameters at ranks "
                          f"{sorted(set(meta['ranks'].values()))} (rank r_max={meta['r_max']}: "
                          f"{meta['rank_r_max_parameters']}); base: {meta['base']['how']}", markup=False)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        _fail("export error", e)
        raise typer.Exit(2) from e


#: whether this process is the `fedlora` command (main), which a stop signal may end at once
_ENTRY_POINT = False


def main() -> None:
    global _ENTRY_POINT
    _ENTRY_POINT = True
    app()


if __name__ == "__main__":
    main()
