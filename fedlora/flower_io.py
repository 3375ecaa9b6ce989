"""The one bridge between fedlora payloads/updates and Flower records.

Message layout (a ``RecordDict``):

- payload (server → client, TRAIN): ``"fedlora.factors"`` ArrayRecord ``{layer}::{A|B|R}``;
  ``"fedlora.deltas"`` ArrayRecord ``{i}::{layer}::{D|U|V|M}`` (``i`` = position in
  ``base_deltas``; ``D`` dense, ``U``/``V`` factored ``U @ V``, ``M`` a Fed-SB tail core);
  ``"fedlora.frozen"`` ArrayRecord (Fed-SB's tail factors, once); ``"fedlora.a_seeds"``
  ConfigRecord ``{layer: seed}`` (A factors the client draws itself); ``"fedlora.head"`` ArrayRecord
  (when the payload carries a head); ``"fedlora.payload"`` ConfigRecord (client id, rank, versions,
  reset flags, seed, meta as JSON, ``from_version``: the base version the deltas start from, what
  to train and upload, the rank self-pruning fields ``prune_to`` and ``tail_penalty``);
  ``"fedlora.run"`` ConfigRecord (``spec``: the run's client spec as JSON, ``round``).
- update (client → server, TRAIN reply): ``"fedlora.update"`` ArrayRecord ``{layer}::{key}`` and
  ``head::{param}``; ``"fedlora.update.meta"`` ConfigRecord (client id, rank, base version);
  ``"metrics"`` MetricRecord (``num-examples`` plus numbers such as loss and train time).

Bytes: ``wire_bytes(message)`` is what Flower moves for a message — every object of its tree (the
message, its records, each array's header and its 5 MiB chunks) as Flower deflates it for the push,
identical objects once, as Flower sends them once. It is computed without serialising the message
a second time: the tensor data (the chunks) is never copied, deflated or hashed — a chunk's size is
its length plus its object header, identical chunks are found by comparing their bytes (what
Flower's content-addressed ids amount to); the arrays' and records' headers are sized from their
metadata, and only the small metadata-only objects (config and metric records, the message's own
metadata) are deflated. ``tests/test_flower_io.py`` checks it against Flower's own push.
``record_bytes``: only the arrays' serialised data (``len(Array.data)``, tensors plus npy headers).
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import message as _msg
from flwr.app.message.array import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as _CHUNK
from flwr.supercore.inflatable.inflatable_object import HEAD_BODY_DIVIDER as _HEAD_BODY_DIVIDER
from flwr.supercore.inflatable.inflatable_object import HEAD_VALUE_DIVIDER as _HEAD_VALUE_DIVIDER

from fedlora.config import ClientSpec
from fedlora.strategies import BaseDelta, ClientPayload, ClientUpdate
from fedlora.strategies.deltas import from_tensors
from fedlora.strategies.types import SEED_DTYPES

SEP = "::"
FACTORS, DELTAS, HEAD, PAYLOAD, RUN = ("fedlora.factors", "fedlora.deltas", "fedlora.head",
                                       "fedlora.payload", "fedlora.run")
UPDATE, UPDATE_META, METRICS = "fedlora.update", "fedlora.update.meta", "metrics"
#: ``{layer: seed}`` of the A factors the client draws itself (``ClientPayload.a_seeds``)
A_SEEDS = "fedlora.a_seeds"
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


#: an object id (sha256 hex digest) in a deflated object: its length is all the count needs
_ID_LEN = 64


def _deflated_len(kind: str, n_children: int, body_len: int) -> int:
    """Length of ``add_header_to_object_body``'s output: ``kind|id,id,…|body_len`` + divider + body."""
    ids = n_children * _ID_LEN + max(n_children - 1, 0)
    return (len(kind) + 2 * len(_HEAD_VALUE_DIVIDER) + ids + len(str(body_len)) + len(_HEAD_BODY_DIVIDER)
            + body_len)


def _json_refs_len(names) -> int:
    """Length of ``json.dumps({name: object_id, …})`` (an ArrayRecord's or a RecordDict's body)."""
    return len(json.dumps(dict.fromkeys(names, "0" * _ID_LEN)))


class _WireCount:
    """One message tree's objects, each identified by its content the way Flower's content ids
    identify it (an integer per distinct content), each distinct one sized once."""

    def __init__(self) -> None:
        self.total = 0
        self._ids: dict[tuple, int] = {}
        self._chunks: dict[tuple, list[tuple[memoryview, int]]] = {}

    def _new(self, key: tuple, size: int) -> int:
        oid = self._ids.get(key)
        if oid is None:
            oid = self._ids[key] = len(self._ids)
            self.total += size
        return oid

    def chunk(self, view: memoryview) -> int:
        n = len(view)
        bucket = self._chunks.setdefault((n, bytes(view[:32]), bytes(view[-32:])), [])
        for other, oid in bucket:
            if other == view:  # byte for byte (the same content has the same sha256 id)
                return oid
        oid = len(self._ids)
        self._ids[("chunk", oid)] = oid
        self.total += _deflated_len("ArrayChunk", 0, n)
        bucket.append((view, oid))
        return oid

    def array(self, a: Array) -> int:
        data = memoryview(a.data)
        order = [self.chunk(data[i:i + _CHUNK]) for i in range(0, len(data), _CHUNK)]
        unique = list(dict.fromkeys(order))
        body = json.dumps({"dtype": a.dtype, "shape": a.shape, "stype": a.stype,
                           "arraychunk_ids": [unique.index(c) for c in order]})
        return self._new(("Array", a.dtype, tuple(a.shape), a.stype, tuple(order)),
                         _deflated_len("Array", len(unique), len(body.encode())))

    def record(self, rec) -> int:
        if isinstance(rec, ArrayRecord):
            refs = tuple((name, self.array(a)) for name, a in rec.items())
            n_children = len({oid for _, oid in refs})
            return self._new(("ArrayRecord", refs),
                             _deflated_len("ArrayRecord", n_children, _json_refs_len(rec.keys())))
        content = rec.deflate()  # config/metric records: metadata only, no tensor data
        return self._new((type(rec).__name__, content), len(content))

    def recorddict(self, rd: RecordDict) -> int:
        refs = tuple((name, self.record(r)) for name, r in rd.items())
        n_children = len({oid for _, oid in refs})
        return self._new(("RecordDict", refs),
                         _deflated_len("RecordDict", n_children, _json_refs_len(rd.keys())))

    def message(self, msg: Message) -> int:
        children = 0
        if msg.has_content():
            self.recorddict(msg.content)
            children = 1
        md = _msg.metadata_to_proto(msg.metadata)
        md.message_id = ""
        body = _msg.ProtoMessage(metadata=md, content=None,
                                 error=_msg.error_to_proto(msg.error) if msg.has_error() else None
                                 ).SerializeToString(deterministic=True)
        self.total += _deflated_len("Message", children, len(body))
        return -1


def wire_bytes(obj: Message | RecordDict) -> int:
    """Bytes Flower pushes for a Message or RecordDict (see the module docstring)."""
    count = _WireCount()
    if isinstance(obj, Message):
        count.message(obj)
    else:
        count.recorddict(obj)
    return count.total


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
    if p.a_seeds:
        rd[A_SEEDS] = ConfigRecord({layer: int(seed) for layer, seed in p.a_seeds.items()})
    rd[PAYLOAD] = ConfigRecord({
        "client_id": p.client_id, "rank": int(p.rank), "base_version": int(p.base_version),
        "reset": bool(p.reset), "seed": -1 if p.seed is None else int(p.seed),
        "delta_versions": [int(bd.version) for bd in p.base_deltas] or [0],
        "delta_resets": [bool(bd.reset) for bd in p.base_deltas] or [False],
        "num_deltas": len(p.base_deltas), "meta": json.dumps(p.meta, default=str),
        "bytes_down": int(p.bytes_down), "from_version": int(from_version),
        "trains": list(p.trains), "uploads": list(p.uploads), "upload_head": bool(p.upload_head),
        "personal_eval": bool(p.personal_eval), "prune_to": int(p.prune_to),
        "tail_penalty": float(p.tail_penalty), "a_seed_dtype": p.a_seed_dtype})
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
    factors = _nested(rd.array_records[FACTORS])
    a_seeds = _seeds(rd.config_records.get(A_SEEDS) or {})
    for layer in a_seeds:  # a layer whose only factor is its seeded A travels as no array at all
        factors.setdefault(layer, {})
    a_seed_dtype = str(c.get("a_seed_dtype", "float32"))
    if a_seed_dtype not in SEED_DTYPES:
        raise ValueError(f"payload field 'a_seed_dtype' must be one of {sorted(SEED_DTYPES)}, "
                         f"got {a_seed_dtype!r}")
    return ClientPayload(str(c["client_id"]), int(c["rank"]), factors, deltas,
                         int(c["base_version"]), bool(c["reset"]), None if seed < 0 else seed, head,
                         frozen, json.loads(str(c["meta"])), int(c["bytes_down"]),
                         tuple(str(k) for k in c["trains"]), tuple(str(k) for k in c["uploads"]),
                         bool(c["upload_head"]), bool(c["personal_eval"]),
                         int(c.get("prune_to", 0)), float(c.get("tail_penalty", 0.0)), a_seeds,
                         a_seed_dtype)


def _seeds(rec) -> dict[str, int]:
    """``fedlora.a_seeds``: each value an integer seed in [0, 2⁶³)."""
    out = {}
    for layer, v in rec.items():
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
            raise ValueError(f"record {A_SEEDS!r}: the seed of layer {layer!r} must be an integer in "
                             f"[0, 2**63), got {v!r}")
        out[str(layer)] = v
    return out


def run_record(spec: ClientSpec | None, round: int = 0) -> ConfigRecord:
    """The run's typed client spec (as JSON) and the round, sent with every message."""
    return ConfigRecord({"spec": spec.model_dump_json() if spec is not None else "", "round": int(round)})


def payload_context(rd: RecordDict) -> tuple[ClientSpec, int, int]:
    """``(spec, round, from_version)`` carried next to the payload."""
    run = rd.config_records.get(RUN)
    if run is None or not str(run["spec"]):
        raise ValueError("message carries no run spec (record 'fedlora.run'): send it with "
                         "flower_io.run_record(cfg.client_spec())")
    try:
        spec = ClientSpec.model_validate_json(str(run["spec"]))
    except ValueError as e:  # most likely another fedlora on the server: say which one is here
        from fedlora.version import library_version

        raise ValueError(f"this node (fedlora {library_version()}) cannot read the server's run spec "
                         f"({str(e).splitlines()[0][:200]}): install the server's fedlora on the "
                         "node") from e
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
