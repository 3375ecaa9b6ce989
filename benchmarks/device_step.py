"""One client's local LoRA training step on a real model: device vs CPU, DP vs non-DP.

Times, in one run: LoRA steps on the chosen device (CUDA: bf16 autocast) and on CPU (the
baseline), and DP-SGD steps (Opacus, per-sample clipping + noise) on the device, for a pretrained
encoder with rank-r adapters on query/value and a trainable head. Prints seconds per step and the
ratios.

    python benchmarks/device_step.py --model minilm --data-root ../shared/data
    python benchmarks/device_step.py --model hf:/path/to/folder --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.data import TextCollator, load_known, tokenize
from fedlora.hf_models import default_targets, get_hf_model, get_tokenizer
from fedlora.lora import LoRAConfig, inject_lora
from fedlora.privacy import PrivacyConfig, PrivacyState, train_private
from fedlora.train import OptimConfig, resolve_device, train_local


def _model(name: str, rank: int):
    model = get_hf_model(name, num_classes=2, dropout=0.0)
    targets, head = default_targets(model)
    inject_lora(model, LoRAConfig(targets=targets, rank=rank, alpha=2 * rank, trainable=head))
    return model


def _time(fn, warmup_steps: int, steps: int) -> float:
    fn(warmup_steps)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(steps)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cpu-steps", type=int, default=3)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    tok = get_tokenizer(args.model)
    ds = tokenize(load_known("sst2", "train", root=args.data_root, limit=4000), tok, args.max_length,
                  cache_dir=False)
    collate = TextCollator(tok.pad_token_id)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, collate_fn=collate)
    optim = OptimConfig(lr=1e-3)
    rows = []
    m = _model(args.model, args.rank)
    t_dev = _time(lambda n: train_local(m, loader, steps=n, optim=optim, device=dev), 3, args.steps)
    rows.append((f"LoRA step on {dev} ({'bf16 autocast' if dev.type == 'cuda' else 'fp32'})", t_dev))
    m_cpu = _model(args.model, args.rank)
    t_cpu = _time(lambda n: train_local(m_cpu, loader, steps=n, optim=optim, device="cpu"), 1,
                  args.cpu_steps)
    rows.append(("LoRA step on cpu (fp32), baseline", t_cpu))
    m_dp = _model(args.model, args.rank)
    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)
    state = PrivacyState()

    def dp(n: int) -> None:
        nonlocal state
        res = train_private(m_dp, ds, cfg=cfg, state=state, batch_size=args.batch, steps=n,
                            planned_total_steps=10_000, optim=optim, device=dev, collate_fn=collate)
        state = res.state

    t_dp = _time(dp, 3, args.steps)
    rows.append((f"DP-SGD step on {dev} (Opacus hooks)", t_dp))
    print(f"model {args.model}, rank {args.rank} on query/value + head, batch {args.batch} x <= "
          f"{args.max_length} tokens, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}")
    for what, t in rows:
        print(f"{what:48} {t * 1000:9.1f} ms/step")
    print(f"speed-up of {dev} over cpu: {t_cpu / t_dev:.1f}x;  DP overhead on {dev}: {t_dp / t_dev:.2f}x")


if __name__ == "__main__":
    main()
