"""fedlora's Flower ServerApp: builds the run's fedlora strategy and drives it through Flower.

Run config (``[tool.flwr.app.config]``, ``flwr run -c``): ``config-path`` (a run TOML, e.g. the
resolved one the CLI writes to ``runs/<name>/config.toml``; empty: the built-in smoke defaults; the
server writes the resolved run there in any case) plus the flat
overrides ``strategy``, ``num-server-rounds``, ``seed``, ``run-dir``, ``round-timeout``,
``min-nodes`` (empty/0/-1 = "from the config") and ``resume`` (continue from the run folder's
latest checkpoint).

One run:

1. Build the model once (adapted layer shapes → ``LayerSpec``s; it is also the server-side
   evaluation model) and the fedlora strategy; Fed-SB: init gradients on a server-held split.
2. Every round (``FedLoraStrategy``, a ``flwr.serverapp.strategy.Strategy`` run by its own
   ``start`` loop): ``configure_train`` waits for the nodes (Flower's ``sample_nodes``), asks nodes
   it has not seen for their capabilities (one QUERY message each: rank, partition, device,
   num_examples, fedlora version — a node of another version is refused), samples
   ``fraction_train`` of them and sends **each node its own Message** (its rank's payload).
   ``aggregate_train`` decodes the replies, logs errors/missing replies and goes on with the rest,
   hands the ``ClientUpdate``s to the fedlora strategy, evaluates the global model on the server's
   held-out split (every ``eval.every`` rounds; FedSA: the clients' personalised accuracies from
   their train replies, mean and weighted mean), writes one line to ``metrics.jsonl`` (and to
   TensorBoard / MLflow when ``[tracking]`` says so) and a checkpoint. There is no evaluate
   exchange (``configure_evaluate`` sends nothing): one message per client per round.
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
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedlora import flower_io, rundata
from fedlora.checkpoint import (
    checkpoint_path,
    latest_valid_checkpoint,
    load_checkpoint,
    rng_restore,
    rng_snapshot,
    save_checkpoint,
)
from fedlora.client import head_state
from fedlora.config import RunConfig, load_config
from fedlora.evaluation import ServerEvaluator
from fedlora.export import export_global
from fedlora.ledger import Pending, RoundLedger
from fedlora.lora import lora_layers
from fedlora.privacy import PrivacyState
from fedlora.roster import ClientRoster
from fedlora.runlog import RunLog, summarize, write_summary
from fedlora.sim import prepare_run_dir, write_run_config
from fedlora.strategies import LayerSpec, NormBound, create_strategy
from fedlora.tracking import Trackers
from fedlora.train import accumulate_weight_gradients
from fedlora.version import library_version, rng_fingerprint

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


FIRST_POLL = 0.01  # seconds: the first wait for replies (then doubling up to clients.poll_interval)


class PollingGrid:
    """A Grid whose ``send_and_receive`` polls for replies 10 ms after sending (and after each
    reply), doubling the wait up to ``poll`` seconds (Flower's HTTP grid: every 3 s), and
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
        wait = min(self._poll, FIRST_POLL)
        while ids and len(out) < enough and (timeout is None or time.time() < end):
            got = list(self._grid.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if ids and len(out) < enough:
                # replies come in bursts: poll soon after one, then back off to ``poll``
                if got:
                    wait = min(self._poll, FIRST_POLL)
                time.sleep(wait)
                wait = min(self._poll, 2 * wait)
        return out


# ---- the strategy ------------------------------------------------------------------------------

class FedLoraStrategy(Strategy):
    """Flower's calls on one side; fedlora's units on the other: the strategy (``self.fl``), the
    client roster, one ledger per round, the evaluator, checkpoints and exports."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False,
                 stop_after_round: int | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.spec = cfg.client_spec()
        if not rundata.is_causal(self.spec):  # a node with its own data maps its labels through these
            self.spec.label_names = rundata.label_names(self.spec)
        self.stop_after_round = stop_after_round
        torch.manual_seed(cfg.seed)
        self.model = rundata.build_base(self.spec, full_precision=True)  # evaluation and exports
        self.layer_names, head_names = rundata.inject(self.spec, self.model, cfg.r_max)
        layers = {n: LayerSpec(m.out_features, m.in_features) for n, m in lora_layers(self.model).items()}
        dtype = torch.float64 if cfg.strategy.dtype == "float64" else torch.float32
        self.fl = create_strategy(cfg.strategy.name, layers=layers, r_max=cfg.r_max, scale=cfg.scale,
                                  weighting=cfg.strategy.weighting, seed=cfg.seed, dtype=dtype,
                                  check_exactness=cfg.strategy.check_exactness,
                                  max_weight_share=cfg.strategy.max_weight_share,
                                  norm_bound=NormBound(cfg.strategy.norm_bound_mode,
                                                       cfg.strategy.norm_bound_multiple,
                                                       cfg.strategy.norm_bound_absolute),
                                  **cfg.strategy_kwargs())
        # the head every client starts from: uploads are checked against it from round 1
        self.fl.init_head(head_state(self.model, head_names))
        self.evaluator = ServerEvaluator(self.model, self.spec, self.run_dir)
        self.warned: set[tuple] = set()  # failures already on the terminal
        self.connected = 0  # nodes connected at the last round's start
        self.log = RunLog(self.run_dir)
        self.roster = ClientRoster()
        self.ledger = RoundLedger(0)
        self.start_round = 0
        self.rows: list[dict] = []
        ck_path = self._resume_point() if resume else None
        if ck_path is not None:
            ck = load_checkpoint(ck_path)
            if ck.strategy != cfg.strategy.name:
                raise ValueError(f"checkpoint {ck_path} is for strategy {ck.strategy!r}, the config "
                                 f"says {cfg.strategy.name!r}")
            if ck.rng_state:
                rng_restore(ck.rng_state)
            self.fl.load_state_dict(ck.state["strategy"])
            self.roster = ClientRoster.from_state(ck.state["roster"])
            self.start_round = int(ck.round)
            self.rows = self.log.rows()[: self.start_round]  # the metrics file holds the history
            log.info("resumed %s from %s (round %d)", cfg.name, ck_path, self.start_round)
        elif self.fl.init_from == "server-gradients":
            self._init_from_server_gradients()
        self.log.reset(self.rows)
        self.trackers = Trackers(cfg, self.run_dir, resume=ck_path is not None)
        # one id per run, kept by --resume: clients key what must outlive their process by it
        # (a DP client's accountant history in its node cache)
        self.spec.run_uid = self._run_uid(resume)

    # ---- setup helpers -------------------------------------------------------------------------
    def _resume_point(self) -> Path | None:
        """The newest checkpoint that verifies (newer, damaged ones are skipped and said so); an
        error when there are checkpoints but none verifies: a resume never silently restarts."""
        path, skipped = latest_valid_checkpoint(self.run_dir)
        for bad, reason in skipped:
            log.warning("skipping %s: %s", bad.name, reason)
        if path is None and skipped:
            raise ValueError(f"--resume {self.run_dir}: no checkpoint verifies ("
                             + "; ".join(f"{p.name}: {r}" for p, r in skipped) + ")")
        return path

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

    # ---- capability discovery (QUERY) ----------------------------------------------------------
    def discover(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes not seen yet for their capabilities (failures go to this round's ledger)."""
        new = self.roster.unknown(node_ids)
        if not new:
            return
        msgs = [Message(RecordDict({flower_io.RUN: flower_io.run_record(self.spec, 0)}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in new]
        self.ledger.query_bytes[0] += sum(flower_io.wire_bytes(m) for m in msgs)
        replies = grid.send_and_receive(msgs, timeout=self.cfg.clients.round_timeout)
        self.ledger.query_bytes[1] += sum(flower_io.wire_bytes(m) for m in replies)
        # in node order, not arrival order: which of two nodes claiming one partition-id wins repeats
        for m in sorted(replies, key=lambda m: m.metadata.src_node_id):
            nid = m.metadata.src_node_id
            if m.has_error():
                reason = m.error.reason
                if "attempting to load `ClientApp`" in reason:  # Flower's words for an import failure
                    reason += (f" (is fedlora installed on the node, the server's version "
                               f"{library_version()}? Flower ships only the apps)")
                self.ledger.fail("query", reason, nid)
                continue
            try:
                caps = m.content.metric_records["caps"]
                pid, rank, n = (flower_io.exact_int(caps[k], f"capability {k}")
                                for k in ("partition-id", "rank", "num-examples"))
                if n < 1 or pid < 0 or not 1 <= rank <= self.fl.r_max:
                    raise ValueError(f"capabilities out of range: partition-id {pid}, rank {rank} "
                                     f"(r_max {self.fl.r_max}), num-examples {n}")
                node_caps = m.content.config_records["caps.config"]
                device = str(node_caps["device"])
                version, ours = str(node_caps.get("fedlora-version", "unknown")), library_version()
                if version != ours:  # the node runs its installed fedlora, not one shipped with the apps
                    raise ValueError(f"the node runs fedlora {version}, this server {ours} (release + "
                                     "code fingerprint): install the server's fedlora on the node")
                if str(node_caps.get("rng", "unknown")) != rng_fingerprint():  # seeded factors (a_seeds)
                    theirs = node_caps.get("torch-version", "unknown")
                    raise ValueError(f"the node's torch ({theirs}) draws other random numbers for a seed "
                                     f"than this server's ({torch.__version__}): a factor sent as its seed "
                                     "would differ; install the server's torch on the node")
            except Exception as e:  # noqa: BLE001 - a node is untrusted too
                self.ledger.fail("query", f"bad capabilities: {type(e).__name__}: {e}", nid)
                continue
            twin = [o for o in node_ids if o != nid and o in self.roster.nodes
                    and self.roster.nodes[o].client_id == f"client-{pid}"]  # both connected
            if twin:  # (a restarted node's new session, or two nodes given one partition-id)
                why = (f"node {nid} has partition-id {pid} too: only the latest node of a client takes part "
                       f"(give each node its own partition-id, unless node {twin[-1]} is node {nid}'s "
                       "previous session, not yet timed out)")
                self.ledger.fail("query", f"replaced: {why}", twin[-1])  # (the log says it once)
            self.roster.add(nid, f"client-{pid}", rank, device, n)
        failed = {f["node"] for f in self.ledger.failures}
        for n in self.roster.unknown(new):
            if n not in failed:
                self.ledger.fail("query", "no reply within round_timeout", n)

    def warn_once(self, key: tuple, msg: str, *args) -> None:
        """A warning on the operator's terminal (`flwr run --stream`, the server log) the first time
        ``key`` happens; metrics.jsonl has every occurrence."""
        if key not in self.warned:
            self.warned.add(key)
            log.warning(msg, *args)

    def warn_failures(self) -> None:
        """Each failed or refused node, once per node and reason."""
        for f in self.ledger.failures:
            who = f"{f['client']} (node {f['node']})" if f.get("client") else f"node {f['node']}"
            self.warn_once((f.get("node"), f.get("stage"), f.get("error")), "round %d: %s failed at %s: %s",
                           self.ledger.round, who, f.get("stage"), f.get("error"))

    # ---- Flower strategy API -------------------------------------------------------------------
    def summary(self) -> None:
        log.info("fedlora %s: %d layers, r_max=%d, scale=%g, ranks=%s", self.fl.name, len(self.fl.layers),
                 self.fl.r_max, self.fl.scale, self.cfg.clients.ranks)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = self.start_round + server_round
        if self.stop_after_round is not None and rnd > self.stop_after_round:
            raise StopRun(f"stopped before round {rnd} (stop_after_round)")
        self.ledger = RoundLedger(rnd)
        c = self.cfg.clients
        need = c.min_nodes or c.num
        if server_round == 1:  # the run's start waits for its nodes (Flower's wait)
            have = len(list(grid.get_node_ids()))
            if have < need:  # Flower's wait only says "N connected (minimum required: M)"
                log.warning("round %d waits for %d nodes (run config min-nodes, else clients.num = %d); "
                            "%d connected: start more SuperNodes, or run with -c min-nodes=%d", rnd, need,
                            c.num, have, max(have, 1))
            _, all_nodes = sample_nodes(grid, need, 0)
        else:  # a node that died must not stall the run: wait round_timeout (once), then go on
            want = min(need, self.connected)
            all_nodes = wait_for_nodes(grid, want, c.round_timeout)
            if len(all_nodes) < want:
                log.warning("round %d: %d of %d nodes connected after round_timeout (%gs): going on "
                            "with them", rnd, len(all_nodes), need, c.round_timeout)
        self.connected = len(all_nodes)  # later rounds wait round_timeout only for nodes lost since
        self.discover(grid, sorted(all_nodes))
        self.warn_failures()
        by_client = self.roster.by_client(list(all_nodes))
        k = max(1, math.ceil(c.fraction_train * len(by_client)))
        rng = random.Random(self.cfg.seed * 1_000_003 + rnd)
        chosen = sorted(rng.sample(sorted(by_client), min(k, len(by_client))),
                        key=lambda cid: int(cid.split("-")[1]))
        msgs = []
        for cid in chosen:
            nid = by_client[cid]
            rank = self.roster.nodes[nid].rank
            from_v = self.roster.sync_point(cid, rank)
            p = self.fl.payload(cid, rank, from_v)
            rd = flower_io.payload_to_record(p, self.spec, rnd, from_v)
            if cid in self.roster.privacy:
                rd[flower_io.PRIVACY] = flower_io.privacy_to_record(self.roster.privacy[cid])
            msg = Message(rd, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(rnd))
            self.ledger.expect(Pending(cid, nid, p.rank, p.base_version, flower_io.wire_bytes(msg),
                                       p.bytes_down))
            msgs.append(msg)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        led = self.ledger
        updates = []
        for m in replies:
            nid = m.metadata.src_node_id
            pend = led.reply(nid, flower_io.wire_bytes(m))
            if pend is None:
                continue
            cid = pend.client_id
            if m.has_error():
                led.fail("train", m.error.reason, nid, cid)
                self.roster.lost(cid)
                continue
            try:  # a reply is untrusted: whatever it holds, the round goes on with the others
                u = flower_io.record_to_update(m.content)
                reason = (f"reply claims client id {u.client_id!r}" if u.client_id != cid
                          else self.roster.examples_reason(nid, u.num_examples))
                ps = flower_io.record_privacy(m.content)
                if not self.spec.privacy.get("enabled"):
                    ps = None  # no DP in this run: an accountant history means nothing, keep none
                if ps is not None:  # the accountant history must parse, or the reply is refused
                    ps = PrivacyState.from_dict(ps, max_entries=led.round).to_dict()
            except Exception as e:  # noqa: BLE001
                u, ps, reason = None, None, f"undecodable reply: {type(e).__name__}: {e}"
            if reason:
                led.fail("decode", reason, nid, cid)
                self.roster.lost(cid)
                continue
            self.roster.trained(cid, pend.version)
            if ps is not None:
                self.roster.privacy[cid] = ps
            led.trained(cid, u, ps)
            updates.append(u)
        for pend in led.unanswered():
            self.roster.lost(pend.client_id)
        self.warn_failures()
        # reduce in client order, not arrival order: float sums then repeat bit for bit
        updates.sort(key=lambda u: (len(u.client_id), u.client_id))
        report = self.fl.aggregate(updates)
        for cid, reason in report.rejected.items():  # the strategy's refusals (a norm bound ...)
            self.warn_once((cid, "rejected"), "round %d: %s's update was rejected: %s (said once per "
                           "client; every rejection is in metrics.jsonl)", led.round, cid, reason)
        rows = led.record(report)
        evaluation = self.evaluator.round_metrics(self.fl, led.round, self.cfg.rounds, rows)
        out = led.close(self.fl.name, report, evaluation)
        self.rows.append(out)
        self.log.append(out)
        self.trackers.round(out)
        save_checkpoint(checkpoint_path(self.run_dir, led.round), strategy=self.fl.name, round=led.round,
                        state={"strategy": self.fl.state_dict(), "roster": self.roster.state()},
                        scale=self.fl.scale, r_max=self.fl.r_max, ranks=dict(self.roster.ranks),
                        base_version=self.fl.version, config=self.cfg.to_dict(), rng_state=rng_snapshot())
        num = {k: float(v) for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return None, MetricRecord(num)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # evaluation rides in the train round (server split / personalised metrics)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    # ---- end of run ------------------------------------------------------------------------------
    def finish(self) -> dict:
        out: dict = {}
        if self.fl.has_global_model:
            lcfg, _ = rundata.lora_config(self.spec, self.model, self.fl.r_max)
            out["adapter"] = export_global(self.run_dir, self.fl, lcfg.targets, self.cfg.model.name,
                                           len(self.rows), spec=self.spec)
        from flwr import __version__ as flwr_version

        summary = summarize(self.rows, {"name": self.cfg.name, "run_dir": str(self.run_dir),
                                        "ranks": self.roster.ranks, **out,
                                        "versions": {"fedlora": library_version(), "torch": torch.__version__,
                                                     "flwr": flwr_version}})
        write_summary(self.run_dir, summary)
        self.trackers.close(summary)
        return summary


def wait_for_nodes(grid: Grid, need: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The connected nodes once ``need`` are, or after ``timeout`` seconds as long as one is (with
    none connected it waits on, as a run's start does)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= need or (nodes and time.monotonic() >= deadline):
            return nodes
        time.sleep(poll)


def run_server(grid: Grid, run_config: Mapping, stop_after_round: int | None = None) -> dict:
    """Everything the ServerApp does (tests call it with a ``LoopbackGrid``)."""
    cfg = resolve_config(run_config)
    run_dir = cfg.resolved_run_dir()
    resume = bool(run_config.get("resume", False))
    if not resume:  # a fresh run: an older run's checkpoints in the folder go, the resolved run is written
        prepare_run_dir(cfg)
    strategy = FedLoraStrategy(cfg, run_dir, resume=resume, stop_after_round=stop_after_round)
    if resume:  # (only once its checkpoint was found to fit this run)
        write_run_config(cfg)  # the resolved run beside its results: `fedlora export` and `report` read it
    left = cfg.rounds - strategy.start_round
    if left > 0 and strategy.fl.has_global_model:
        strategy.evaluator.loader()  # the server's held-out data: a problem with it ends the run now
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
