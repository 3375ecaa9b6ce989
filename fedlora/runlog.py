"""Run outputs: ``metrics.jsonl`` (one JSON line per round), ``summary.json``, and the live table.

Each round line: ``round``, ``strategy``, ``clients`` (per-client rows: id, node, rank, loss,
examples, train seconds, peak memory, bytes up/down counted from the serialised records, accepted
or rejected + reason, or an error), ``failures`` (errors and missing replies), and the aggregate
numbers (``train_loss``, ``accuracy``/``loss`` of the server-side evaluation, FedSA's
``personal_accuracy_mean``/``_weighted``, ``aggregation_error``, ``agg_seconds``,
``round_seconds``, ``bytes_up``/``bytes_down``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"


def _clean(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


class RunLog:
    """Appends round lines to ``<run_dir>/metrics.jsonl`` (flushed and fsynced per line)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def reset(self, rows: list[dict] | None = None) -> None:
        """Rewrite the file with ``rows`` (a resumed run keeps the lines up to its checkpoint)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(_clean(r)) + "\n" for r in rows or []))
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def number(v) -> float | None:
    """A client's metric as a finite float, else ``None`` (its metrics are its own word: a list, a
    bool or NaN is not a value)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _client_metric(rows: list[dict], key: str) -> list[float]:
    vals = [number(c["metrics"].get(key)) for r in rows for c in r.get("clients", [])
            if isinstance(c.get("metrics"), dict)]
    return [v for v in vals if v is not None]


def summarize(rows: list[dict], extra: dict | None = None) -> dict:
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    ppl = [r["perplexity"] for r in rows if r.get("perplexity") is not None]
    eps, deltas = _client_metric(rows, "epsilon"), _client_metric(rows, "delta")
    return _clean({
        "metric": "perplexity" if ppl else "accuracy",
        "final_perplexity": ppl[-1] if ppl else None, "best_perplexity": min(ppl) if ppl else None,
        "max_epsilon": max(eps) if eps else None, "delta": max(deltas) if deltas else None,
        "rounds": len(rows), "strategy": rows[-1]["strategy"] if rows else None,
        "final_accuracy": accs[-1] if accs else None, "best_accuracy": max(accs) if accs else None,
        "final_train_loss": rows[-1].get("train_loss") if rows else None,
        "final_loss": rows[-1].get("loss") if rows else None,
        "bytes_up": sum(r.get("bytes_up", 0) for r in rows),
        "bytes_down": sum(r.get("bytes_down", 0) for r in rows),
        "wall_seconds": sum(r.get("round_seconds", 0.0) for r in rows),
        "failures": sum(len(r.get("failures", [])) for r in rows),
        # rounds in which no client's update was accepted (the model did not move)
        "rounds_without_training": [r["round"] for r in rows
                                    if not any(c.get("accepted") for c in r.get("clients", []))],
        **(extra or {})})


def write_summary(run_dir: str | os.PathLike, summary: dict) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(summary), indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ---- the live table (rich) ----------------------------------------------------------------------

def round_table(rows: list[dict], title: str = "fedlora", lm: bool | None = None):
    """The live table of a run's rounds (``lm``: a causal LM's, with perplexity; None: from the rows).
    ``clients`` is accepted / taking part: the sampled clients (a failed or missing reply included)
    and the nodes that could not join (a failed capability query)."""
    from rich.table import Table

    t = Table(title=title)
    lm = any(r.get("perplexity") is not None for r in rows) if lm is None else lm
    # two-line headers: the table fits 80 columns (a log file, a narrow terminal) with no word cut
    for col in ("round", "train\nloss", "eval\nloss", "perplexity" if lm else "accuracy", "MB\nup",
                "MB\ndown", "clients", "time\ns"):
        t.add_column(col, justify="right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        acc = r.get("perplexity") if lm else r.get("accuracy", r.get("personal_accuracy_weighted"))
        clients = r.get("clients", [])
        n_ok = len([c for c in clients if c.get("accepted")])
        ids = {c.get("id") for c in clients}
        lost = {f.get("client", f"node {f.get('node')}") for f in r.get("failures", [])} - ids
        t.add_row(str(r["round"]), f(r.get("train_loss"), ".4f"), f(r.get("loss"), ".4f"), f(acc, ".3f"),
                  f(r.get("bytes_up", 0) / 1e6, ".3f"), f(r.get("bytes_down", 0) / 1e6, ".3f"),
                  f"{n_ok}/{len(clients) + len(lost)}", f(r.get("round_seconds"), ".2f"))
    return t


def follow(path: Path, poll: float = 0.5, stop=None):
    """Yield the rows of a growing metrics file (each time it changes) until ``stop()`` is true."""
    seen = -1
    while True:
        done = stop() if stop else False
        rows = []
        if path.exists():
            try:
                rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            except json.JSONDecodeError:
                rows = []
        if len(rows) != seen:
            seen = len(rows)
            yield rows
        if done:
            return
        time.sleep(poll)
