"""Node cache: atomic writes, version round trip, mmap load, corrupt/missing file -> None."""

from __future__ import annotations

import os

import pytest
import torch

from fedlora import node_cache as nc
from fedlora.lora import LoRAConfig, inject_lora, lora_layers
from fedlora.models import get_model
from fedlora.node_cache import NodeCache, base_deltas, set_base_deltas

KEY = "tiny-seed0"


def _deltas(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.attn.q": torch.randn(32, 32, generator=g),
            "layers.1.attn.v": torch.randn(32, 32, generator=g, dtype=torch.float64)}


def test_version_round_trip(tmp_path):
    cache = NodeCache(tmp_path)
    assert cache.load_base(KEY) is None
    assert cache.base_version(KEY) == 0
    cache.save_base(KEY, 1, _deltas(1))
    cache.save_base(KEY, 3, _deltas(3))
    version, d = cache.load_base(KEY)
    assert version == 3
    ref = _deltas(3)
    assert set(d) == set(ref)
    for k in ref:
        assert d[k].dtype == ref[k].dtype
        assert torch.equal(d[k], ref[k])
    assert cache.base_version(KEY) == 3
    # another model's key does not see it
    assert cache.load_base("other-model") is None
    # an empty base (version 0, no deltas) round-trips too
    cache.save_base("m2", 0, {})
    assert cache.load_base("m2") == (0, {})


def test_crash_mid_write_keeps_old_version(tmp_path, monkeypatch):
    cache = NodeCache(tmp_path)
    cache.save_base(KEY, 1, _deltas(1))

    def boom(*a, **k):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(nc.os, "replace", boom)
    with pytest.raises(OSError):
        cache.save_base(KEY, 2, _deltas(2))
    monkeypatch.undo()
    version, d = cache.load_base(KEY)
    assert version == 1 and torch.equal(d["layers.0.attn.q"], _deltas(1)["layers.0.attn.q"])
    # no temporary file left behind
    assert [p.name for p in cache.dir(KEY).iterdir()] == [nc.BASE_FILE]


def test_killed_writer_leaves_old_version(tmp_path):
    """A process killed mid-write (half a temp file on disk) does not touch the live file."""
    cache = NodeCache(tmp_path)
    cache.save_base(KEY, 4, _deltas(4))
    partial = cache.dir(KEY) / f".{nc.BASE_FILE}.99999.tmp"
    full = (cache.dir(KEY) / nc.BASE_FILE).read_bytes()
    partial.write_bytes(full[: len(full) // 2])
    assert cache.load_base(KEY)[0] == 4
    cache.save_base(KEY, 5, _deltas(5))
    assert cache.load_base(KEY)[0] == 5


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty"])
def test_corrupt_file_reads_as_none(tmp_path, damage):
    cache = NodeCache(tmp_path)
    path = cache.save_base(KEY, 2, _deltas(2))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "flip":  # a flipped bit in the tensor data: only the checksum can see it
        data[-5] ^= 0x01
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert cache.load_base(KEY) is None
    assert cache.base_version(KEY) == 0
    # the next save repairs it
    cache.save_base(KEY, 3, _deltas(3))
    assert cache.load_base(KEY)[0] == 3


def test_foreign_model_key_in_file_is_rejected(tmp_path):
    cache = NodeCache(tmp_path)
    path = cache.save_base("a", 1, _deltas(1))
    other = cache.dir("b") / nc.BASE_FILE
    other.parent.mkdir(parents=True)
    other.write_bytes(path.read_bytes())
    assert cache.load_base("b") is None


def test_weights_built_once_then_memory_mapped(tmp_path, monkeypatch):
    cache = NodeCache(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return get_model("tiny", seed=0)

    s1 = cache.load_weights(KEY, build)
    opened = []
    real = nc.safe_open

    def spy(*a, **k):
        opened.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(nc, "safe_open", spy)
    s2 = cache.load_weights(KEY, build)
    assert calls == [1]  # the second load came from the cache ...
    assert opened == [str(cache.dir(KEY) / nc.WEIGHTS_FILE)]  # ... through safe_open (mmap)
    ref = get_model("tiny", seed=0).state_dict()
    assert set(s1) == set(s2) == set(ref)
    for k in ref:
        assert torch.equal(s2[k], ref[k])
    m = get_model("tiny", seed=123)
    m.load_state_dict(s2)
    assert all(torch.equal(m.state_dict()[k], ref[k]) for k in ref)
    # a damaged weights file is rebuilt
    (cache.dir(KEY) / nc.WEIGHTS_FILE).write_bytes(b"not safetensors")
    cache.load_weights(KEY, build)
    assert calls == [1, 1]


def test_base_deltas_from_and_into_model(tmp_path):
    model = get_model("tiny", seed=0)
    inject_lora(model, LoRAConfig(targets=["attn.q", "attn.v"], rank=2))
    layers = lora_layers(model)
    name = next(iter(layers))
    layers[name].fold_into_base_(torch.ones(32, 32))
    cache = NodeCache(tmp_path)
    cache.save_base(KEY, 7, base_deltas(model))
    fresh = get_model("tiny", seed=0)
    inject_lora(fresh, LoRAConfig(targets=["attn.q", "attn.v"], rank=2))
    version, d = cache.load_base(KEY)
    set_base_deltas(fresh, d)
    assert version == 7
    for n, m in lora_layers(fresh).items():
        assert torch.equal(m.effective_weight(), layers[n].effective_weight())
    with pytest.raises(ValueError, match="unknown layers"):
        set_base_deltas(fresh, {"nope": torch.zeros(1)})


def test_state_files(tmp_path):
    cache = NodeCache(tmp_path)
    assert cache.load_state(KEY, "fedsa") is None
    cache.save_state(KEY, "fedsa", {"B": torch.ones(3, 2)}, {"round": "2"})
    t, meta = cache.load_state(KEY, "fedsa")
    assert torch.equal(t["B"], torch.ones(3, 2)) and meta["round"] == "2"
    cache.clear(KEY)
    assert cache.load_state(KEY, "fedsa") is None and cache.load_base(KEY) is None


def test_process_age_is_plausible():
    import subprocess
    import sys

    age = nc.process_age_s()
    assert 0 < age < 3600
    out = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.3); "
                          "from fedlora.node_cache import process_age_s; print(process_age_s())"],
                         capture_output=True, text=True, check=True).stdout
    assert 0.25 < float(out) < 30


def test_load_model_fast_skeleton_and_copy_on_write(tmp_path):
    cache = NodeCache(tmp_path)
    ref = get_model("tiny", seed=0)
    m1 = cache.load_model(KEY, lambda: get_model("tiny", seed=0))  # miss: built and cached
    m2 = cache.load_model(KEY, lambda: get_model("tiny", seed=99))  # hit: weights from the cache
    for k, v in ref.state_dict().items():
        assert torch.equal(m1.state_dict()[k], v) and torch.equal(m2.state_dict()[k], v)
        assert not m2.state_dict()[k].is_meta
    # training writes do not reach the cache file (copy-on-write mapping)
    with torch.no_grad():
        m2.head.weight.add_(1.0)
    m3 = cache.load_model(KEY, lambda: get_model("tiny", seed=0))
    assert torch.equal(m3.head.weight, ref.head.weight)
    x = torch.randint(0, 64, (2, 8))
    assert torch.allclose(m3(x), ref(x))
    # LoRA injection on top works as on a normally built model
    inject_lora(m3, LoRAConfig(targets=["attn.q"], rank=2))
    assert m3(x).shape == (2, 2)


# ---- integrity: every file read back is checked; damage is a miss with a warning, never wrong values

def _flip_at(path, needle: bytes, at: int = 0, mask: int = 0x40) -> None:
    data = bytearray(path.read_bytes())
    i = data.find(needle)
    assert i >= 0, needle
    data[i + at] ^= mask
    path.write_bytes(bytes(data))


def _warned(caplog, path) -> bool:
    return any(r.levelname == "WARNING" and str(path) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["flip tensor byte", "truncate", "flip version"])
def test_damaged_base_is_a_miss_with_warning(tmp_path, caplog, damage):
    cache = NodeCache(tmp_path)
    d = _deltas(2)
    path = cache.save_base(KEY, 3, d)
    if damage == "flip tensor byte":
        _flip_at(path, d["layers.0.attn.q"].numpy().tobytes(), at=3)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    else:  # metadata: "3" -> "7" would make the node claim a base it does not have
        _flip_at(path, b'"version":"3"', at=11, mask=0x04)
    with caplog.at_level("WARNING", logger="fedlora.node_cache"):
        assert cache.load_base(KEY) is None
    assert _warned(caplog, path)
    assert cache.base_version(KEY) == 0  # the node re-syncs from the server


def test_base_any_byte_flip_never_gives_wrong_values(tmp_path):
    cache = NodeCache(tmp_path)
    d = {"q": torch.randn(3, 2), "v": torch.arange(4, dtype=torch.int64)}
    path = cache.save_base(KEY, 5, d)
    data = path.read_bytes()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        path.write_bytes(bytes(bad))
        hit = cache.load_base(KEY)
        assert hit is None or (hit[0] == 5 and all(torch.equal(hit[1][k], d[k]) for k in d)), i


def test_good_files_round_trip_bit_for_bit(tmp_path):
    cache = NodeCache(tmp_path)
    d = {"a": torch.randn(4, 3), "b": torch.randn(2, 2, dtype=torch.float64),
         "c": torch.randn(3).to(torch.bfloat16), "e": torch.zeros(0, 5)}
    cache.save_base(KEY, 9, d)
    version, got = cache.load_base(KEY)
    assert version == 9 and set(got) == set(d)
    for k in d:
        assert got[k].dtype == d[k].dtype and got[k].shape == d[k].shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), d[k].reshape(-1).view(torch.uint8))
    cache.save_state(KEY, "client", {"B": d["b"]}, {"version": "9", "rank": "2"})
    t, meta = cache.load_state(KEY, "client")
    assert torch.equal(t["B"], d["b"]) and meta["version"] == "9" and meta["rank"] == "2"
    rec = {"history": [[1.1, 0.25, 7]], "total_steps": 7, "note": "x"}
    cache.save_record("privacy-run", rec)
    assert cache.load_record("privacy-run") == rec


def test_damaged_weights_are_rebuilt_with_warning(tmp_path, caplog):
    cache = NodeCache(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return get_model("tiny", seed=0)

    ref = get_model("tiny", seed=0).state_dict()
    cache.load_weights(KEY, build)
    path = cache.dir(KEY) / nc.WEIGHTS_FILE
    _flip_at(path, ref["head.weight"].numpy().tobytes(), at=2)
    with caplog.at_level("WARNING", logger="fedlora.node_cache"):
        state = cache.load_weights(KEY, build)
    assert calls == [1, 1] and _warned(caplog, path)
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    # the rebuilt file is good again; a truncated one is rebuilt too, and load_model sees W0
    assert all(torch.equal(v, ref[k]) for k, v in cache.load_weights(KEY, build).items())
    assert calls == [1, 1]
    path.write_bytes(path.read_bytes()[:-3])
    m = cache.load_model(KEY, build)  # a miss: W0 rebuilt by build_fn
    n = len(calls)
    assert n > 2 and all(torch.equal(m.state_dict()[k], ref[k]) for k in ref)
    m = cache.load_model(KEY, lambda: get_model("tiny", seed=7))  # a hit again: W0 from the file
    assert len(calls) == n and all(torch.equal(m.state_dict()[k], ref[k]) for k in ref)


def test_damaged_state_is_a_miss_with_warning(tmp_path, caplog):
    cache = NodeCache(tmp_path)
    path = cache.save_state(KEY, "client", {"B": torch.ones(3, 2)}, {"version": "4", "rank": "2"})
    _flip_at(path, b'"rank":"2"', at=8, mask=0x02)  # rank 2 -> 0 in the metadata
    with caplog.at_level("WARNING", logger="fedlora.node_cache"):
        assert cache.load_state(KEY, "client") is None
    assert _warned(caplog, path)


@pytest.mark.parametrize("damage", ["flip digit", "truncate", "no checksum"])
def test_damaged_record_is_a_miss_with_warning(tmp_path, caplog, damage):
    import json

    cache = NodeCache(tmp_path)
    path = cache.save_record("privacy-run", {"total_steps": 40, "history": [[1.5, 0.25, 40]]})
    if damage == "flip digit":
        _flip_at(path, b"40", at=0, mask=0x01)  # 40 -> 50 steps
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-2])
    else:
        doc = json.loads(path.read_text())
        del doc["sha256"]
        path.write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="fedlora.node_cache"):
        assert cache.load_record("privacy-run") is None
    assert _warned(caplog, path)


def test_previous_cache_format_is_a_miss(tmp_path, caplog):
    """A file of format /1 (its checksum did not cover the metadata) reads as no cache."""
    from safetensors.torch import save_file

    cache = NodeCache(tmp_path)
    path = cache.dir(KEY) / nc.BASE_FILE
    path.parent.mkdir(parents=True)
    t = {"q": torch.ones(2)}
    save_file(t, str(path), metadata={"format": "fedlora-node-cache/1", "kind": "base",
                                      "model_key": KEY, "version": "3", "sha256": nc._digest(t)})
    with caplog.at_level("WARNING", logger="fedlora.node_cache"):
        assert cache.load_base(KEY) is None
    assert _warned(caplog, path) and "fedlora-node-cache/1" in caplog.text
