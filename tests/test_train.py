"""Local training: only adapters move, the tiny model learns the synthetic task."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fedlora.lora import LoRAConfig, inject_lora
from fedlora.models import get_model
from fedlora.synthetic import SyntheticTask, make_loader
from fedlora.train import OptimConfig, evaluate, resolve_device, train_local


def _adapted(seed: int = 0, mode: str = "lora"):
    model = get_model("tiny", seed=seed)
    inject_lora(model, LoRAConfig(targets=["attn.q", "attn.v"], rank=4, alpha=8, mode=mode,
                                  trainable=["head"]))
    return model


def test_training_moves_only_adapters_and_head():
    model = _adapted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = SyntheticTask().generate(64, seed=1)
    train_local(model, make_loader(ds, 16), steps=3, optim=OptimConfig(lr=1e-2), device="cpu")
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if p.requires_grad:
            if ".lora_b." in n or n.startswith("head"):
                assert changed, f"{n} is trainable but did not move"
        else:
            assert not changed, f"frozen {n} changed"


def test_tiny_model_learns_synthetic_task():
    task = SyntheticTask()
    model = _adapted()
    test = make_loader(task.generate(400, seed=2), 200, shuffle=False)
    before = evaluate(model, test, device="cpu").accuracy
    train_local(model, make_loader(task.generate(512, seed=1), 32), steps=80,
                optim=OptimConfig(lr=1e-2), device="cpu")
    after = evaluate(model, test, device="cpu")
    assert after.accuracy > 0.85 > before + 0.1
    assert after.num_examples == 400


def test_sb_mode_trains_only_r():
    model = _adapted(mode="sb")
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters()
            if p.requires_grad and "lora" in n} == {"lora_r"}


def test_argument_errors():
    model = _adapted()
    loader = make_loader(SyntheticTask().generate(8), 4)
    with pytest.raises(ValueError, match="exactly one"):
        train_local(model, loader)
    with pytest.raises(ValueError, match="optimizer name"):
        train_local(model, loader, steps=1, optim=OptimConfig(name="lion"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert resolve_device("auto").type in ("cpu", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_training_learns():
    task = SyntheticTask()
    model = _adapted()
    train_local(model, make_loader(task.generate(512, seed=1), 32), steps=80,
                optim=OptimConfig(lr=1e-2), device="cuda")
    res = evaluate(model, make_loader(task.generate(400, seed=2), 200, shuffle=False), device="cuda")
    assert res.accuracy > 0.85
    assert next(model.parameters()).device.type == "cuda"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim / /proc are Linux")
def test_release_memory_returns_freed_heap_to_the_os():
    from fedlora.train import release_memory

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    freed = [torch.ones(256) for _ in range(300_000)]  # ~300 MB of small heap blocks
    pinned = [torch.ones(256) for _ in range(1000)]  # allocated above them: the heap cannot shrink
    del freed  # glibc keeps these pages without a trim
    before = rss_mb()
    release_memory()
    assert before - rss_mb() > 50
    del pinned
