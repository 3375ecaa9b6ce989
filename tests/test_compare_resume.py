"""`fedlora compare --resume`: finished runs are kept, a stopped run continues from its checkpoint
(and ends where the uninterrupted one would), --rounds extends a finished comparison, and a run folder
made with another config is refused by name before anything starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from fedlora.cli import app

SETS = ["clients.num=3", "rounds=2", "data.examples_per_client=64", "train.local_steps=3"]


def _compare(root: Path, *extra: str):
    args = ["compare", "--strategies", "fedavg,fedex", "--engine", "inprocess", "--set",
            f"run_dir={json.dumps(str(root))}", *extra]
    for s in SETS:
        args += ["--set", s]
    return CliRunner().invoke(app, args)


def _rows(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def _delta(d: Path):
    from safetensors.torch import load_file

    return load_file(str(d / "global_delta.safetensors"))


def test_resume_keeps_finished_runs_continues_stopped_ones_and_extends_rounds(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _compare(full, "--rounds", "3").exit_code == 0
    res = _compare(cut)
    assert res.exit_code == 0, res.output
    # fedex was "stopped" after round 2 of 3: its summary and last outputs are gone, checkpoints stay
    (cut / "fedex" / "summary.json").unlink()
    fedavg_mtime = (cut / "fedavg" / "metrics.jsonl").stat().st_mtime_ns
    res = _compare(cut, "--resume", "--rounds", "3")
    assert res.exit_code == 0, res.output
    assert "fedex: resuming from its last checkpoint" in res.output
    for name in ("fedavg", "fedex"):  # both at 3 rounds now, equal to the uninterrupted comparison
        assert [r["round"] for r in _rows(cut / name)] == [1, 2, 3]
        a, b = _delta(full / name), _delta(cut / name)
        for k in a:
            assert (a[k] - b[k]).abs().max() < 1e-5, (name, k)
    assert (cut / "fedavg" / "metrics.jsonl").stat().st_mtime_ns != fedavg_mtime  # extended
    again = _compare(cut, "--resume", "--rounds", "3")  # nothing left to do: both kept
    assert again.exit_code == 0 and again.output.count("finished earlier, kept") == 2
    assert (cut / "report.md").is_file()


def test_resume_refuses_a_run_made_with_another_config(tmp_path):
    root = tmp_path / "cmp"
    assert _compare(root).exit_code == 0
    res = _compare(root, "--resume", "--set", "train.lr=0.5")
    assert res.exit_code == 2
    assert "was run with another config (train.lr differ)" in " ".join(res.output.split())


def test_resume_with_nothing_there_runs_everything(tmp_path):
    root = tmp_path / "cmp"
    res = _compare(root, "--resume")
    assert res.exit_code == 0, res.output
    assert all((root / n / "summary.json").is_file() for n in ("fedavg", "fedex"))
    shutil.rmtree(root)


def test_seeds_report_mean_and_standard_deviation_of_each_strategys_runs(tmp_path):
    import statistics

    root = tmp_path / "cmp"
    res = _compare(root, "--seeds", "0,1,2", "--rounds", "1")
    assert res.exit_code == 0, res.output
    text = (root / "seeds.md").read_text()
    for name in ("fedavg", "fedex"):
        finals = [_rows(root / f"seed-{s}" / name)[-1]["accuracy"] for s in (0, 1, 2)]
        assert len(set(finals)) > 1  # the seeds differ
        line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1] == "3"
        assert cells[2] == f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}"
        mb_up = statistics.fmean(sum(r["bytes_up"] for r in _rows(root / f"seed-{s}" / name)) / 1e6
                                 for s in (0, 1, 2))
        assert cells[4] == f"{mb_up:.3f}"
    assert _compare(root, "--seeds", "0,1", "--sweep", "data.alpha=1").exit_code == 2
