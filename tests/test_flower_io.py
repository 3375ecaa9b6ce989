"""flower_io round trips: payload -> record -> payload, update -> record -> update, bytes."""

from __future__ import annotations

import torch

from fedlora import flower_io
from fedlora.strategies import BaseDelta, ClientPayload, ClientUpdate, LayerSpec, create_strategy


def _eq(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _eq(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _eq(x, y)
    else:
        assert a == b


def test_payload_round_trip_dense_factored_head():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    factors = {"l.q": {"A": r(2, 8), "B": r(6, 2)}, "l.v": {"A": r(2, 8), "B": r(6, 2)}}
    p = ClientPayload("client-3", 2, factors,
                      [BaseDelta(1, {"l.q": r(6, 8), "l.v": (r(6, 1), r(1, 8))}, reset=True),
                       BaseDelta(2, {"l.q": (r(6, 1), r(1, 8)), "l.v": r(6, 8)})],
                      base_version=2, reset=True, seed=7, head={"head.weight": r(2, 4)},
                      meta={"frozen_sent": True}, bytes_down=123)
    rd = flower_io.payload_to_record(p, {"strategy": "fedex"}, round=3, from_version=1)
    q = flower_io.record_to_payload(rd)
    for f in ("client_id", "rank", "base_version", "reset", "seed", "meta", "bytes_down"):
        assert getattr(q, f) == getattr(p, f), f
    _eq(q.factors, p.factors)
    _eq(q.head, p.head)
    assert [(d.version, d.reset) for d in q.base_deltas] == [(1, True), (2, False)]
    for a, b in zip(q.base_deltas, p.base_deltas):
        _eq(a.layers, b.layers)
    assert flower_io.payload_context(rd) == ({"strategy": "fedex"}, 3, 1)
    tensors = sum(t.numel() * 8 for t in [*rd.array_records["fedlora.factors"].values()]
                  for t in [torch.from_numpy(t.numpy())])
    assert flower_io.record_bytes(rd) > tensors  # npy headers come on top of the float bytes


def test_real_strategy_payload_round_trip_and_bytes():
    s = create_strategy("fedsb", layers={"a": LayerSpec(6, 5)}, r_max=4, scale=2.0)
    s.initialize({"a": torch.randn(6, 5)})
    p = s.payload("client-0", 2, 0)
    q = flower_io.record_to_payload(flower_io.payload_to_record(p))
    _eq(q.factors, p.factors)
    rd = flower_io.payload_to_record(p)
    raw = sum(len(a.data) for rec in rd.array_records.values() for a in rec.values())
    assert flower_io.record_bytes(rd) == raw and raw >= p.bytes_down


def test_update_round_trip():
    u = ClientUpdate("client-1", 4, 120, 3, {"x": {"A": torch.randn(4, 8), "B": torch.randn(5, 4)}},
                     head={"head.bias": torch.randn(2)}, metrics={"loss": 0.5})
    rd = flower_io.update_to_record(u, {"train-time-s": 1.5, "ok": True})
    v = flower_io.record_to_update(rd)
    assert (v.client_id, v.rank, v.num_examples, v.base_version) == ("client-1", 4, 120, 3)
    _eq(v.factors, u.factors)
    _eq(v.head, u.head)
    assert v.metrics["loss"] == 0.5 and v.metrics["train-time-s"] == 1.5 and v.metrics["ok"] == 1
    assert flower_io.record_bytes(rd) >= (32 + 20 + 2) * 4


def test_wire_bytes_is_what_flower_pushes():
    from flwr.app import Message, MessageType

    from fedlora.sim import ensure_task_identity

    ensure_task_identity()
    s = create_strategy("fedex", layers={"a": LayerSpec(64, 48)}, r_max=4, scale=2.0)
    rd = flower_io.payload_to_record(s.payload("client-0", 2, 0), {"strategy": "fedex", "pad": "x" * 900})
    msg = Message(rd, dst_node_id=7, message_type=MessageType.TRAIN)
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    except ImportError:  # pragma: no cover - another Flower layout
        get_all_nested_objects = None
    if get_all_nested_objects is not None:  # Flower's own push set (deflate() of every object)
        want = sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())
        assert flower_io.wire_bytes(msg) == want
    # more than the arrays alone: the config records (here the 900-character spec) travel too
    assert flower_io.wire_bytes(rd) > flower_io.record_bytes(rd) + 900
    # identical arrays are pushed once (content-addressed), so they are counted once
    z = flower_io.tensors_to_record({"x": torch.zeros(1000), "y": torch.zeros(1000)})
    one = flower_io.tensors_to_record({"x": torch.zeros(1000)})
    assert flower_io.wire_bytes(z) < flower_io.wire_bytes(one) + 1000
