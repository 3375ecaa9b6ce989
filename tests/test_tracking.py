"""Per-round metrics reach TensorBoard event files and MLflow (real libraries, local stores), equal
to metrics.jsonl; a resumed run continues the same MLflow run; a missing package is a config error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedlora.config import load_config
from fedlora.loopback import run_loopback
from fedlora.tracking import scalars

ROOT = Path(__file__).resolve().parents[1]
needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                              reason="pip install 'fedlora[tensorboard]'")
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="pip install 'fedlora[mlflow]'")


def _cfg(run_dir: Path, *sets: str):
    return load_config(ROOT / "simulations" / "smoke.toml", [
        f"run_dir={json.dumps(str(run_dir))}", "rounds=3", "clients.num=3", "data.examples_per_client=64",
        "train.local_steps=3", *sets])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@needs_tb
@needs_mlflow
def test_every_rounds_numbers_reach_tensorboard_and_mlflow_also_across_a_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, "tracking.tensorboard=true", "tracking.mlflow=true",
               'tracking.mlflow_experiment="exp"')
    assert run_loopback(cfg, stop_after_round=2)["stopped"]  # the server dies after round 2 ...
    run_loopback(cfg, resume=True)  # ... and the run is resumed
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    expected = {}
    for r in rows:
        for k, v in scalars(r).items():
            expected.setdefault(k, []).append((r["round"], v))
    for must in ("accuracy", "bytes_up", "bytes_down", "train_loss"):
        assert must in expected, sorted(expected)

    tb = _tb_scalars(run_dir / "tensorboard")
    assert set(tb) == set(expected)
    for k, series in expected.items():  # float32 in the event files
        assert [s for s, _ in sorted(tb[k])] == [s for s, _ in series], k
        assert [v for _, v in sorted(tb[k])] == pytest.approx([v for _, v in series], rel=1e-6, abs=1e-6), k

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1  # the resumed run continued the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["strategy.name"] == "fedex"
    for k, series in expected.items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
        assert hist == [(s, pytest.approx(v)) for s, v in series], k
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["final/final_accuracy"] == pytest.approx(summary["final_accuracy"])


@needs_mlflow
def test_a_given_tracking_uri_is_used(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    cfg = _cfg(tmp_path / "run", "rounds=1", "tracking.mlflow=true", f'tracking.mlflow_uri="{uri}"')
    run_loopback(cfg)
    assert not (tmp_path / "run" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [1]


@pytest.mark.parametrize("key", ["tensorboard", "mlflow"])
def test_a_tracker_without_its_package_is_a_config_error(monkeypatch, key):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == key else real(name, *a))
    msg = rf"tracking\.{key}: needs the {key} package: pip install 'fedlora\[{key}\]'"
    with pytest.raises(ValueError, match=msg):
        load_config(ROOT / "simulations" / "smoke.toml", [f"tracking.{key}=true"])
