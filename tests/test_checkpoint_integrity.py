"""Checkpoint integrity: SHA-256 footer, corrupt / truncated files refused by name, and
``latest_valid_checkpoint`` passing over the damaged newest files."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from fedlora.checkpoint import (
    FOOTER_SIZE,
    checkpoint_path,
    latest_checkpoint,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.proto.fedlora.v1 import checkpoint_pb2 as pb

A = torch.tensor([[0.158, -1.25, 3.5], [2.0, 0.0, -7.75]], dtype=torch.float32)


def _save(path, round=1, **kw):
    state = kw.pop("state", {"A": A.clone(), "n": {"B": torch.arange(4, dtype=torch.float64)}})
    return save_checkpoint(path, strategy="fedex", round=round, state=state, scale=1.0, r_max=2, **kw)


def _flip_in_tensor(path, t: torch.Tensor = A, at: int = 3) -> None:
    """Flip one byte inside the stored data of tensor ``t`` (little-endian bytes, found in the file)."""
    data = bytearray(path.read_bytes())
    i = data.find(t.numpy().tobytes())
    assert i >= 0
    data[i + at] ^= 0x40
    path.write_bytes(bytes(data))


def test_footer_is_sha256_of_the_message(tmp_path):
    p = _save(tmp_path / "c.ckpt")
    data = p.read_bytes()
    payload, footer = data[:-FOOTER_SIZE], data[-FOOTER_SIZE:]
    # field 536870911, wire type 2, 40 bytes: magic + SHA-256 of everything before the footer
    assert footer == bytes.fromhex("faffffff0f28") + b"SHA256v1" + hashlib.sha256(payload).digest()
    msg = pb.Checkpoint()
    msg.ParseFromString(payload)
    assert msg.round == 1 and set(msg.tensors) == {"A", "n/B"}
    whole = pb.Checkpoint()  # a reader that knows nothing of the footer still parses the file
    whole.ParseFromString(data)
    assert whole.round == 1 and whole.state_json == msg.state_json


def test_good_round_trip_is_bit_exact(tmp_path):
    state = {"A": A.clone(), "bf": torch.randn(5, 3).to(torch.bfloat16),
             "i": torch.arange(-3, 4, dtype=torch.int64), "t": (torch.randn(2, dtype=torch.float64),)}
    ck = load_checkpoint(_save(tmp_path / "c.ckpt", state=state))
    for k in ("A", "bf", "i"):
        assert ck.state[k].dtype == state[k].dtype
        assert torch.equal(ck.state[k].view(torch.uint8), state[k].view(torch.uint8))
    assert torch.equal(ck.state["t"][0], state["t"][0])


def test_flipped_byte_in_tensor_data_is_refused_by_name(tmp_path):
    p = _save(tmp_path / "round-0007.ckpt")
    _flip_in_tensor(p)  # A[0,0] 0.158 -> a huge value if loaded
    with pytest.raises(ValueError, match=r"round-0007\.ckpt.*corrupt.*SHA-256"):
        load_checkpoint(p)


@pytest.mark.parametrize("cut", ["one byte", "footer", "half", "all but 20"])
def test_truncated_file_is_refused_by_name(tmp_path, cut):
    p = _save(tmp_path / "round-0002.ckpt")
    data = p.read_bytes()
    n = {"one byte": len(data) - 1, "footer": len(data) - FOOTER_SIZE,  # a clean protobuf, no footer
         "half": len(data) // 2, "all but 20": 20}[cut]
    p.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"round-0002\.ckpt.*truncated"):
        load_checkpoint(p)


def test_every_single_byte_flip_is_caught(tmp_path):
    p = _save(tmp_path / "c.ckpt", state={"A": A.clone()})
    data = p.read_bytes()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        p.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=r"c\.ckpt.*(corrupt|truncated)"):
            load_checkpoint(p)


def test_file_without_footer_is_refused_unless_allowed(tmp_path):
    """A pre-footer checkpoint (the bare message) cannot be told from a truncated one: refused,
    with the way out in the message; ``allow_unverified=True`` loads it."""
    p = _save(tmp_path / "c.ckpt")
    p.write_bytes(p.read_bytes()[:-FOOTER_SIZE])
    with pytest.raises(ValueError, match=r"c\.ckpt.*truncated or corrupt.*allow_unverified=True"):
        load_checkpoint(p)
    ck = load_checkpoint(p, allow_unverified=True)
    assert torch.equal(ck.state["A"], A) and ck.round == 1
    _save(p)  # re-saving gives it a footer
    assert load_checkpoint(p).round == 1


def test_latest_valid_skips_truncated_and_corrupt(tmp_path):
    for r in (1, 2, 3):
        _save(checkpoint_path(tmp_path, r), round=r)
    p1, p2, p3 = (checkpoint_path(tmp_path, r) for r in (1, 2, 3))
    p3.write_bytes(p3.read_bytes()[:-10])
    _flip_in_tensor(p2)
    assert latest_checkpoint(tmp_path) == p3  # by name only, unverified
    path, skipped = latest_valid_checkpoint(tmp_path)
    assert path == p1 and load_checkpoint(path).round == 1
    assert [s[0] for s in skipped] == [p3, p2]
    assert re.search(r"round-0003\.ckpt.*truncated", skipped[0][1])
    assert re.search(r"round-0002\.ckpt.*corrupt", skipped[1][1])


def test_latest_valid_none_when_nothing_verifies(tmp_path):
    assert latest_valid_checkpoint(tmp_path) == (None, [])
    p = _save(checkpoint_path(tmp_path, 1))
    p.write_bytes(b"")
    path, skipped = latest_valid_checkpoint(tmp_path)
    assert path is None and [s[0] for s in skipped] == [p] and "truncated" in skipped[0][1]


def test_latest_valid_skips_a_file_holding_another_round(tmp_path):
    _save(checkpoint_path(tmp_path, 1), round=1)
    _save(checkpoint_path(tmp_path, 2), round=1)  # e.g. copied by hand under the wrong name
    path, skipped = latest_valid_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 1)
    assert len(skipped) == 1 and "holds round 1, its name says round 2" in skipped[0][1]
