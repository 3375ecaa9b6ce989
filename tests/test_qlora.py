"""model.quantize (QLoRA): a bitsandbytes 4-bit / 8-bit frozen base under fedlora's LoRA.

Users run it on CUDA (the ``cuda`` cases, ``-m gpu``). bitsandbytes (>= 0.48) also runs its quantized
layers on the CPU, slowly; the ``cpu`` cases use that to test the same code here and in CI, by adding
"cpu" to ``causal_lm.QUANTIZE_DEVICES`` (the product refuses a quantized base off CUDA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from fedlora import causal_lm  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.lora import LoRAConfig, inject_lora, lora_layers  # noqa: E402

STRATEGIES = ["fedavg", "fedex", "flora", "fedsb", "fedsa", "ffa", "rolora", "fedsvd", "flexlora", "hetlora"]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch) -> str:
    """Where the quantized base lives: CUDA, or the CPU through bitsandbytes' CPU kernels."""
    bnb = pytest.importorskip("bitsandbytes")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        return "cuda"
    from packaging.version import Version

    if Version(bnb.__version__) < Version("0.48"):  # (older ones have no CPU kernels; newer ones must work)
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU kernels (0.48 or later has)")
    monkeypatch.setattr(causal_lm, "QUANTIZE_DEVICES", ("cuda", "cpu"))
    return "cpu"


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_base_keeps_deltas_beside_its_weights_and_passes_gradients(llama_dir, device, bits):
    """LoRALinear over a quantized layer computes Q(W0)x + Dx + s·B·A x, folding a delta never touches
    the quantized weights, and backward gives the adapters and the layer's input (through Q(W0), for
    the layers below) their gradients — also after an evaluation pass, which bitsandbytes' CPU layer
    used to repack for inference, dropping the input's gradient from then on."""
    from fedlora.lora import dequantized_weight

    model = causal_lm.load_model(llama_dir, quantize=bits, device=device)
    inject_lora(model, LoRAConfig(targets=["q_proj", "v_proj"], rank=4, scale=0.5, seed=0))
    lin = next(iter(lora_layers(model).values()))
    assert lin.quantized and type(lin.base).__name__ == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[bits]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lin.lora_b.weight.copy_(torch.randn(lin.lora_b.weight.shape, generator=g) * 0.1)
    q0 = dequantized_weight(lin.base).float().clone()
    d = (torch.randn(lin.out_features, lin.in_features, generator=g) * 0.02).to(device)
    lin.fold_into_base_(d)
    model.eval()
    with torch.no_grad():  # what a client's evaluation does before it trains the same model
        model(input_ids=torch.arange(1, 9, device=device)[None])
    model.train()
    x = torch.randn(3, 5, lin.in_features, generator=g).to(device).requires_grad_(True)
    y = lin(x)
    w = q0 + d + lin.delta_weight().float()
    assert _rel(y, x.detach().float() @ w.t()) < 0.03  # bf16 / int8 compute
    gy = torch.randn(y.shape, generator=g).to(device)
    y.backward(gy)
    assert _rel(x.grad, gy @ w) < 0.03
    h = x.detach().reshape(-1, lin.in_features) @ lin.lora_a.weight.detach().t()
    assert _rel(lin.lora_b.weight.grad, 0.5 * gy.reshape(-1, lin.out_features).t() @ h) < 0.03
    assert lin.base.weight.grad is None
    assert torch.equal(dequantized_weight(lin.base).float(), q0)  # the quantized weights are untouched
    torch.testing.assert_close(lin.effective_weight(), q0 + d + lin.delta_weight(), rtol=0, atol=1e-6)
    lin.merge_()
    want = q0 + d + 0.5 * lin.adapter_product()
    torch.testing.assert_close(lin.effective_weight(), want, rtol=0, atol=1e-6)
    lin.unmerge_()
    torch.testing.assert_close(lin.base_delta, d, rtol=0, atol=1e-6)


def _run(tmp_path: Path, llama_dir: Path, data_file: Path, device: str, strategy: str,
         *sets: str) -> list[dict]:
    from fedlora.loopback import run_loopback

    cfg = load_config(None, [
        'model.task="causal-lm"', f"model.name={json.dumps(f'hf:{llama_dir}')}",
        f"data.name={json.dumps(str(data_file))}", "data.max_length=32", "data.server_examples=6",
        "data.val_fraction=0.2", "clients.num=3", "clients.ranks=[2,4]", "rounds=2", "train.local_steps=6",
        "train.batch_size=8", "train.lr=0.01", "eval.batch_size=16", f"run_dir={json.dumps(str(tmp_path))}",
        "strategy.fedsb_init_examples=6", "strategy.fedsb_init_batches=1", 'model.quantize="4bit"',
        f'clients.device="{device}"', f'strategy.name="{strategy}"', *sets])
    run_loopback(cfg)
    from clients.app import _MODELS  # the loopback's ClientApp ran in this process

    (entry,) = _MODELS.values()
    assert all(lin.quantized for lin in lora_layers(entry.model).values())
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_clients_on_a_4bit_base(tmp_path, llama_dir, data_file, device, strategy):
    """QLoRA end to end: clients with a 4-bit base train two rounds through the real apps, every update
    is accepted, the loss falls, and the server (full precision) evaluates the global model."""
    rows = _run(tmp_path, llama_dir, data_file, device, strategy)
    assert all(c["accepted"] for r in rows for c in r["clients"]) and len(rows[0]["clients"]) == 3
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert math.isfinite(rows[-1]["perplexity"] if strategy != "fedsa" else rows[-1]["train_loss"])


@pytest.mark.parametrize(("strategy", "sets"), [
    ("fedex", ['model.quantize="8bit"']),
    ("fedsa", ["privacy.enabled=true", "privacy.noise_multiplier=0.5"]),
    ("flora", ["model.gradient_checkpointing=true", "train.grad_accum=2"]),
], ids=["8bit", "dp", "checkpointing"])
def test_a_quantized_base_with_8bit_dp_or_checkpointing(tmp_path, llama_dir, data_file, device, strategy,
                                                        sets):
    rows = _run(tmp_path, llama_dir, data_file, device, strategy, *sets)
    assert all(c["accepted"] for r in rows for c in r["clients"]) and len(rows[0]["clients"]) == 3
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    if "privacy.enabled=true" in sets:
        eps = [c["metrics"]["epsilon"] for c in rows[-1]["clients"]]
        assert all(math.isfinite(e) and e > 0 for e in eps)
