"""Each round's metrics to TensorBoard event files and to MLflow, beside ``metrics.jsonl``.

Switched on in the run's ``[tracking]`` section (each behind its optional extra)::

    [tracking]
    tensorboard = true      # <run_dir>/tensorboard/ -> tensorboard --logdir runs   (fedlora[tensorboard])
    mlflow = true           # one MLflow run per fedlora run                       (fedlora[mlflow])
    mlflow_uri = ""         # empty: sqlite:///<run_dir>/mlflow.db, a local store -> mlflow ui
                            #   --backend-store-uri sqlite:///runs/<name>/mlflow.db; or a tracking server
    mlflow_experiment = ""  # empty: the run's name

The local default is a SQLite file because MLflow 3 refuses its old ``./mlruns`` file store unless
told otherwise (``MLFLOW_ALLOW_FILE_STORE``); a ``file:`` URI still works when that is set.

What is logged: every finite number at the top level of a round's row (accuracy, losses, bytes up
and down, ε, aggregation error and times ...) at ``step = round``; MLflow also gets the resolved
config, flattened, as parameters, and the summary's numbers as ``final/<key>`` at the end. A
resumed run appends to the same TensorBoard folder and continues the same MLflow run (its id is
kept in ``<run_dir>/mlflow_run_id``). ``metrics.jsonl`` stays the record: a tracker that fails
mid-run is reported once in the server log and switched off, and the run goes on.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

log = logging.getLogger("fedlora.tracking")


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers at the top level of a metrics row (booleans and nested values left out)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]  # MLflow's limit on a parameter's value
    return out


class TensorBoardSink:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))

    def round(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, summary: dict[str, float]) -> None:
        self.writer.close()


class MLflowSink:
    def __init__(self, run_dir: Path, uri: str, experiment: str, run_name: str, params: dict,
                 resume: bool) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri or f"sqlite:///{(run_dir / 'mlflow.db').absolute()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        id_file = run_dir / "mlflow_run_id"
        if resume and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        id_file.write_text(self.run_id + "\n")
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def round(self, step: int, values: dict[str, float]) -> None:
        self._metrics(values, step)

    def close(self, summary: dict[str, float]) -> None:
        self._metrics({f"final/{k}": v for k, v in summary.items()}, 0)
        self.client.set_terminated(self.run_id)


class Trackers:
    """The trackers a run's config switches on; ``round(row)`` after each round, ``close(summary)``
    at the end."""

    def __init__(self, cfg, run_dir: Path, resume: bool = False) -> None:
        t = cfg.tracking
        self.sinks: list = []
        if t.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir))
        if t.mlflow:
            self.sinks.append(MLflowSink(run_dir, t.mlflow_uri, t.mlflow_experiment or cfg.name, cfg.name,
                                         cfg.to_dict(), resume))

    def _each(self, call: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, call)(*args)
            except Exception as e:  # noqa: BLE001 - metrics.jsonl is the record; the run goes on
                log.warning("%s failed (%s: %s); it is switched off for the rest of this run",
                            type(sink).__name__, type(e).__name__, e)
                self.sinks.remove(sink)

    def round(self, row: dict) -> None:
        self._each("round", int(row["round"]), scalars(row))

    def close(self, summary: dict) -> None:
        self._each("close", scalars(summary))
