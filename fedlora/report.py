"""Reports from run directories: ``metrics.jsonl`` (+ ``summary.json``) → Markdown table and PNG plots.

One run directory per strategy. Each ``metrics.jsonl`` line is one round with at least ``round``
and, when the run evaluated that round, its metric: ``accuracy`` (classification; higher is
better) or ``perplexity`` (causal LM; lower is better — "best", "rounds to target" and the plots
follow the metric's direction); communication comes from ``bytes_up`` /
``bytes_down`` (round totals) or the per-client rows under ``clients`` (``bytes_up`` /
``bytes_down`` each). ``epsilon`` per client (DP runs) is read from the client rows.

    fedlora report runs/compare-x/fedavg runs/compare-x/fedex ... --out runs/compare-x
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.runlog import number

MB = 1_000_000


@dataclass
class RunSeries:
    name: str
    strategy: str
    rounds: list[int] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)  # the metric, where evaluated
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None
    wall_seconds: float | None = None
    num_clients: int = 0
    personal: bool = False  # accuracy is the clients' personalised models' (FedSA), not a global one
    metric: str = "accuracy"  # or "perplexity" (causal LM)
    config: dict = field(default_factory=dict)  # the run's config.toml, flattened ("train.lr": 0.01)
    versions: dict = field(default_factory=dict)  # fedlora / torch / flwr that made it (summary.json)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    def best(self, values: list[float]) -> float:
        return max(values) if self.higher_is_better else min(values)

    @property
    def cum_mb(self) -> list[float]:
        out, tot = [], 0
        for u, d in zip(self.bytes_up, self.bytes_down):
            tot += u + d
            out.append(tot / MB)
        return out

    def evaluated(self) -> list[tuple[int, float, float]]:
        """``(round, metric, cumulative MB)`` for the rounds that were evaluated."""
        return [(r, a, mb) for r, a, mb in zip(self.rounds, self.values, self.cum_mb) if a is not None]


def _round_bytes(row: dict, key: str) -> int:
    if isinstance(row.get(key), int | float):
        return int(row[key])
    clients = row.get("clients") or []
    return int(sum(c.get(key, 0) or 0 for c in clients))


def load_run(run_dir: str | Path) -> RunSeries:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        subs = sorted(x.name for x in run_dir.iterdir() if x.is_dir()) if run_dir.is_dir() else []
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a fedlora run directory?"
                                + (f" (a sweep's or seeds' folder: give one of its folders {subs})"
                                   if subs else ""))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "round" in r]
    summary = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    strategy = summary.get("strategy") or (rows[0].get("strategy") if rows else "") or run_dir.name
    label = run_dir.name if run_dir.name == strategy else f"{run_dir.name} ({strategy})"
    s = RunSeries(run_dir.name, label)
    eps: list[float] = []
    clients: set[str] = set()
    s.personal = any("personal_accuracy_weighted" in r or "personal_perplexity_weighted" in r for r in rows)
    s.metric = metric_of(rows)
    if s.personal:
        s.strategy += " †"
    for r in rows:
        s.rounds.append(int(r["round"]))
        acc = r.get(s.metric)
        s.values.append(None if acc is None or (isinstance(acc, float) and math.isnan(acc)) else
                        float(acc))
        s.bytes_up.append(_round_bytes(r, "bytes_up"))
        s.bytes_down.append(_round_bytes(r, "bytes_down"))
        for c in r.get("clients") or []:
            clients.add(str(c.get("id", c.get("client_id", ""))))
            m = {**(c.get("metrics") or {}), **c}  # the ClientApp's metrics sit under "metrics"
            if (e := number(m.get("epsilon"))) is not None:  # (a client's word: numbers only)
                eps.append(e)
            if (d := number(m.get("delta"))) is not None:
                s.delta = d
    s.num_clients = len(clients - {""}) or int(summary.get("num_clients", 0) or 0)
    s.epsilon = max(eps) if eps else summary.get("max_epsilon")
    s.delta = s.delta if s.delta is not None else summary.get("delta")
    s.wall_seconds = summary.get("wall_seconds")
    s.versions = summary.get("versions") or {}
    if (run_dir / "config.toml").is_file():
        import tomllib

        s.config = _flat(tomllib.loads((run_dir / "config.toml").read_text()))
    return s


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


#: what a run's config may differ in within one comparison (the rule, and where it went)
_PER_RUN = {"strategy.name", "run_dir", "name", "data.root"}


def differences(runs: list[RunSeries]) -> list[str]:
    """The config keys in which the runs differ (the centralized baseline left out): a table of
    such runs compares different experiments."""
    cfgs = [s.config for s in runs if s.config and s.name != "centralized"]
    keys = {k for c in cfgs for k in c} - _PER_RUN
    return sorted(k for k in keys if len({repr(c.get(k)) for c in cfgs}) > 1)


def settings(runs: list[RunSeries], varies: str = "") -> str:
    """One line on how the runs were made: the settings a reader needs (as in the first run; a
    sweep's ``varies`` key is said to vary), and the versions."""
    c = next((s.config for s in runs if s.config and s.name != "centralized"), {})
    if not c:
        return ""
    part = c.get("data.partition", "iid")
    part += {"dirichlet": f" α={c.get('data.alpha')}", "natural": f" by {c.get('data.partition_by')}"}.get(
        c.get("data.partition"), "")
    items = [f"model `{c.get('model.name')}`", f"data `{c.get('data.name')}` ({part})",
             f"{c.get('clients.num')} clients of ranks {c.get('clients.ranks')}", f"{c.get('rounds')} rounds",
             f"{c.get('train.local_steps')} local steps of batch {c.get('train.batch_size')}",
             f"lr {c.get('train.lr')}", f"seed {c.get('seed')}"]
    v = next((s.versions for s in runs if s.versions), {})
    if v:
        items.append("fedlora " + v.get("fedlora", "?") + ", torch " + v.get("torch", "?")
                     + ", flwr " + v.get("flwr", "?"))
    return ("Settings" + (f" (as in the first run; {varies} varies)" if varies else "") + ": "
            + "; ".join(items) + " (each run's config.toml has all of them).")


def metric_of(rows: list[dict]) -> str:
    """A run's metric: ``perplexity`` when its rows report one (causal LM), else ``accuracy``."""
    return "perplexity" if any(r.get("perplexity") is not None for r in rows) else "accuracy"


SHORT = {"accuracy": "acc", "perplexity": "ppl"}


def rounds_to_target(s: RunSeries, target: float) -> int | None:
    for r, a, _ in s.evaluated():
        if (a >= target) if s.higher_is_better else (a <= target):
            return r
    return None


def table(runs: list[RunSeries], target: float | None = None) -> str:
    """The comparison table (Markdown)."""
    short = SHORT.get(runs[0].metric, runs[0].metric) if runs else "acc"
    head = ["strategy", f"final {short}", f"best {short} (round)"]
    if target is not None:
        head.append(f"rounds to {target:.2f}")
    head += ["MB up", "MB down", "MB / client", "wall s", "ε (max) / δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in runs:
        ev = s.evaluated()
        final = f"{ev[-1][1]:.4f}" if ev else "–"
        if ev:
            b = s.best([a for _, a, _ in ev])
            best = f"{b:.4f} ({next(r for r, a, _ in ev if a == b)})"
        else:
            best = "–"
        up, down = sum(s.bytes_up) / MB, sum(s.bytes_down) / MB
        per = (up + down) / s.num_clients if s.num_clients else float("nan")
        row = [s.strategy, final, best]
        if target is not None:
            rt = rounds_to_target(s, target)
            row.append(str(rt) if rt is not None else "not reached")
        eps = "–" if s.epsilon is None else f"{s.epsilon:.2f} / {s.delta:.1e}" if s.delta else \
            f"{s.epsilon:.2f}"
        mbs = ["–"] * 3 if s.name == "centralized" else [f"{up:.3f}", f"{down:.3f}", f"{per:.3f}"]
        row += [*mbs, "–" if s.wall_seconds is None else f"{s.wall_seconds:.1f}", eps]
        lines.append("| " + " | ".join(row) + " |")
    metric = runs[0].metric if runs else "accuracy"
    what = ("perplexity of the server's held-out rows, lower is better" if metric == "perplexity" else
            "accuracy on the server's test split, higher is better")
    lines.append(f"\n{short}: {what}; final: the last evaluated round; best: the best evaluated round "
                 "on that same split (a selection on it, not a held-out result). MB: 10^6 bytes as sent, "
                 "over all rounds; MB / client: (up + down) / the clients that took part"
                 + ("; centralized: one client with all the data, nothing communicated"
                    if any(s.name == "centralized" for s in runs) else "") + ".")
    return "\n".join(lines) + "\n"


def plots(runs: list[RunSeries], out_dir: str | Path) -> list[Path]:
    """``<metric>_vs_round.png`` and ``<metric>_vs_mb.png`` (log x) in ``out_dir`` (``accuracy``, or
    ``perplexity`` on a log y axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    metric = runs[0].metric if runs else "accuracy"
    for fname, xlabel, xi, logx in ((f"{metric}_vs_round.png", "round", 0, False),
                                    (f"{metric}_vs_mb.png", "cumulative MB communicated (up + down)",
                                     2, True)):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for s in runs:
            ev = s.evaluated()
            if ev and not (logx and s.name == "centralized"):  # (it communicates nothing)
                ax.plot([e[xi] for e in ev], [e[1] for e in ev], marker="o", ms=3, label=s.strategy)
        if logx:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")  # plain numbers on its ticks (the default writes 3×10⁰)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            lo, hi = ax.get_xlim()
            if hi < 10 * lo:  # within one decade the labelled ticks are the minor ones
                ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric + ("" if metric == "accuracy" else " (lower is better)"))
        if metric == "perplexity":
            from matplotlib.ticker import LogFormatter

            ax.set_yscale("log")  # plain numbers on its ticks (the default writes 2.95×10²)
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname)
        plt.close(fig)
        paths.append(out_dir / fname)
    return paths


def write_report(run_dirs: list[str | Path], out_dir: str | Path, title: str = "fedlora comparison",
                 target: float | None = None, notes: str = "") -> Path:
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plots(runs, out_dir)
    differ = differences(runs)
    warn = (f"**These runs differ in {', '.join(differ)}**: the table compares different experiments.\n"
            if differ else "")
    body = [f"# {title}\n", warn, notes + "\n" if notes else "", settings(runs) + "\n",
            table(runs, target), ""]
    if any(r.personal for r in runs):
        body.append(f"† personalised: no global model exists; the {runs[0].metric} is the weighted mean "
                    "of the sampled clients' own models on their own validation shards, not the server's "
                    "test split.\n")
    body += [f"![{p.stem}]({p.name})\n" for p in pngs]
    report = out_dir / "report.md"
    report.write_text("\n".join(body))
    return report


def write_sweep_report(out_dir: str | Path, key: str, values: list[tuple[object, list[str | Path]]],
                       title: str = "fedlora sweep") -> Path:
    """``sweep.md``: final / best accuracy (and ε under DP) of each strategy at each value of
    ``key``, and ``sweep.png``: final accuracy against the value (log x when the values are
    positive and span a factor ≥ 10). ``values``: ``[(value, [run dir per strategy]), ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[tuple[object, RunSeries]]] = {}
    for v, dirs in values:
        for d in dirs:
            s = load_run(d)
            series.setdefault(s.strategy, []).append((v, s))
    head = ["strategy"] + [f"{key}={v}" for v, _ in values]
    metric = next((s.metric for ss in series.values() for _, s in ss), "accuracy")
    lines = [f"# {title}\n", settings([s for ss in series.values() for _, s in ss], varies=key) + "\n",
             f"Each cell: final {metric} (best) · MB up+down"
             + (" · ε (max over clients)" if any(s.epsilon is not None for ss in series.values()
                                                  for _, s in ss) else "") + ".\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ss in series.items():
        cells = [name]
        for v, _ in values:
            s = next((s for vv, s in ss if vv == v), None)
            ev = s.evaluated() if s else []
            if not ev:
                cells.append("–")
                continue
            mb = (sum(s.bytes_up) + sum(s.bytes_down)) / MB
            cell = f"{ev[-1][1]:.4f} ({s.best([a for _, a, _ in ev]):.4f}) · {mb:.2f}"
            if s.epsilon is not None:
                cell += f" · ε {s.epsilon:.2f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    xs = [v for v, _ in values]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in xs)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, ss in series.items():
        pts = [(i, v, s.evaluated()[-1][1]) for i, (v, s) in enumerate(ss) if s.evaluated()]
        ax.plot([v if numeric else i for i, v, _ in pts], [a for _, _, a in pts], marker="o", label=name)
    if numeric and all(v > 0 for v in xs) and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_xlabel(key)
    ax.set_ylabel(f"final {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png")
    plt.close(fig)
    lines += ["", "![sweep](sweep.png)", ""]
    lines += [f"- `{key}={v}`: [report]({Path(dirs[0]).parent.name}/report.md)" for v, dirs in values]
    path = out_dir / "sweep.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_seed_summary(out_dir: str | Path, values: list[tuple[object, list[str | Path]]],
                       title: str = "fedlora comparison over seeds") -> Path:
    """``seeds.md``: per strategy, the final and best metric as mean ± sample standard deviation over
    the seeds (n given), MB up / down (mean) and ε (max). ``values``: ``[(seed, [run dir per
    strategy]), ...]``, as ``write_sweep_report`` takes them."""
    import statistics

    series: dict[str, list[RunSeries]] = {}
    for _, dirs in values:
        for d in dirs:
            s = load_run(d)
            series.setdefault(s.strategy, []).append(s)
    metric = next((ss[0].metric for ss in series.values() if ss), "accuracy")
    short = SHORT.get(metric, metric)

    def ms(xs: list[float]) -> str:
        if not xs:
            return "–"
        sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
        return f"{statistics.fmean(xs):.4f} ± {sd:.4f}"

    lines = [f"# {title}\n", settings([s for ss in series.values() for s in ss], varies="seed") + "\n",
             f"Mean ± sample standard deviation over the seeds "
             f"({', '.join(str(v) for v, _ in values)}); MB: mean per run.\n",
             f"| strategy | n | final {short} | best {short} | MB up | MB down | ε (max) |",
             "|---|---|---|---|---|---|---|"]
    for name, ss in series.items():
        ev = [s.evaluated() for s in ss]
        final = [e[-1][1] for e in ev if e]
        best = [s.best([a for _, a, _ in e]) for s, e in zip(ss, ev) if e]
        up = statistics.fmean(sum(s.bytes_up) / MB for s in ss)
        down = statistics.fmean(sum(s.bytes_down) / MB for s in ss)
        eps = [s.epsilon for s in ss if s.epsilon is not None]
        lines.append(f"| {name} | {len(final)} | {ms(final)} | {ms(best)} | {up:.3f} | {down:.3f} | "
                     + (f"{max(eps):.2f}" if eps else "–") + " |")
    path = Path(out_dir) / "seeds.md"
    path.write_text("\n".join(lines) + "\n")
    return path
