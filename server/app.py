"""fedlora's Flower ServerApp: builds the run's fedlora strategy and drives it through Flower.

Run config (``[tool.flwr.app.config]``, ``flwr run -c``): ``config-path`` (the resolved run TOML the
CLI writes to ``runs/<name>/config.toml``; empty: the built-in smoke defaults) plus the flat
overrides ``strategy``, ``num-server-rounds``, ``seed``, ``run-dir``, ``round-timeout``,
``min-nodes`` (empty/0/-1 = "from the config") and ``resume`` (continue from the run folder's
latest checkpoint).

One run:

1. Build the model once (adapted layer shapes → ``LayerSpec``s; it is also the server-side
   evaluation model) and the fedlora strategy; Fed-SB: init gradients on a server-held split.
2. Every round (``FedLoraStrategy``, a ``flwr.serverapp.strategy.Strategy`` run by its own
   ``start`` loop): ``configure_train`` waits for the nodes (Flower's ``sample_nodes``), asks
   nodes it has not seen for their capabilities (one QUERY message each: rank, partition, device,
   num_examples), samples ``fraction_train`` of them and sends **each node its own Message** (its
   rank's payload). ``aggregate_train`` decodes the replies, logs errors/missing replies and goes
   on with the rest, hands the ``ClientUpdate``s to the fedlora strategy, evaluates the global
   model on the server's held-out split (every ``eval.every`` rounds; FedSA: the clients'
   personalised accuracies from their train replies, mean and weighted mean), writes one line to
   ``metrics.jsonl`` and a checkpoint. There is no evaluate exchange (``configure_evaluate``
   sends nothing): one message per client per round.
3. At the end: ``global_delta.safetensors`` (``{layer: W_g - W0}``), ``summary.json`` and the
   PEFT adapter export (``adapter/``).

Client ids are ``client-<partition-id>`` (stable across runs and restarts, unlike Flower node ids),
so a resumed run and a restarted node map to the same fedlora client. Sampling is
``random.Random(seed, round)`` over the sorted client ids (not Flower's global-``random``
``sample_nodes``), so a resumed run samples what the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedlora import flower_io, rundata
from fedlora.checkpoint import (
    export_peft_adapter,
    latest_checkpoint,
    load_checkpoint,
    rng_restore,
    rng_snapshot,
    save_checkpoint,
)
from fedlora.client import load_global
from fedlora.config import RunConfig, load_config
from fedlora.lora import lora_layers
from fedlora.node_cache import atomic_save_safetensors
from fedlora.runlog import RunLog, summarize, write_summary
from fedlora.strategies import LayerSpec, create_strategy
from fedlora.train import accumulate_weight_gradients, evaluate, release_memory

log = logging.getLogger("fedlora.server")
app = ServerApp()

#: run-config keys -> "not set" values
RUN_CONFIG_UNSET = {"config-path": "", "strategy": "", "num-server-rounds": 0, "seed": -1, "run-dir": "",
                    "round-timeout": 0.0, "min-nodes": 0, "resume": False}


class StopRun(Exception):
    """Raised by the test hook ``stop_after_round`` (simulates a server killed mid-run)."""


def resolve_config(run_config: Mapping) -> RunConfig:
    """The RunConfig from ``config-path`` (or defaults) + the flat run-config overrides."""
    path = str(run_config.get("config-path", "") or "")
    values = {}
    for key, unset in RUN_CONFIG_UNSET.items():
        if key in ("config-path", "resume") or key not in run_config:
            continue
        v = run_config[key]
        if v == unset or (isinstance(unset, float) and float(v) == unset):
            continue
        values[key] = v
    return load_config(path or None, values=values)


class PollingGrid:
    """A Grid whose ``send_and_receive`` polls every ``poll`` seconds (Flower's HTTP grid: 3 s) and
    ends a train exchange as soon as ``min_replies`` replies are in (0: all of them), else at the
    timeout. Replies that come later are not waited for: those clients re-sync next time."""

    def __init__(self, grid: Grid, poll: float, min_replies: int = 0) -> None:
        self._grid, self._poll, self._min = grid, poll, min_replies

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        enough = len(messages)
        if self._min and all(m.metadata.message_type == MessageType.TRAIN for m in messages):
            enough = min(self._min, enough)
        ids = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        out: list[Message] = []
        while ids and len(out) < enough and (timeout is None or time.time() < end):
            got = list(self._grid.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if ids and len(out) < enough:
                time.sleep(self._poll)
        return out


@dataclass
class Pending:
    client_id: str
    node_id: int
    rank: int
    version: int  # the base version the payload brings the client to
    bytes_down: int  # the whole message as Flower pushes it (flower_io.wire_bytes)
    tensor_bytes_down: int  # the payload's tensors alone


# ---- checkpoints ---------------------------------------------------------------------------------

def _save_checkpoint(path: Path, **kw) -> None:
    save_checkpoint(path, rng_state=rng_snapshot(), **kw)


def _load_checkpoint(path: Path) -> dict:
    ck = load_checkpoint(path)
    if ck.rng_state is not None:
        rng_restore(ck.rng_state)
    return {"strategy": ck.strategy, "round": ck.round, "state": ck.state, "metrics": ck.metrics}


# ---- the strategy ------------------------------------------------------------------------------

class FedLoraStrategy(Strategy):
    """Flower strategy around a fedlora strategy: per-node payloads, decoded updates, logs."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False,
                 stop_after_round: int | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.spec = cfg.client_spec()
        self.stop_after_round = stop_after_round
        torch.manual_seed(cfg.seed)
        self.model = rundata.build_base(self.spec)
        names, _ = rundata.inject(self.spec, self.model, cfg.r_max)
        self.layer_names = names
        layers = {n: LayerSpec(m.out_features, m.in_features) for n, m in lora_layers(self.model).items()}
        dtype = torch.float64 if cfg.strategy.dtype == "float64" else torch.float32
        self.fl = create_strategy(cfg.strategy.name, layers=layers, r_max=cfg.r_max, scale=cfg.scale,
                                  weighting=cfg.strategy.weighting, seed=cfg.seed, dtype=dtype)
        self.log = RunLog(self.run_dir)
        self.caps: dict[int, dict] = {}  # node id -> capabilities
        self.caps_log: list[int] = []  # node ids in discovery order
        self.held: dict[str, int] = {}  # client id -> base version it holds (0: W0 / unknown)
        self.ranks: dict[str, int] = {}
        self.pending: dict[int, Pending] = {}
        self._query_bytes = [0, 0]  # (down, up) of this round's capability queries
        self.start_round = 0
        self.rows: list[dict] = []
        self._t_round = 0.0
        self._test_loader = None
        if resume and (ck_path := latest_checkpoint(self.run_dir)) is not None:
            ck = _load_checkpoint(ck_path)
            if ck["strategy"] != cfg.strategy.name:
                raise ValueError(f"checkpoint {ck_path} is for strategy {ck['strategy']!r}, the config "
                                 f"says {cfg.strategy.name!r}")
            self.fl.load_state_dict(ck["state"])
            self.start_round = int(ck["round"])
            self.rows = list(ck.get("metrics") or [])[: self.start_round]
            log.info("resumed %s from %s (round %d)", cfg.name, ck_path, self.start_round)
        elif self.fl.init_from == "server-gradients":
            self._init_from_server_gradients()
        self.log.reset(self.rows)
        # each DP client's accountant history as it last reported it (rebuilt from the metrics
        # rows on resume); sent back with its payloads
        self.privacy: dict[str, dict] = {c["id"]: c["privacy_state"] for r in self.rows
                                         for c in r["clients"] if c.get("privacy_state")}
        # one id per run, kept by --resume: clients key what must outlive their process by it
        # (a DP client's accountant history in its node cache)
        self.spec.run_uid = self._run_uid(resume)

    # ---- setup helpers -------------------------------------------------------------------------
    def _run_uid(self, resume: bool) -> str:
        import uuid

        path = self.run_dir / "run_uid"
        if resume and path.is_file():
            return path.read_text().strip()
        uid = uuid.uuid4().hex[:16]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uid + "\n")
        return uid

    def _init_from_server_gradients(self) -> None:
        s = self.cfg.strategy
        ds = rundata.init_data(self.spec, s.fedsb_init_examples)
        loader = rundata.loader(self.spec, ds, self.cfg.train.batch_size, False, 0)
        grads = accumulate_weight_gradients(self.model, loader, self.layer_names, s.fedsb_init_batches, "cpu")
        self.fl.initialize(grads, eta=s.fedsb_eta or self.cfg.train.lr)

    def test_loader(self):
        if self._test_loader is None:
            ds = rundata.server_eval_data(self.spec)
            self._test_loader = rundata.loader(self.spec, ds, self.cfg.eval.batch_size, False, 0)
        return self._test_loader

    def evaluate_global(self) -> dict:
        load_global(self.model, self.fl)
        ev = evaluate(self.model, self.test_loader(), device="cpu")
        release_memory()
        return {"accuracy": ev.accuracy, "loss": ev.loss, "eval_examples": ev.num_examples}

    def _run_record(self, rnd: int) -> ConfigRecord:
        return flower_io.run_record(self.spec, rnd)

    # ---- capability discovery (QUERY) ----------------------------------------------------------
    def discover(self, grid: Grid, node_ids: list[int]) -> list[dict]:
        """Ask nodes not seen yet for their capabilities; returns failures."""
        new = [n for n in node_ids if n not in self.caps]
        if not new:
            return []
        msgs = [Message(RecordDict({flower_io.RUN: self._run_record(0)}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in new]
        self._query_bytes[0] += sum(flower_io.wire_bytes(m) for m in msgs)
        replies = grid.send_and_receive(msgs, timeout=self.cfg.clients.round_timeout)
        self._query_bytes[1] += sum(flower_io.wire_bytes(m) for m in replies)
        failures = []
        for m in replies:
            nid = m.metadata.src_node_id
            if m.has_error():
                failures.append({"node": nid, "stage": "query", "error": m.error.reason})
                continue
            caps = dict(m.content.metric_records["caps"])
            caps["device"] = str(m.content.config_records["caps.config"]["device"])
            caps["client_id"] = f"client-{int(caps['partition-id'])}"
            caps["discovered"] = len(self.caps_log)  # a restarted node (new id) outranks its old id
            self.caps_log.append(nid)
            self.caps[nid] = caps
        for n in new:
            if n not in self.caps and not any(f["node"] == n for f in failures):
                failures.append({"node": n, "stage": "query", "error": "no reply within round_timeout"})
        return failures

    # ---- Flower strategy API -------------------------------------------------------------------
    def summary(self) -> None:
        log.info("fedlora %s: %d layers, r_max=%d, scale=%g, ranks=%s", self.fl.name, len(self.fl.layers),
                 self.fl.r_max, self.fl.scale, self.cfg.clients.ranks)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = self.start_round + server_round
        if self.stop_after_round is not None and rnd > self.stop_after_round:
            raise StopRun(f"stopped before round {rnd} (stop_after_round)")
        self._t_round = time.perf_counter()
        c = self.cfg.clients
        _, all_nodes = sample_nodes(grid, c.min_nodes or c.num, 0)  # Flower's wait for the nodes
        self._failures = self.discover(grid, sorted(all_nodes))
        known = sorted((n for n in all_nodes if n in self.caps), key=lambda n: self.caps[n]["discovered"])
        by_client = {self.caps[n]["client_id"]: n for n in known}  # the latest node of a client wins
        k = max(1, math.ceil(c.fraction_train * len(by_client)))
        rng = random.Random(self.cfg.seed * 1_000_003 + rnd)
        chosen = sorted(rng.sample(sorted(by_client), min(k, len(by_client))),
                        key=lambda cid: int(cid.split("-")[1]))
        self.pending = {}
        msgs = []
        for cid in chosen:
            nid = by_client[cid]
            rank = int(self.caps[nid]["rank"])
            if self.ranks.get(cid, rank) != rank:
                self.held[cid] = 0  # a client that changed rank re-syncs from W0
            self.ranks[cid] = rank
            from_v = self.held.get(cid, 0)
            p = self.fl.payload(cid, rank, from_v)
            rd = flower_io.payload_to_record(p, self.spec, rnd, from_v)
            if cid in self.privacy:
                rd[flower_io.PRIVACY] = flower_io.privacy_to_record(self.privacy[cid])
            msg = Message(rd, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(rnd))
            self.pending[nid] = Pending(cid, nid, rank, p.base_version, flower_io.wire_bytes(msg),
                                        p.bytes_down)
            msgs.append(msg)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.start_round + server_round
        rows: dict[str, dict] = {}
        failures = list(getattr(self, "_failures", []))
        updates = []
        for m in replies:
            nid = m.metadata.src_node_id
            pend = self.pending.pop(nid, None)
            if pend is None:
                continue
            row = {"id": pend.client_id, "node": nid, "rank": pend.rank, "bytes_down": pend.bytes_down,
                   "bytes_up": flower_io.wire_bytes(m), "tensor_bytes_down": pend.tensor_bytes_down,
                   "accepted": False}
            rows[pend.client_id] = row
            if m.has_error():
                row["error"] = m.error.reason
                failures.append({"client": pend.client_id, "node": nid, "stage": "train",
                                 "error": m.error.reason})
                self.held[pend.client_id] = 0  # state unknown: re-sync from W0 next time
                continue
            try:
                u = flower_io.record_to_update(m.content)
            except (ValueError, KeyError) as e:
                row["error"] = f"undecodable reply: {e}"
                failures.append({"client": pend.client_id, "node": nid, "stage": "decode", "error": str(e)})
                self.held[pend.client_id] = 0
                continue
            if u.client_id != pend.client_id:
                row["error"] = f"reply claims client id {u.client_id!r}"
                failures.append({"client": pend.client_id, "node": nid, "stage": "decode",
                                 "error": row["error"]})
                continue
            self.held[pend.client_id] = pend.version
            if (ps := flower_io.record_privacy(m.content)) is not None:
                self.privacy[pend.client_id] = row["privacy_state"] = ps
            met = u.metrics
            row |= {"loss": met.get("loss"), "examples": u.num_examples,
                    "train_seconds": met.get("train-time-s"), "peak_memory": met.get("peak-memory-bytes"),
                    "metrics": dict(met)}
            updates.append(u)
        for nid, pend in self.pending.items():  # sampled, never answered
            rows[pend.client_id] = {"id": pend.client_id, "node": nid, "rank": pend.rank,
                                    "bytes_down": pend.bytes_down, "bytes_up": 0,
                                    "tensor_bytes_down": pend.tensor_bytes_down, "accepted": False,
                                    "error": "no reply within round_timeout"}
            failures.append({"client": pend.client_id, "node": nid, "stage": "train",
                             "error": "no reply within round_timeout"})
            self.held[pend.client_id] = 0
        self.pending = {}
        report = self.fl.aggregate(updates)
        for cid in report.accepted:
            rows[cid]["accepted"] = True
            rows[cid]["weight"] = report.weights.get(cid)
        for cid, reason in report.rejected.items():
            if cid in rows:
                rows[cid]["rejected"] = reason
        ok = [r for r in rows.values() if r["accepted"]]
        out = {"round": rnd, "strategy": self.fl.name, "version": report.version,
               "clients": sorted(rows.values(), key=lambda r: int(r["id"].split("-")[1])),
               "failures": failures,
               "train_loss": (sum(r["loss"] for r in ok) / len(ok)) if ok else None,
               "aggregation_error": report.aggregation_error, "agg_seconds": report.agg_seconds,
               # capability queries (once per node) are part of this round's traffic
               "query_bytes_up": self._query_bytes[1], "query_bytes_down": self._query_bytes[0],
               "bytes_up": sum(r["bytes_up"] for r in rows.values()) + self._query_bytes[1],
               "bytes_down": sum(r["bytes_down"] for r in rows.values()) + self._query_bytes[0],
               "tensor_bytes_up": sum(report.bytes_up.values()),
               "tensor_bytes_down": sum(report.bytes_down.values())}
        self._query_bytes = [0, 0]
        every = self.cfg.eval.every
        if self.fl.has_global_model and ((every and rnd % every == 0) or rnd == self.cfg.rounds):
            out |= self.evaluate_global()
        if not self.fl.has_global_model:
            pers = [(r["metrics"]["eval-accuracy"], r["metrics"].get("eval-examples", 1)) for r in ok
                    if "eval-accuracy" in r.get("metrics", {})]
            if pers:
                out["personal_accuracy_mean"] = sum(a for a, _ in pers) / len(pers)
                out["personal_accuracy_weighted"] = sum(a * n for a, n in pers) / sum(n for _, n in pers)
                out["accuracy"] = out["personal_accuracy_weighted"]
        out["round_seconds"] = time.perf_counter() - self._t_round
        self.rows.append(out)
        self.log.append(out)
        _save_checkpoint(self.run_dir / "checkpoints" / f"round-{rnd:04d}.ckpt", strategy=self.fl.name,
                         round=rnd, state=self.fl.state_dict(), scale=self.fl.scale, r_max=self.fl.r_max,
                         ranks=dict(self.ranks), base_version=self.fl.version, config=self.cfg.to_dict(),
                         metrics=self.rows)
        num = {k: float(v) for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return None, MetricRecord(num)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # evaluation rides in the train round (server split / FedSA personal metrics)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    # ---- end of run ------------------------------------------------------------------------------
    def finish(self) -> dict:
        out: dict = {}
        if self.fl.has_global_model:
            deltas = {n: self.fl.global_delta(n).float() for n in self.fl.layers}
            meta = {"strategy": self.fl.name, "round": str(len(self.rows))}
            atomic_save_safetensors(self.run_dir / "global_delta.safetensors", deltas, meta)
            out["adapter"] = self._export_adapter(deltas)
        summary = summarize(self.rows, {"name": self.cfg.name, "run_dir": str(self.run_dir),
                                        "ranks": self.ranks, **out})
        write_summary(self.run_dir, summary)
        return summary

    def _export_adapter(self, deltas: dict[str, torch.Tensor]) -> str | None:
        """The global model as a PEFT folder: ``ΔW = W_g − W0`` split exactly into a rank-r_max
        adapter (top r_max singular directions, ``s·B·A``) plus the remainder as base deltas."""
        factors, rest = {}, {}
        s, r = self.fl.scale, self.fl.r_max
        for n, d in deltas.items():
            U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
            sq = S[:r].sqrt()
            B, A = U[:, :r] * sq / math.sqrt(s), sq[:, None] * Vh[:r] / math.sqrt(s)
            factors[n] = {"A": A.float(), "B": B.float()}
            rest[n] = (d.double() - s * B @ A).float()
        lcfg, _ = rundata.lora_config(self.spec, self.model, r)
        try:
            path = export_peft_adapter(self.run_dir / "adapter", factors=factors, scale=s,
                                       target_modules=lcfg.targets, base_model=self.cfg.model.name,
                                       base_deltas=rest, head=self.fl.global_head(), strategy=self.fl.name,
                                       round=len(self.rows))
        except Exception as e:  # noqa: BLE001 - the export must not lose a finished run
            log.warning("adapter export failed: %s", e)
            return None
        return str(path)


def run_server(grid: Grid, run_config: Mapping, stop_after_round: int | None = None) -> dict:
    """Everything the ServerApp does (tests call it with a ``LoopbackGrid``)."""
    cfg = resolve_config(run_config)
    run_dir = cfg.resolved_run_dir()
    resume = bool(run_config.get("resume", False))
    strategy = FedLoraStrategy(cfg, run_dir, resume=resume, stop_after_round=stop_after_round)
    left = cfg.rounds - strategy.start_round
    if left > 0:
        try:
            strategy.start(grid=PollingGrid(grid, cfg.clients.poll_interval, cfg.clients.min_replies),
                           initial_arrays=ArrayRecord(),
                           num_rounds=left, timeout=cfg.clients.round_timeout)
        except StopRun:
            return {"stopped": True, "rounds": len(strategy.rows)}
    return strategy.finish()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = dict(context.run_config)
    # "stop-after-round": a test hook (fedlora.loopback): the server dies after that round
    stop = int(rc.pop("stop-after-round", 0) or 0) or None
    run_server(grid, rc, stop_after_round=stop)
