"""fedlora's Flower ClientApp: apply the payload, train locally, reply with the update + metrics.

Node config (``flower-supernode --node-config``; in simulation Flower sets the partition keys):

- ``partition-id`` / ``num-partitions``: which share of the run's data set this node trains on
  (demos, tests, simulation), and the client id (``client-<partition-id>``) the server knows it by;
- ``data-path``: a real deployment: the node's own rows (a CSV/TSV/JSON(L)/Parquet file on the node,
  in the run's columns / row format), all of them this client's; without it, the partition above;
- ``rank``: its LoRA rank (default ``clients.ranks[partition-id % len(ranks)]`` from the run);
- ``device``: ``auto`` / ``cpu`` / ``cuda:N`` (default: the run's ``clients.device``);
- ``cache-dir``: deployment: the node keeps ``W0`` (memory-mapped) and its base delta / client
  state in ``fedlora.node_cache.NodeCache(cache-dir)``, because a deployed ClientApp process serves
  one message and exits. Without it (simulation) the state lives in ``context.state``;
- ``fail-at-round``: fault injection for tests (the client raises in that round).

Everything about the run (model, LoRA, data settings, class names, training, seed) comes inside
the message (the ``fedlora.run`` record); with ``data-path`` a client reads no file of the server's
(without it, the shared data set is read at its configured path, as in a simulation).

The model is built once per process and cached (keyed by the model spec); virtual clients served by
the same process share it and its frozen ``W0`` read-only. Before a payload is applied the cached
model is put back into THIS client's state: its base delta ``D`` per adapted layer, its adapter
factors (Fed-SB's frozen B/A, FedSA's personal B), its head — or the pretrained ones for a new
client — so nothing leaks from one client to the next. The payload's base deltas start at
``from_version``: 0 means "from W0" (the client drops its D first); any other value must equal the
version the client holds, else the client refuses and the server re-syncs it from 0 next time.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import flower_io, rundata
from fedlora.client import RankSelfPruning, apply_payload, head_state, make_update
from fedlora.config import ClientSpec
from fedlora.lora import adapter_state, lora_layers
from fedlora.node_cache import NodeCache, base_deltas, process_age_s
from fedlora.train import OptimConfig, evaluate, release_memory, resolve_device, train_local
from fedlora.version import library_version, rng_fingerprint

app = ClientApp()

STATE_ARRAYS, STATE_META, STATE_PRIVACY = "fedlora.client", "fedlora.client.meta", "fedlora.privacy"


@dataclass
class ModelEntry:
    model: nn.Module
    head_names: list[str]
    head0: dict[str, torch.Tensor]  # the pretrained head, for clients with no head of their own
    model_key: str


@dataclass
class ClientState:
    version: int = 0
    rank: int = 0
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)


_MODELS: dict[str, ModelEntry] = {}


def _model_key(spec: ClientSpec, dtype: torch.dtype = torch.float32) -> str:
    name = spec.model.name.replace("hf:", "hf-").replace("/", "_")
    digest = hashlib.sha256(spec.key("model", "data").encode()).hexdigest()[:10]
    return f"{name}-seed{spec.seed}-{digest}" + ("" if dtype == torch.float32 else f"-{str(dtype)[6:]}")


def get_model_entry(spec: ClientSpec, cache_dir: str | None = None,
                    device: str = "cpu") -> tuple[ModelEntry, float]:
    """The process's cached model for this spec (built or loaded once, its frozen base in
    ``rundata.base_dtype`` for ``device``); ``(entry, load seconds)``."""
    dtype = rundata.base_dtype(spec, device)
    key = spec.key("model", "lora", "seed", "adapter", "scale", "data") + f"|{cache_dir}|{dtype}"
    if key in _MODELS:
        return _MODELS[key], 0.0
    t0 = time.perf_counter()
    mkey = _model_key(spec, dtype)
    if cache_dir and not spec.model.quantize:  # (bitsandbytes' packed weights: loaded as they are)
        base = NodeCache(cache_dir).load_model(mkey, lambda: rundata.build_base(spec, dtype=dtype))
    else:
        base = rundata.build_base(spec, dtype=dtype, device=device)
    _, head_names = rundata.inject(spec, base, max(1, spec.r_max))
    entry = ModelEntry(base, head_names, head_state(base, head_names), mkey)
    _MODELS.clear()  # one model per process: a new run spec replaces the old one
    _MODELS[key] = entry
    return entry, time.perf_counter() - t0


# ---- per-client state ---------------------------------------------------------------------------

def state_tensors(st: ClientState) -> dict[str, torch.Tensor]:
    out = {f"D::{n}": d for n, d in st.deltas.items()}
    out |= {f"F::{n}::{k}": t for n, f in st.factors.items() for k, t in f.items()}
    out |= {f"H::{k}": t for k, t in st.head.items()}
    return out


def state_from_tensors(tensors: dict[str, torch.Tensor], version: int, rank: int) -> ClientState:
    st = ClientState(version, rank)
    for key, t in tensors.items():
        kind, _, rest = key.partition("::")
        if kind == "D":
            st.deltas[rest] = t
        elif kind == "F":
            n, _, k = rest.rpartition("::")
            st.factors.setdefault(n, {})[k] = t
        elif kind == "H":
            st.head[rest] = t
    return st


def load_state(context: Context, entry: ModelEntry) -> ClientState | None:
    cache_dir = context.node_config.get("cache-dir")
    if cache_dir:
        cache = NodeCache(str(cache_dir))
        hit = cache.load_base(entry.model_key)
        if hit is None:
            return None
        version, deltas = hit
        other = cache.load_state(entry.model_key, "client")
        st = ClientState(version, 0, dict(deltas))
        if other is not None and int(other[1].get("version", -1)) == version:
            extra = state_from_tensors(other[0], version, int(other[1].get("rank", 0)))
            st.factors, st.head, st.rank = extra.factors, extra.head, extra.rank
        return st
    if STATE_META not in context.state.config_records:
        return None
    meta = context.state.config_records[STATE_META]
    tensors = flower_io.record_to_tensors(context.state.array_records[STATE_ARRAYS])
    return state_from_tensors(tensors, int(meta["version"]), int(meta["rank"]))


def save_state(context: Context, entry: ModelEntry, st: ClientState) -> None:
    cache_dir = context.node_config.get("cache-dir")
    if cache_dir:
        cache = NodeCache(str(cache_dir))
        cache.save_base(entry.model_key, st.version, st.deltas)
        rest = ClientState(st.version, st.rank, {}, st.factors, st.head)
        cache.save_state(entry.model_key, "client", state_tensors(rest),
                         {"version": str(st.version), "rank": str(st.rank)})
        return
    context.state[STATE_ARRAYS] = flower_io.tensors_to_record(state_tensors(st))
    context.state[STATE_META] = ConfigRecord({"version": st.version, "rank": st.rank})


def restore(entry: ModelEntry, st: ClientState | None, rank: int, seed: int) -> None:
    """Put this client's D, adapter and head into the shared model (pretrained ones if new)."""
    model = entry.model
    with torch.no_grad():
        for i, (n, layer) in enumerate(lora_layers(model).items()):
            layer.set_base_delta_(st.deltas.get(n) if st else None)
            layer.reset_(rank, seed + i)
            f = st.factors.get(n) if st and st.rank == rank else None
            if f:
                layer.set_factors_(f.get("A"), f.get("B"), f.get("R"))
                if "A_tail" in f and "B_tail" in f:
                    layer.sb_tail = (f["B_tail"], f["A_tail"])
        head = st.head if st and st.head else entry.head0
        for pname, t in head.items():
            model.get_parameter(pname).copy_(t)


# ---- helpers ------------------------------------------------------------------------------------

def _node(context: Context, spec: ClientSpec) -> tuple[int, int, int, str]:
    nc = context.node_config
    pid = int(nc.get("partition-id", 0))
    nparts = int(nc.get("num-partitions", max(pid + 1, 1)))
    ranks = spec.ranks or [spec.r_max]
    rank = int(nc.get("rank", ranks[pid % len(ranks)]))
    device = str(nc.get("device", spec.device))
    return pid, nparts, rank, device


def _data(context: Context, spec: ClientSpec, pid: int, nparts: int):
    """This client's ``(train, val)``: the node's own file (node config ``data-path``), else its
    partition of the run's data set."""
    return rundata.client_data(spec, pid, nparts, str(context.node_config.get("data-path", "") or ""))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _trace(event: str, context: Context, rnd: int) -> None:
    """Benchmarks only (``benchmarks/startup.py``): with ``$FEDLORA_TRACE_DIR`` set, append
    ``event unix-time pid partition round`` to ``$FEDLORA_TRACE_DIR/trace-<pid>``."""
    d = os.environ.get("FEDLORA_TRACE_DIR")
    if d:
        with open(os.path.join(d, f"trace-{os.getpid()}"), "a") as f:
            f.write(f"{event} {time.time():.6f} {os.getpid()} {context.node_config.get('partition-id', 0)} "
                    f"{rnd}\n")


# ---- handlers -----------------------------------------------------------------------------------

@app.query()
def query(msg: Message, context: Context) -> Message:
    """Capabilities: rank, device, partition, num_examples, this node's fedlora release and code
    fingerprint, and its torch's random-number fingerprint (the server asks once per node)."""
    spec, _, _ = flower_io.payload_context(msg.content)
    pid, nparts, rank, device = _node(context, spec)
    train, _ = _data(context, spec, pid, nparts)
    caps = MetricRecord({"rank": rank, "partition-id": pid, "num-partitions": nparts,
                         "num-examples": len(train),
                         "cuda": int(resolve_device(device).type == "cuda")})
    return Message(RecordDict({"caps": caps, "caps.config": ConfigRecord(
        {"device": device, "fedlora-version": library_version(), "rng": rng_fingerprint(),
         "torch-version": torch.__version__})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    age = process_age_s()
    t_enter = time.perf_counter()
    spec, rnd, from_version = flower_io.payload_context(msg.content)
    _trace("train-recv", context, rnd)
    payload = flower_io.record_to_payload(msg.content)
    pid, nparts, rank, device_name = _node(context, spec)
    if int(context.node_config.get("fail-at-round", -1)) == rnd:
        raise RuntimeError(f"fault injection: client {pid} fails in round {rnd} (node config fail-at-round)")
    if payload.rank > rank:  # (below it: a rule that prunes ranks sends less than the node has)
        raise ValueError(f"payload is for rank {payload.rank} but this node has rank {rank}")
    device = resolve_device(device_name)
    entry, load_s = get_model_entry(spec, context.node_config.get("cache-dir"), str(device))
    t_apply = time.perf_counter()
    st = load_state(context, entry)
    held = st.version if st else 0
    if from_version == 0:
        if st:
            st.deltas = {}
    elif from_version != held:
        raise ValueError(f"base version mismatch: this client holds version {held} but the payload's "
                         f"deltas start at version {from_version}; the server re-syncs it from 0")
    restore(entry, st, rank, spec.seed)
    model = entry.model
    apply_payload(model, payload)
    apply_s = time.perf_counter() - t_apply

    train_ds, val_ds = _data(context, spec, pid, nparts)
    tr = spec.train
    optim = OptimConfig(tr.optimizer, tr.lr, tr.weight_decay, tr.momentum)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metrics: dict[str, float | int] = {}
    pstate = None
    pruning = RankSelfPruning.from_payload(model, payload)
    before_step = pruning.before_step if pruning else None
    if spec.privacy.get("enabled"):
        res, pmetrics, pstate = _train_private(context, spec, model, train_ds, optim, device, pid,
                                               flower_io.record_privacy(msg.content), before_step)
        metrics |= pmetrics
    else:
        # every random draw of this client's round (dropout, shuffles) from (seed, client, round),
        # whichever process and whatever ran there before: runs repeat bit for bit
        torch.manual_seed((spec.seed * 1_000_003 + pid) * 10_007 + rnd)
        loader = rundata.loader(spec, train_ds, tr.batch_size, True, spec.seed + rnd - 1)
        res = train_local(model, loader, steps=tr.local_steps, optim=optim, device=device,
                          grad_accum=tr.grad_accum, before_step=before_step)
    if pruning is not None:
        metrics["upload-rank"] = pruning.finish()
    metrics |= {"loss": res.loss, "train-time-s": res.seconds, "steps": res.steps,
                "peak-memory-bytes": peak_memory_bytes(device), "rank": rank, "partition-id": pid,
                "overhead-process-s": age, "overhead-load-s": load_s, "overhead-apply-s": apply_s,
                "base-version": payload.base_version}
    if rundata.is_causal(spec):  # what its rows lost before training
        metrics |= {"data-skipped": sum(train_ds.skipped.values()), "data-truncated": train_ds.truncated}
    if payload.personal_eval and val_ds is not None and len(val_ds):  # on the training device
        ev = evaluate(model, rundata.loader(spec, val_ds, spec.eval.batch_size, False, 0), device=device)
        metrics |= {"eval-accuracy": ev.accuracy, "eval-loss": ev.loss, "eval-examples": ev.num_examples}
    if not spec.model.quantize:
        model.to("cpu")  # free the GPU between messages; a quantized base stays where bitsandbytes put it
    update = make_update(model, payload, len(train_ds), head_names=entry.head_names)
    save_state(context, entry, ClientState(payload.base_version, rank, base_deltas(model),
                                           adapter_state(model), head_state(model, entry.head_names)))
    release_memory()
    metrics["client-time-s"] = time.perf_counter() - t_enter
    reply = flower_io.update_to_record(update, metrics)
    if pstate is not None:
        reply[flower_io.PRIVACY] = flower_io.privacy_to_record(pstate)
    _trace("train-done", context, rnd)
    return Message(reply, reply_to=msg)


def _train_private(context: Context, spec: ClientSpec, model: nn.Module, train_ds, optim: OptimConfig,
                   device: torch.device, pid: int, server_copy: dict | None, before_step=None):
    """DP-SGD through fedlora.privacy, one accountant per client for the whole run.

    Its history must outlive the node process and a run restart: it is kept in context.state, in
    the node cache (a restarted SuperNode loses context.state) and, as public metadata (σ, q,
    steps), at the server, which sends its copy back (a resumed run has fresh contexts). The copy
    with the largest ε wins, so a lost copy can never make ε go back.
    """
    from fedlora.privacy import PrivacyConfig, PrivacyState, epsilon, train_private

    cfg = PrivacyConfig.from_dict(spec.privacy)
    cfg.validate(len(train_ds))
    delta = cfg.resolved_delta(len(train_ds))
    cache_dir = context.node_config.get("cache-dir")
    cache = NodeCache(str(cache_dir)) if cache_dir else None
    record_name = f"privacy-{spec.run_uid or 'run'}-partition{pid}"
    rec = context.state.config_records.get(STATE_PRIVACY)
    candidates = [PrivacyState.from_dict(dict(rec) if rec is not None else None),
                  PrivacyState.from_dict(server_copy)]
    if cache is not None:
        candidates.append(PrivacyState.from_dict(cache.load_record(record_name)))
    state = max(candidates, key=lambda s: (epsilon(s.history, delta, cfg.accountant), s.total_steps))
    tr = spec.train
    res = train_private(model, train_ds, cfg=cfg, state=state, batch_size=tr.batch_size,
                        steps=tr.local_steps, planned_total_steps=spec.rounds * tr.local_steps,
                        optim=optim, device=device, collate_fn=rundata.collate_fn(spec, train_ds), seed=None,
                        before_step=before_step)
    saved = res.state.to_dict()
    context.state[STATE_PRIVACY] = ConfigRecord(saved)
    if cache is not None:
        cache.save_record(record_name, saved)
    return res.train, res.metrics(), saved
