"""The one bridge between fedlora payloads/updates and Flower records.

Message layout (a ``RecordDict``):

- payload (server → client, TRAIN): ``"fedlora.factors"`` ArrayRecord ``{layer}::{A|B|R}``;
  ``"fedlora.deltas"`` ArrayRecord ``{i}::{layer}::{D|U|V|M}`` (``i`` = position in
  ``base_deltas``; ``D`` dense, ``U``/``V`` factored ``U @ V``, ``M`` a Fed-SB tail core);
  ``"fedlora.frozen"`` ArrayRecord (Fed-SB's tail factors, once); ``"fedlora.head"`` ArrayRecord
  (when the payload carries a head); ``"fedlora.payload"`` ConfigRecord (client id, rank, versions,
  reset flags, seed, meta as JSON, ``from_version``: the base version the deltas start from, what
  to train and upload, the rank self-pruning fields ``prune_to`` and ``tail_penalty``);
  ``"fedlora.run"`` ConfigRecord (``spec``: the run's client spec as JSON, ``round``).
- update (client → server, TRAIN reply): ``"fedlora.update"`` ArrayRecord ``{layer}::{key}`` and
  ``head::{param}``; ``"fedlora.update.meta"`` ConfigRecord (client id, rank, base version);
  ``"metrics"`` MetricRecord (``num-examples`` plus numbers such as loss and train time).

Bytes are counted from what is actually serialised. ``wire_bytes(message)``: what Flower moves for a
message — every object of its tree (the message, its records, each array's header and its 5 MiB
chunks) as Flower deflates it for the push, identical objects once, as Flower sends them once.
``record_bytes``: only the arrays' serialised data (``len(Array.data)``, tensors plus npy headers).
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.config import ClientSpec
from fedlora.strategies import BaseDelta, ClientPayload, ClientUpdate
from fedlora.strategies.deltas import from_tensors

SEP = "::"
FACTORS, DELTAS, HEAD, PAYLOAD, RUN = ("fedlora.factors", "fedlora.deltas", "fedlora.head",
                                       "fedlora.payload", "fedlora.run")
UPDATE, UPDATE_META, METRICS = "fedlora.update", "fedlora.update.meta", "metrics"
#: a DP client's accountant history (``PrivacyState.to_dict()``): in its reply, and the server's copy
#: of it in the next payload (a client resumed without its own state starts from that, never from 0)
PRIVACY = "fedlora.privacy"


def _arr(t: torch.Tensor) -> Array:
    return Array(t.detach().cpu().contiguous().numpy())


def _tensor(a: Array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.numpy()))


def _npy_view(a: Array) -> np.ndarray | None:
    """A zero-copy view of a C-ordered numeric ``.npy`` Array's data, ``None`` for anything else."""
    if a.stype != "numpy.ndarray":
        return None
    bio = io.BytesIO(a.data)
    try:
        version = np.lib.format.read_magic(bio)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(bio)
        if fortran or dtype.hasobject:
            return None
        return np.frombuffer(a.data, dtype=dtype, count=math.prod(shape),
                             offset=bio.tell()).reshape(shape)
    except ValueError:
        return None


def _tensors_flat(arrays: list[Array]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Arrays decoded as consecutive views of one flat tensor (one copy each, as ``np.load``
    makes), so a strategy can sum a whole update in one pass: ``(views, flat)``; separate tensors
    and ``None`` when their dtypes differ or one is not a plain ``.npy``."""
    views = [_npy_view(a) for a in arrays]
    if not views or any(v is None for v in views) or len({v.dtype for v in views}) != 1:
        return [_tensor(a) for a in arrays], None
    flat = np.empty(sum(v.size for v in views), dtype=views[0].dtype)
    out, off = [], 0
    base = torch.from_numpy(flat)
    for v in views:
        flat[off:off + v.size] = v.reshape(-1)
        out.append(base[off:off + v.size].view(v.shape))
        off += v.size
    return out, base


def _record(items: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, _arr(v)) for k, v in items.items()))


def record_bytes(rd: RecordDict) -> int:
    """Serialised array bytes in a RecordDict (every ``Array.data`` of every ArrayRecord)."""
    return sum(len(a.data) for rec in rd.array_records.values() for a in rec.values())


def wire_bytes(obj) -> int:
    """Bytes Flower pushes for a Message or RecordDict (see the module docstring)."""
    seen: set[str] = set()
    stack, total = [obj], 0
    while stack:
        o = stack.pop()
        oid = o.object_id
        if oid in seen:
            continue
        seen.add(oid)
        total += len(o.deflate())
        stack.extend((o.children or {}).values())
    return total


def _split(key: str, n: int, what: str) -> list[str]:
    parts = key.split(SEP)
    if len(parts) != n:
        raise ValueError(f"malformed {what} key {key!r} (expected {n} parts joined by {SEP!r})")
    return parts


# ---- payloads -----------------------------------------------------------------------------------

def payload_to_record(p: ClientPayload, spec: ClientSpec | None = None, round: int = 0,
                      from_version: int = 0) -> RecordDict:
    """A payload (+ the run spec for the client) as a RecordDict; see the module docstring."""
    factors = {f"{layer}{SEP}{k}": t for layer, f in p.factors.items() for k, t in f.items()}
    deltas: dict[str, torch.Tensor] = {}
    for i, bd in enumerate(p.base_deltas):
        for layer, d in bd.layers.items():
            for k, t in d.tensors().items():
                deltas[f"{i}{SEP}{layer}{SEP}{k}"] = t
    rd = RecordDict({FACTORS: _record(factors), DELTAS: _record(deltas)})
    if p.head is not None:
        rd[HEAD] = _record(p.head)
    if p.frozen:
        rd["fedlora.frozen"] = _record({f"{layer}{SEP}{k}": t for layer, f in p.frozen.items()
                                        for k, t in f.items()})
    rd[PAYLOAD] = ConfigRecord({
        "client_id": p.client_id, "rank": int(p.rank), "base_version": int(p.base_version),
        "reset": bool(p.reset), "seed": -1 if p.seed is None else int(p.seed),
        "delta_versions": [int(bd.version) for bd in p.base_deltas] or [0],
        "delta_resets": [bool(bd.reset) for bd in p.base_deltas] or [False],
        "num_deltas": len(p.base_deltas), "meta": json.dumps(p.meta, default=str),
        "bytes_down": int(p.bytes_down), "from_version": int(from_version),
        "trains": list(p.trains), "uploads": list(p.uploads), "upload_head": bool(p.upload_head),
        "personal_eval": bool(p.personal_eval), "prune_to": int(p.prune_to),
        "tail_penalty": float(p.tail_penalty)})
    rd[RUN] = run_record(spec, round)
    return rd


def _nested(rec: ArrayRecord) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, a in rec.items():
        layer, k = _split(key, 2, "factor")
        out.setdefault(layer, {})[k] = _tensor(a)
    return out


def record_to_payload(rd: RecordDict) -> ClientPayload:
    if PAYLOAD not in rd.config_records or FACTORS not in rd.array_records:
        raise ValueError("message carries no fedlora payload (records 'fedlora.payload' and "
                         "'fedlora.factors' are missing)")
    c = rd.config_records[PAYLOAD]
    n = int(c["num_deltas"])
    versions, resets = list(c["delta_versions"]), list(c["delta_resets"])
    per: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(n)]
    for key, a in (rd.array_records.get(DELTAS) or {}).items():
        i, layer, k = _split(key, 3, "delta")
        per[int(i)].setdefault(layer, {})[k] = _tensor(a)
    deltas = []
    for i in range(n):
        layers = {layer: from_tensors(d) for layer, d in per[i].items()}
        deltas.append(BaseDelta(int(versions[i]), layers, bool(resets[i])))
    head = None
    if HEAD in rd.array_records:
        head = {k: _tensor(a) for k, a in rd.array_records[HEAD].items()}
    frozen = _nested(rd.array_records["fedlora.frozen"]) if "fedlora.frozen" in rd.array_records else None
    seed = int(c["seed"])
    return ClientPayload(str(c["client_id"]), int(c["rank"]), _nested(rd.array_records[FACTORS]), deltas,
                         int(c["base_version"]), bool(c["reset"]), None if seed < 0 else seed, head,
                         frozen, json.loads(str(c["meta"])), int(c["bytes_down"]),
                         tuple(str(k) for k in c["trains"]), tuple(str(k) for k in c["uploads"]),
                         bool(c["upload_head"]), bool(c["personal_eval"]),
                         int(c.get("prune_to", 0)), float(c.get("tail_penalty", 0.0)))


def run_record(spec: ClientSpec | None, round: int = 0) -> ConfigRecord:
    """The run's typed client spec (as JSON) and the round, sent with every message."""
    return ConfigRecord({"spec": spec.model_dump_json() if spec is not None else "", "round": int(round)})


def payload_context(rd: RecordDict) -> tuple[ClientSpec, int, int]:
    """``(spec, round, from_version)`` carried next to the payload."""
    run = rd.config_records.get(RUN)
    if run is None or not str(run["spec"]):
        raise ValueError("message carries no run spec (record 'fedlora.run'): send it with "
                         "flower_io.run_record(cfg.client_spec())")
    spec = ClientSpec.model_validate_json(str(run["spec"]))
    rnd = int(run["round"])
    from_version = int(rd.config_records[PAYLOAD]["from_version"]) if PAYLOAD in rd.config_records else 0
    return spec, rnd, from_version


# ---- updates ------------------------------------------------------------------------------------

def _metric_value(k: str, v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int | float):
        return v
    raise ValueError(f"metric {k!r} must be a number, got {v!r}")


def privacy_to_record(state: dict) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in state.items()})


def record_privacy(rd: RecordDict) -> dict | None:
    """The accountant history carried in a payload or a reply (``None`` when there is none)."""
    rec = rd.config_records.get(PRIVACY)
    return None if rec is None else {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()}


def update_to_record(u: ClientUpdate, metrics: dict | None = None) -> RecordDict:
    """An update as a RecordDict; ``metrics`` (numbers) go to the MetricRecord with ``num-examples``."""
    arrays = {f"{layer}{SEP}{k}": t for layer, f in u.factors.items() for k, t in f.items()}
    for k, t in (u.head or {}).items():
        arrays[f"head{SEP}{k}"] = t
    m = {k: _metric_value(k, v) for k, v in {**u.metrics, **(metrics or {})}.items()}
    m["num-examples"] = int(u.num_examples)
    return RecordDict({
        UPDATE: _record(arrays),
        UPDATE_META: ConfigRecord({"client_id": u.client_id, "rank": int(u.rank),
                                   "base_version": int(u.base_version)}),
        METRICS: MetricRecord(m)})


def exact_int(v, what: str) -> int:
    """``v`` as an int when it is one exactly (an int, not a bool); else ``ValueError`` — a wire
    value is never truncated (2.9 is not 2) and ``inf`` never reaches ``int()``."""
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise ValueError(f"{what} must be an integer, got {v!r}")
    return int(v)


def record_to_update(rd: RecordDict) -> ClientUpdate:
    if UPDATE not in rd.array_records or UPDATE_META not in rd.config_records:
        raise ValueError("reply carries no fedlora update (records 'fedlora.update' and "
                         "'fedlora.update.meta' are missing)")
    meta = rd.config_records[UPDATE_META]
    factors: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    keys = [(_split(key, 2, "update"), a) for key, a in rd.array_records[UPDATE].items()]
    for (_, k), a in [(fk, a) for fk, a in keys if fk[0] == "head"]:
        head[k] = _tensor(a)
    # canonical order whatever order the client sent: layers as they first appear, keys sorted
    # within a layer, so the flat buffer and the factors dict always agree on where each factor is
    factor_keys = [(fk, a) for fk, a in keys if fk[0] != "head"]
    first = {}
    for (layer, _), _a in factor_keys:
        first.setdefault(layer, len(first))
    factor_keys.sort(key=lambda item: (first[item[0][0]], item[0][1]))
    views, flat = _tensors_flat([a for _, a in factor_keys])
    for ((layer, k), _), t in zip(factor_keys, views):
        factors.setdefault(layer, {})[k] = t
    metrics = dict(rd.metric_records[METRICS]) if METRICS in rd.metric_records else {}
    n = exact_int(metrics.get("num-examples"), "metric num-examples")
    return ClientUpdate(str(meta["client_id"]), exact_int(meta["rank"], "rank"), n,
                        exact_int(meta["base_version"], "base_version"), factors, head or None, metrics, flat)


# ---- state records (client side: context.state) ---------------------------------------------------

def tensors_to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return _record(tensors)


def record_to_tensors(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: _tensor(a) for k, a in rec.items()}
