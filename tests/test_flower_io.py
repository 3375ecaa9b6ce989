"""flower_io round trips (payload -> record -> payload, update -> record -> update) and byte counts.

Round trips compare tensor by tensor (type, dtype, shape, values) with the objects that went in.
Byte counts are checked against sources that do not go through flower_io: the length of the
``.npy`` bytes ``np.save`` writes for each tensor (what a Flower ``Array`` carries), and the bytes
Flower's own push routine hands to its transport for a Message.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch

from fedlora import flower_io
from fedlora.config import load_config
from fedlora.strategies import (
    BaseDelta,
    ClientPayload,
    ClientUpdate,
    Dense,
    LayerSpec,
    LowRank,
    SBCore,
    create_strategy,
)


def _eq(got, want, where="value"):
    """Same structure and types (a LowRank stays a LowRank); tensors equal in dtype, shape and
    every value. Dataclasses (BaseDelta, Dense, LowRank, SBCore) are compared field by field."""
    assert type(got) is type(want), (where, type(got), type(want))
    if dataclasses.is_dataclass(want):
        for f in dataclasses.fields(want):
            _eq(getattr(got, f.name), getattr(want, f.name), f"{where}.{f.name}")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype, (where, got.dtype, want.dtype)
        assert got.shape == want.shape, (where, got.shape, want.shape)
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), (where, sorted(got), sorted(want))
        for k in want:
            _eq(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (x, y) in enumerate(zip(got, want)):
            _eq(x, y, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


def _npy_len(t: torch.Tensor) -> int:
    """Bytes of the tensor as a ``.npy`` file, written by numpy itself."""
    buf = io.BytesIO()
    np.save(buf, t.detach().cpu().numpy(), allow_pickle=False)
    return len(buf.getvalue())


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples / dataclasses (deltas)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def _gen(seed: int):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return r


def _payload(seed: int | None = 7) -> ClientPayload:
    r = _gen(0)
    factors = {"l.q": {"A": r(2, 8), "B": r(6, 2)}, "l.v": {"A": r(2, 8), "B": r(6, 2), "R": r(2, 2)}}
    deltas = [
        BaseDelta(1, {"l.q": Dense(r(6, 8)), "l.v": LowRank(r(6, 1), r(1, 8))}, reset=True),
        BaseDelta(2, {"l.q": LowRank(r(6, 3), r(3, 8)), "l.v": SBCore(r(4, 4))}),
        BaseDelta(5, {"l.v": Dense(r(6, 8, dtype=torch.float32))}),  # a single layer, float32
    ]
    return ClientPayload("client-3", 2, factors, deltas, base_version=5, reset=True, seed=seed,
                         head={"head.weight": r(2, 4, dtype=torch.float32), "head.bias": r(2)},
                         frozen={"l.v": {"B_tail": r(6, 2), "A_tail": r(2, 8)}},
                         meta={"frozen_sent": True, "ranks": [2, 4], "note": "x"}, bytes_down=123,
                         trains=("R",), uploads=("R", "B"), upload_head=False, personal_eval=True)


def _assert_payload_equal(q: ClientPayload, p: ClientPayload) -> None:
    _eq(q, p, "payload")  # every field, the base deltas (kind by kind) included


def _spec(**kw):
    """The run's typed client spec (the smoke defaults, with overrides)."""
    return load_config(None).client_spec().model_copy(update=kw)


def test_payload_round_trip_all_delta_kinds_head_frozen():
    p = _payload()
    spec = _spec(strategy="fedsb", r_max=4, ranks=[2, 4])
    rd = flower_io.payload_to_record(p, spec, round=3, from_version=1)
    q = flower_io.record_to_payload(rd)
    _assert_payload_equal(q, p)
    assert flower_io.payload_context(rd) == (spec, 3, 1)
    # decoding does not consume the record: a second decode gives the same payload
    _assert_payload_equal(flower_io.record_to_payload(rd), p)


def test_payload_round_trip_minimal():
    """No deltas, no head, no frozen factors, no seed: all come back as absent, not as empties."""
    p = ClientPayload("c", 1, {"x": {"A": torch.randn(1, 3)}}, [], base_version=0)
    q = flower_io.record_to_payload(flower_io.payload_to_record(p))
    _assert_payload_equal(q, p)
    assert q.seed is None and q.head is None and q.frozen is None and q.base_deltas == []
    with pytest.raises(ValueError, match="no run spec"):  # a payload sent without the run spec
        flower_io.payload_context(flower_io.payload_to_record(p))
    rd = flower_io.payload_to_record(p, _spec(), round=1)
    newer = json.loads(str(rd.config_records[flower_io.RUN]["spec"])) | {"a_field_of_a_newer_fedlora": 1}
    rd.config_records[flower_io.RUN]["spec"] = json.dumps(newer)
    with pytest.raises(ValueError, match=r"this node \(fedlora .*\) cannot read the server's run spec .* "
                                         r"install the server's fedlora"):
        flower_io.payload_context(rd)


def test_payload_round_trip_survives_flower_serialisation():
    """Through Flower's own protobuf encoding of the RecordDict (what a gRPC hop does)."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    p = _payload(seed=None)
    spec = _spec()
    rd = flower_io.payload_to_record(p, spec, round=2, from_version=4)
    wire = recorddict_to_proto(rd).SerializeToString()
    proto = type(recorddict_to_proto(rd))()
    proto.ParseFromString(wire)
    back = recorddict_from_proto(proto)
    _assert_payload_equal(flower_io.record_to_payload(back), p)
    assert flower_io.payload_context(back) == (spec, 2, 4)


def test_record_to_payload_rejects_a_foreign_record():
    u = ClientUpdate("c", 1, 1, 0, {"x": {"A": torch.zeros(1, 2)}})
    with pytest.raises(ValueError, match="no fedlora payload"):
        flower_io.record_to_payload(flower_io.update_to_record(u))
    with pytest.raises(ValueError, match="no fedlora update"):
        flower_io.record_to_update(flower_io.payload_to_record(_payload()))


def test_record_bytes_is_the_npy_size_of_every_tensor():
    p = _payload()
    rd = flower_io.payload_to_record(p, _spec(run_uid="x" * 900), round=1)
    sent = _tensors(p.factors) + _tensors(p.base_deltas) + _tensors(p.head) + _tensors(p.frozen)
    assert len(sent) == 16
    assert flower_io.record_bytes(rd) == sum(_npy_len(t) for t in sent)
    # config records (here a spec with a 900-character field) are no array bytes
    assert flower_io.record_bytes(rd) == flower_io.record_bytes(flower_io.payload_to_record(p))
    # npy adds a header to each tensor's raw bytes
    assert flower_io.record_bytes(rd) > sum(t.numel() * t.element_size() for t in sent)


def test_real_strategy_payload_round_trip_and_bytes():
    s = create_strategy("fedsb", layers={"a": LayerSpec(6, 5), "b": LayerSpec(5, 4)}, r_max=4, scale=2.0)
    s.initialize({"a": torch.randn(6, 5), "b": torch.randn(5, 4)})
    p = s.payload("client-0", 2, 0)
    # below r_max a Fed-SB payload carries tail cores and the frozen tail factors
    assert p.frozen and any(isinstance(d, SBCore) for bd in p.base_deltas for d in bd.layers.values())
    rd = flower_io.payload_to_record(p)
    _assert_payload_equal(flower_io.record_to_payload(rd), p)
    sent = _tensors(p.factors) + _tensors(p.base_deltas) + _tensors(p.head) + _tensors(p.frozen)
    assert sent
    assert flower_io.record_bytes(rd) == sum(_npy_len(t) for t in sent)


def _update(dtypes=(torch.float32, torch.float32)) -> ClientUpdate:
    r = _gen(1)
    factors = {"x": {"A": r(4, 8, dtype=dtypes[0]), "B": r(5, 4, dtype=dtypes[1])},
               "y": {"R": r(3, 3, dtype=dtypes[0])}}
    return ClientUpdate("client-1", 4, 120, 3, factors,
                        head={"head.bias": r(2, dtype=torch.float32), "head.weight": r(2, 6)},
                        metrics={"loss": 0.5})


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64, torch.float32)],
                         ids=["one-dtype", "mixed-dtypes"])
def test_update_round_trip(dtypes):
    u = _update(dtypes)
    rd = flower_io.update_to_record(u, {"train-time-s": 1.5, "ok": True})
    v = flower_io.record_to_update(rd)
    assert (v.client_id, v.rank, v.num_examples, v.base_version) == ("client-1", 4, 120, 3)
    _eq(v.factors, u.factors, "factors")
    _eq(v.head, u.head, "head")
    assert v.metrics == {"loss": 0.5, "train-time-s": 1.5, "ok": 1, "num-examples": 120}
    # ``flat`` (all factors in one buffer, in the update's order) is what a strategy sums when it is
    # set, so it must hold exactly the values sent; one dtype decodes to it, mixed dtypes cannot
    sent_flat = [t.reshape(-1) for f in u.factors.values() for t in f.values()]
    if dtypes[0] == dtypes[1]:
        assert v.flat is not None
    if v.flat is not None:
        _eq(v.flat, torch.cat(sent_flat), "flat")
    # decoded factors are independent tensors: writing one leaves the others as sent
    v.factors["x"]["A"].add_(1.0)
    _eq(v.factors["x"]["B"], u.factors["x"]["B"])
    _eq(v.factors["y"]["R"], u.factors["y"]["R"])
    _eq(flower_io.record_to_update(rd).factors, u.factors, "second decode")
    sent = _tensors(u.factors) + _tensors(u.head)
    assert flower_io.record_bytes(rd) == sum(_npy_len(t) for t in sent)


def test_update_round_trip_without_head_and_from_views():
    """A non-contiguous factor (a transposed view) comes back with its values and shape."""
    base = torch.randn(8, 4)
    u = ClientUpdate("c", 4, 7, 0, {"x": {"A": base.T, "B": torch.randn(5, 4)[:, :4]}})
    v = flower_io.record_to_update(flower_io.update_to_record(u))
    assert v.head is None
    assert v.metrics == {"num-examples": 7}
    for k in ("A", "B"):
        assert v.factors["x"][k].shape == u.factors["x"][k].shape
        assert torch.equal(v.factors["x"][k], u.factors["x"][k].contiguous())
    with pytest.raises(ValueError, match="must be a number"):
        flower_io.update_to_record(u, {"note": "text"})


def test_tensors_record_round_trip():
    ts = {"w": torch.randn(3, 4, dtype=torch.float64), "n": torch.arange(5), "m": torch.tensor([True, False])}
    back = flower_io.record_to_tensors(flower_io.tensors_to_record(ts))
    _eq(back, ts)


def _flower_push_bytes(msg) -> int:
    """Bytes Flower's own push routine hands to the transport for this message (all objects)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import push_objects

    pushed: dict[str, int] = {}

    def push(object_id: str, content: bytes) -> None:
        pushed[object_id] = len(content)

    push_objects(get_all_nested_objects(msg), push, keep_objects=True)
    return sum(pushed.values())


def test_wire_bytes_is_what_flower_pushes():
    from flwr.app import Message, MessageType, RecordDict

    # tests build Messages outside a Flower run: fedlora.loopback sets the task identity for that
    from fedlora.loopback import ensure_task_identity

    ensure_task_identity()
    s = create_strategy("fedex", layers={"a": LayerSpec(64, 48)}, r_max=4, scale=2.0)
    rd = flower_io.payload_to_record(s.payload("client-0", 2, 0), _spec(run_uid="x" * 900))
    msg = Message(rd, dst_node_id=7, message_type=MessageType.TRAIN)
    assert flower_io.wire_bytes(msg) == _flower_push_bytes(msg)
    # more than the arrays alone: the config records (here a 900-character spec field) travel too
    assert flower_io.wire_bytes(rd) > flower_io.record_bytes(rd) + 900

    # an array over Flower's chunk size travels as several chunks, each counted
    big = RecordDict({"t": flower_io.tensors_to_record({"x": torch.randn(1_600_000)})})  # ~6.4 MB
    big_msg = Message(big, dst_node_id=7, message_type=MessageType.TRAIN)
    assert flower_io.wire_bytes(big_msg) == _flower_push_bytes(big_msg)
    assert flower_io.wire_bytes(big_msg) > flower_io.record_bytes(big) == _npy_len(torch.zeros(1_600_000))

    # identical arrays are pushed once (content-addressed), so they are counted once: here the
    # same array sits in two different records (Flower's tree holds it under both parents)
    zeros = torch.zeros(1000)
    twice = RecordDict({"t1": flower_io.tensors_to_record({"x": zeros}),
                        "t2": flower_io.tensors_to_record({"y": zeros, "w": torch.ones(3)})})
    once = RecordDict({"t1": flower_io.tensors_to_record({"x": zeros}),
                       "t2": flower_io.tensors_to_record({"w": torch.ones(3)})})
    twice_msg = Message(twice, dst_node_id=7, message_type=MessageType.TRAIN)
    assert flower_io.wire_bytes(twice_msg) == _flower_push_bytes(twice_msg)
    assert flower_io.record_bytes(twice) > flower_io.record_bytes(once) + 4000
    assert flower_io.wire_bytes(twice) < flower_io.wire_bytes(once) + 1000


def _pushed_after_round_trip(msg):
    """The message as the receiving side holds it (Flower's deflate → inflate), like a pulled reply."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objs = get_all_nested_objects(msg)
    contents = {oid: o.deflate() for oid, o in objs.items()}
    return inflate_object_from_contents(msg.object_id, contents)


def test_wire_bytes_equals_flowers_serialised_size_and_never_serialises_tensor_data(monkeypatch):
    """The count is computed from sizes, not from a second serialisation, so it must be checked
    against what Flower really serialises: any drift (a header, a dedup rule, a chunk size) fails."""
    from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
    from flwr.app.message import array as flwr_array
    from flwr.app.message import arraychunk as flwr_chunk

    from fedlora.loopback import ensure_task_identity

    ensure_task_identity()
    rng = np.random.default_rng(0)
    chunk = flwr_array.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    cases = []
    # identical chunks inside one array and across arrays of other shapes (a zero array over 3 chunks;
    # its tail chunks carry no npy header, so they equal the other array's)
    zeros_a = torch.zeros(chunk // 4 * 3)
    zeros_b = torch.zeros(chunk // 4 * 2 + 10)
    cases.append(RecordDict({"z": flower_io.tensors_to_record({"a": zeros_a, "b": zeros_b})}))
    # many small records of every kind, some identical, some differing only in their names
    for trial in range(5):
        rd = RecordDict()
        for i in range(int(rng.integers(1, 6))):
            shape = tuple(int(s) for s in rng.integers(1, 9, size=int(rng.integers(1, 3))))
            ts = {f"t{j}": (torch.zeros(shape) if rng.random() < 0.3 else torch.randn(shape))
                  for j in range(int(rng.integers(0, 4)))}
            rd[f"arr{i}"] = flower_io.tensors_to_record(ts)
            if rng.random() < 0.5:
                rd[f"copy{i}"] = flower_io.tensors_to_record(ts)
        rd["cfg"] = ConfigRecord({"s": "é" * trial, "n": trial, "l": [1.5, 2.5], "b": b"\x00" * trial})
        rd["cfg2"] = ConfigRecord({"s": "é" * trial, "n": trial, "l": [1.5, 2.5], "b": b"\x00" * trial})
        rd["metrics"] = MetricRecord({"loss": float(trial), "num-examples": 3})
        cases.append(rd)
    spec = _spec(run_uid="y" * 50)
    s = create_strategy("fedex", layers={"a": LayerSpec(64, 48), "b": LayerSpec(48, 64)}, r_max=4, scale=2.0)
    cases.append(flower_io.payload_to_record(s.payload("client-3", 4, 0), spec, round=2))
    msgs = [Message(rd, dst_node_id=7, message_type=MessageType.TRAIN, group_id="2") for rd in cases]
    msgs.append(Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY))
    msgs.append(Message(Error(2, "ValueError: boom"), reply_to=msgs[0]))
    expected = [_flower_push_bytes(m) for m in msgs]
    received = [_pushed_after_round_trip(m) for m in msgs[:-1]]  # (an error reply: built here)
    expected_received = [_flower_push_bytes(m) for m in received]

    # the count never deflates (copies, hashes) an array or a chunk
    def refuse(self):
        raise AssertionError(f"wire_bytes serialised a {type(self).__name__}")

    monkeypatch.setattr(flwr_array.Array, "deflate", refuse)
    monkeypatch.setattr(flwr_chunk.ArrayChunk, "deflate", refuse)
    assert [flower_io.wire_bytes(m) for m in msgs] == expected
    assert [flower_io.wire_bytes(m) for m in received] == expected_received == expected[:-1]
