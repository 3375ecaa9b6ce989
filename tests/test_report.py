"""report.md and plots from metrics.jsonl files: numbers in the table equal the files'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.report import load_run, write_report


def _run(tmp_path, name, accs, up, down, eps=None):
    d = tmp_path / name
    d.mkdir()
    with open(d / "metrics.jsonl", "w") as f:
        for i, a in enumerate(accs):
            clients = [{"id": f"c{j}", "bytes_up": up, "bytes_down": down,
                        **({"epsilon": eps[i] + j, "delta": 1e-5} if eps else {})} for j in range(2)]
            f.write(json.dumps({"round": i + 1, "strategy": name, "accuracy": a, "clients": clients}) + "\n")
    (d / "summary.json").write_text(json.dumps({"strategy": name, "wall_seconds": 12.5}))
    return d


def test_report_table_and_plots_match_metrics(tmp_path):
    a = _run(tmp_path, "fedavg", [0.5, 0.7, 0.6], 1_000_000, 2_000_000)
    b = _run(tmp_path, "fedex", [0.55, 0.8, 0.9], 1_500_000, 500_000, eps=[1.0, 2.0, 3.0])
    report = write_report([a, b], tmp_path / "out", target=0.75)
    text = report.read_text()
    assert (tmp_path / "out" / "accuracy_vs_round.png").stat().st_size > 1000
    assert (tmp_path / "out" / "accuracy_vs_mb.png").stat().st_size > 1000
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| fed")}
    # final, best, rounds-to-target, MB up, MB down, MB/client, wall, eps
    assert rows["fedavg"][:6] == ["0.6000", "0.7000 (2)", "not reached", "6.000", "12.000", "9.000"]
    assert rows["fedex"][:6] == ["0.9000", "0.9000 (3)", "2", "9.000", "3.000", "6.000"]
    assert "accuracy on the server's test split, higher is better" in text and "10^6 bytes" in text
    assert rows["fedex"][7].startswith("4.00")  # max ε over clients and rounds (3.0 + 1)
    s = load_run(b)
    assert s.cum_mb == [4.0, 8.0, 12.0]


def test_personalised_accuracy_is_marked(tmp_path):
    d = tmp_path / "fedsa"
    d.mkdir()
    rows = [{"round": 1, "strategy": "fedsa", "accuracy": 0.8, "personal_accuracy_weighted": 0.8,
             "personal_accuracy_mean": 0.7, "clients": [{"id": "c0", "bytes_up": 1, "bytes_down": 1}]}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    g = _run(tmp_path, "fedavg", [0.5], 1, 1)
    text = write_report([g, d], tmp_path / "out").read_text()
    assert "| fedsa † | 0.8000 |" in text and "† personalised" in text
    assert "| fedavg | 0.5000 |" in text


@pytest.mark.parametrize("lm", [False, True])
def test_the_live_round_table_fits_80_columns_without_cutting_a_word(lm):
    from rich.console import Console

    from fedlora.runlog import round_table

    metric = {"perplexity": 100.465} if lm else {"accuracy": 0.914}
    rows = [{"round": i, "train_loss": 4.5, "loss": 4.6, **metric, "bytes_up": 12_040_000,
             "bytes_down": 114_723_000, "clients": [{"accepted": True}] * 12, "round_seconds": 152.39}
            for i in (1, 10)]
    console = Console(width=80, record=True)
    console.print(round_table(rows, "run"))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert ("perplexity" if lm else "accuracy") in text and "114.723" in text and "12/12" in text


def test_the_live_table_knows_the_metric_before_any_round_and_counts_failed_clients():
    from rich.console import Console

    from fedlora.runlog import round_table

    def text(rows, lm=None):
        console = Console(width=80, record=True)
        console.print(round_table(rows, "run", lm))
        return console.export_text()

    assert "perplexity" in text([], lm=True) and "accuracy" in text([], lm=False)
    row = {"round": 1, "clients": [{"id": "0", "accepted": True}, {"id": "1", "accepted": True},
                                   {"id": "2", "accepted": False, "error": "boom"}],
           "failures": [{"client": "2", "node": 3, "stage": "train", "error": "boom"},
                        {"node": 4, "stage": "query", "error": "bad capabilities"}]}
    assert "2/4" in text([row])  # a failed reply counts once; a node that could not join counts too


def _with_config(run: Path, **keys) -> Path:
    import tomli_w

    cfg = {"rounds": 3, "seed": 0, "model": {"name": "tiny"}, "strategy": {"name": run.name},
           "data": {"name": "synthetic", "partition": "dirichlet", "alpha": 0.5},
           "clients": {"num": 2, "ranks": [2, 4]}, "train": {"local_steps": 5, "batch_size": 32, "lr": 0.01}}
    for k, v in keys.items():
        sec, key = k.split("__")
        cfg[sec][key] = v
    (run / "config.toml").write_text(tomli_w.dumps(cfg))
    (run / "summary.json").write_text(json.dumps({"strategy": run.name, "versions": {
        "fedlora": "0.1.0+abc", "torch": "2.13.0", "flwr": "1.42.0"}}))
    return run


def test_a_report_says_how_its_runs_were_made_and_when_they_differ(tmp_path):
    a = _with_config(_run(tmp_path, "fedavg", [0.5, 0.7, 0.6], 1_000_000, 2_000_000))
    b = _with_config(_run(tmp_path, "fedex", [0.55, 0.8, 0.9], 1_500_000, 500_000))
    text = write_report([a, b], tmp_path / "out").read_text()
    assert "data `synthetic` (dirichlet α=0.5)" in text and "lr 0.01" in text and "seed 0" in text
    assert "fedlora 0.1.0+abc, torch 2.13.0, flwr 1.42.0" in text and "differ in" not in text
    _with_config(b, train__lr=0.003, data__alpha=10.0)
    text = write_report([a, b], tmp_path / "out").read_text()
    assert "**These runs differ in data.alpha, train.lr**" in text


def test_fedlora_report_takes_a_comparisons_folder(tmp_path):
    from typer.testing import CliRunner

    from fedlora.cli import app

    root = tmp_path / "cmp"
    root.mkdir()
    for name in ("fedavg", "fedex"):
        _run(root, name, [0.5, 0.6], 1_000, 1_000)
    res = CliRunner().invoke(app, ["report", str(root)])
    assert res.exit_code == 0, res.output
    text = (root / "report.md").read_text()  # (the runs' common parent)
    assert "| fedavg |" in text and "| fedex |" in text


def test_the_centralized_baseline_communicates_nothing_in_the_table(tmp_path):
    a = _run(tmp_path, "fedavg", [0.5, 0.6], 1_000_000, 1_000_000)
    c = _run(tmp_path, "centralized", [0.7, 0.8], 1_000_000, 1_000_000)
    text = write_report([a, c], tmp_path / "out").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| centralized |"))
    assert [x.strip() for x in line.split("|")[4:7]] == ["–", "–", "–"]
    assert "centralized: one client with all the data, nothing communicated" in text
