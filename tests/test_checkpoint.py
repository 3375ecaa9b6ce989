"""Checkpoint schema: exact round trips, atomic writes, RNG, PEFT export, generated code up to date."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.checkpoint import (
    SCHEMA_VERSION,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    rng_restore,
    rng_snapshot,
    save_checkpoint,
)
from fedlora.proto.fedlora.v1 import checkpoint_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def _same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def test_nested_state_roundtrip_exact(tmp_path):
    state = {"A": {"l.q": torch.randn(3, 5, dtype=torch.float64)},
             "bf": torch.randn(4, 2).to(torch.bfloat16), "idx": torch.arange(5),
             "deltas": {"3": {"l.q": (torch.randn(5, 2), torch.randn(2, 4))}},
             "lst": [1, 2.5, "x", None, True, [], (), (torch.tensor(3.0, dtype=torch.float64), "t")],
             "empty": {}, "n": 7, "f": -0.125, "inf": float("inf"), "name": "fedex",
             "more": [torch.randn(2, 3, dtype=torch.float16),
                      torch.arange(6, dtype=torch.int32).reshape(2, 3),
                      torch.tensor([True, False]), torch.randn(4, 6, dtype=torch.float64).t()],
             "a/b": torch.ones(2), "a": {"b": torch.zeros(2)}}
    p = save_checkpoint(tmp_path / "c.ckpt", strategy="fedex", round=3, state=state, scale=2.0,
                        r_max=8, ranks={"a": 2}, base_version=3, config={"k": 1},
                        metrics=[{"round": 1}])
    ck = load_checkpoint(p)
    _same(ck.state, state)
    assert (ck.strategy, ck.round, ck.scale, ck.r_max, ck.ranks, ck.base_version) == \
        ("fedex", 3, 2.0, 8, {"a": 2}, 3)
    assert ck.config == {"k": 1} and ck.metrics == [{"round": 1}]
    assert ck.schema_version == SCHEMA_VERSION and ck.fedlora_version and ck.created_at
    with pytest.raises(TypeError, match="deltas/x"):
        save_checkpoint(tmp_path / "bad.ckpt", strategy="s", round=0, state={"deltas": {"x": object()}},
                        scale=1.0, r_max=1)
    with pytest.raises(TypeError, match="reserved"):
        save_checkpoint(tmp_path / "bad.ckpt", strategy="s", round=0, state={"k": {"__tuple__": 1}},
                        scale=1.0, r_max=1)
    assert not (tmp_path / "bad.ckpt").exists()


@pytest.mark.parametrize("name", ["fedex", "ffa", "rolora", "fedsvd", "flexlora", "hetlora"])
def test_real_strategy_state_restores(tmp_path, name):
    from strategy_helpers import Multi, apply_payload, layer_specs, make_update, state_tensors, train_randomly

    from fedlora.strategies import create_strategy

    s = create_strategy(name, layers=layer_specs(), r_max=4, scale=1.5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    ups = []
    for i, r in enumerate([2, 4]):
        m = Multi(0, r, 1.5, "lora")
        p = s.payload(f"c{i}", r, 0)
        apply_payload(m, p)
        train_randomly(m, gen, name)
        ups.append(make_update(m, p, 5))
    s.aggregate(ups)
    save_checkpoint(checkpoint_path(tmp_path, 1), strategy=s.name, round=1, state=s.state_dict(),
                    scale=s.scale, r_max=4)
    fresh = create_strategy(name, layers=layer_specs(), r_max=4, scale=1.5, dtype=torch.float64)
    fresh.load_state_dict(load_checkpoint(latest_checkpoint(tmp_path)).state)
    a, b = state_tensors(s), state_tensors(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for n in layer_specs():
        assert torch.equal(fresh.global_delta(n), s.global_delta(n))
    late, again = fresh.payload("late", 2, 0), s.payload("late", 2, 0)
    assert late.trains == again.trains and late.rank == again.rank
    assert all(torch.equal(late.factors[n][k], t) for n, f in again.factors.items() for k, t in f.items())
    if name == "fedex":
        assert late.base_deltas[0].reset
    if name == "hetlora":  # the clients' (pruned) ranks are state too
        assert fresh.ranks == s.ranks == {"c0": 2, "c1": 4}


def test_atomic_write_keeps_previous_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "c.ckpt"
    save_checkpoint(p, strategy="a", round=1, state={"x": torch.ones(2)}, scale=1.0, r_max=1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(p, strategy="a", round=2, state={"x": torch.zeros(2)}, scale=1.0, r_max=1)
    monkeypatch.undo()
    assert load_checkpoint(p).round == 1 and [f.name for f in tmp_path.iterdir()] == ["c.ckpt"]


def test_corrupt_and_newer_schema_are_clear_errors(tmp_path):
    p = save_checkpoint(tmp_path / "c.ckpt", strategy="a", round=1, state={"x": torch.ones(9)},
                        scale=1.0, r_max=1)
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(p)
    m = pb.Checkpoint(schema_version=SCHEMA_VERSION + 1, state_json="{}")
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ValueError, match=rf"{p.name}.*schema version {SCHEMA_VERSION + 1}.*upgrade fedlora"):
        load_checkpoint(p)
    m = pb.Checkpoint(schema_version=SCHEMA_VERSION, state_json='{"x": {"__tensor__": "x"}}')
    m.tensors["x"].CopyFrom(pb.Tensor(shape=[3], dtype="float64", data=b"\0" * 16))  # 2 of 3 values
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ValueError, match=rf"{p.name}.*'x'.*16 bytes"):
        load_checkpoint(p)
    m.tensors.clear()  # skeleton refers to a tensor that is not there
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(p)


def test_latest_checkpoint_ordering(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for r in (2, 10, 9):
        save_checkpoint(checkpoint_path(tmp_path, r), strategy="a", round=r, state={}, scale=1.0, r_max=1)
    assert latest_checkpoint(tmp_path).name == "round-0010.ckpt"


def test_rng_snapshot_restore_reproduces_draws():
    snap = rng_snapshot()
    a = (random.random(), np.random.rand(), torch.rand(3))
    rng_restore(snap)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    np.random.randn()  # numpy's cached gaussian is part of the state
    snap = rng_snapshot()
    c = (random.gauss(0, 1), np.random.randn(2), torch.randn(2))
    rng_restore(snap)
    d = (random.gauss(0, 1), np.random.randn(2), torch.randn(2))
    assert c[0] == d[0] and np.array_equal(c[1], d[1]) and torch.equal(c[2], d[2])
    rng_restore(b"")  # no-op
    with pytest.raises(ValueError, match="RNG snapshot"):
        rng_restore(b"\x80garbage")



@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools not installed (pip install -e '.[dev]')")
def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run(["bash", str(ROOT / "proto" / "generate.sh"), str(tmp_path)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in ("checkpoint_pb2.py", "checkpoint_pb2.pyi"):
        assert filecmp.cmp(tmp_path / "fedlora" / "v1" / name,
                           ROOT / "fedlora" / "proto" / "fedlora" / "v1" / name, shallow=False), name
