"""A causal-LM client's local training step: fedlora's against a plain PEFT + transformers loop.

Both sides train the same checkpoint folder on the same batches (B × T tokens, the first half of
each row masked as a prompt) with LoRA of the same rank, alpha and targets, dropout 0, AdamW:

- fedlora: ``causal_lm.load_model`` + ``inject_lora`` + ``fedlora.train.train_local``, what a
  client runs (its loss: the mean over rows of the response tokens' NLL);
- PEFT: ``AutoModelForCausalLM.from_pretrained`` + ``peft.get_peft_model(LoraConfig)`` and the
  loop a user writes (``model(**batch, labels=...).loss.backward(); opt.step()``), no logging.

On CUDA both hold the frozen base in bfloat16 (fedlora's ``model.dtype = "auto"``; the PEFT side
loads it with ``dtype=torch.bfloat16``; adapters float32 on both) under bf16 autocast, or a 4-bit
base with ``--quantize 4bit``; on CPU both are float32. Time: repetitions of ``--steps`` steps,
the two sides interleaved (the order alternates), medians, and the ratio fedlora / PEFT of seconds
per step; tokens/s counts every position of the batch. Memory: each side again in a process of its
own (only its model loaded): peak GPU memory allocated (CUDA) or peak resident memory (CPU).

    python benchmarks/lm_step.py                         # a random 21M-parameter Llama built in code
    python benchmarks/lm_step.py --model hf:/models/Qwen2.5-0.5B --device cuda --batch 8 --seq 512
    python benchmarks/lm_step.py --device cuda --quantize 4bit --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fedlora import causal_lm
from fedlora.lora import LoRAConfig, inject_lora
from fedlora.train import OptimConfig, resolve_device, train_local


def build_random(out: Path, arch: str, hidden: int, layers: int, vocab: int) -> Path:
    """A random Llama or GPT-2 of the given size, saved as a transformers folder (nothing downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                           n_positions=4096))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=4096, tie_word_embeddings=True))
    model.save_pretrained(str(out))
    return out


def make_batches(n: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100  # the prompt half is not scored
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out



class Fedlora:
    name = "fedlora"

    def __init__(self, path: Path, a: argparse.Namespace, dev: torch.device) -> None:
        self.model = causal_lm.load_model(path, dtype=causal_lm.auto_dtype(dev), quantize=a.quantize,
                                          gradient_checkpointing=a.gradient_checkpointing)
        targets, _ = causal_lm.default_targets(self.model)
        inject_lora(self.model, LoRAConfig(targets=targets, rank=a.rank, scale=a.alpha / a.rank, seed=0))
        self.model.to(dev)
        self.opt = OptimConfig(lr=a.lr).build([p for p in self.model.parameters() if p.requires_grad])
        self.dev = dev

    def steps(self, batches: list[dict], n: int) -> None:
        train_local(self.model, batches, steps=n, optimizer=self.opt, device=self.dev)


class Peft:
    name = "peft"

    def __init__(self, path: Path, a: argparse.Namespace, dev: torch.device, targets: list[str]) -> None:
        import peft
        from transformers import AutoModelForCausalLM

        kw: dict = {"dtype": causal_lm.auto_dtype(dev), "local_files_only": True}
        if a.quantize:
            kw |= {"quantization_config": causal_lm.quantization_config(a.quantize),
                   "device_map": {"": torch.cuda.current_device()}}
        model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
        model.config.use_cache = False
        if a.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        cfg = peft.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=targets,
                              task_type="CAUSAL_LM")
        self.model = peft.get_peft_model(model, cfg).to(dev)
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=a.lr)
        self.dev = dev

    def steps(self, batches: list[dict], n: int) -> None:
        for i in range(n):
            b = {k: v.to(self.dev) for k, v in batches[i % len(batches)].items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
                loss = self.model(**b).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(side, batches: list[dict], n: int, dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    side.steps(batches, n)
    sync(dev)
    return (time.perf_counter() - t0) / n


def peak_memory(path: Path, a: argparse.Namespace, dev: torch.device, which: str) -> int:
    """One side alone in this process, ``--steps`` steps: peak bytes (CPU: above what the process held
    before loading the model)."""
    batches = make_batches(a.steps, a.batch, a.seq, a.vocab_used)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    import peft  # noqa: F401  (imports are not the side's memory)
    import transformers  # noqa: F401

    rss0 = _rss_now()
    side = Fedlora(path, a, dev) if which == "fedlora" else Peft(path, a, dev, targets_for(path))
    side.steps(batches, a.steps)
    sync(dev)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return _status_kib("VmHWM") * 1024 - rss0


def _status_kib(field: str) -> int:
    """A field of /proc/self/status (Linux), in KiB. (Not ru_maxrss: it survives exec, so a child
    would report its parent's peak.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rss_now() -> int:
    return _status_kib("VmRSS") * 1024


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks a deprecated transformers name
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="hf:<folder> of a causal LM (default: a random --arch)")
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    ap.add_argument("--keep", default="", help="folder for the random model: built once, reused")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quantize", default="", choices=["", "4bit", "8bit"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--memory-of", choices=["fedlora", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--vocab-used", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    dev = resolve_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.model.removeprefix("hf:")) if a.model else Path(a.keep or Path(tmp) / a.arch)
        if not a.model and not (path / "config.json").exists():
            build_random(path, a.arch, a.hidden, a.layers, a.vocab)
        if not a.vocab_used:
            from transformers import AutoConfig

            a.vocab_used = int(AutoConfig.from_pretrained(str(path), local_files_only=True).vocab_size)
        if a.memory_of:  # a child run: one side's memory
            print(json.dumps({"peak_bytes": peak_memory(path, a, dev, a.memory_of)}))
            return
        batches = make_batches(a.steps, a.batch, a.seq, a.vocab_used)
        fed = Fedlora(path, a, dev)
        targets = targets_for(path)
        pft = Peft(path, a, dev, targets)
        # a 4-bit weight is stored packed (two per byte): count the weights, not the bytes
        n_params = sum(math.prod(q.shape) if (q := getattr(p, "quant_state", None)) is not None else p.numel()
                       for p in fed.model.parameters() if not p.requires_grad)
        n_lora = sum(p.numel() for p in fed.model.parameters() if p.requires_grad)
        assert n_lora == sum(p.numel() for p in pft.model.parameters() if p.requires_grad), "adapters differ"
        for side in (fed, pft):  # warm-up: kernels, allocator, optimizer state
            side.steps(batches, 2)
        times: dict[str, list[float]] = {"fedlora": [], "peft": []}
        for rep in range(a.reps):
            for side in (fed, pft) if rep % 2 == 0 else (pft, fed):
                times[side.name].append(timed(side, batches, a.steps, dev))
        del fed, pft
        mem = {}
        for which in ("fedlora", "peft"):
            cmd = [sys.executable, __file__, "--memory-of", which, "--model", f"hf:{path}",  # noqa: S603
                   "--vocab-used", str(a.vocab_used)] + [x for k in (
                       "device", "quantize", "rank", "alpha", "lr", "batch", "seq", "steps")
                       for x in (f"--{k}", str(getattr(a, k)))] + (
                ["--gradient-checkpointing"] if a.gradient_checkpointing else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"memory run of {which} failed:\n{res.stderr[-3000:]}")
            mem[which] = json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    prec = f"{a.quantize} base" if a.quantize else "bf16 base + autocast" if dev.type == "cuda" else "fp32"
    gc = "; gradient checkpointing" if a.gradient_checkpointing else ""
    print(f"{where}, torch {torch.__version__}; {n_params / 1e6:.1f}M frozen + {n_lora / 1e6:.2f}M LoRA "
          f"(rank {a.rank}, targets {','.join(targets)}); batch {a.batch} x {a.seq} tokens; "
          f"{prec}{gc}; {a.reps} reps x {a.steps} steps")
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = a.batch * a.seq
    mem_kind = "peak GPU memory allocated" if dev.type == "cuda" else "peak resident memory added"
    for k in ("fedlora", "peft"):
        reps = ", ".join(f"{t * 1000:.0f}" for t in times[k])
        print(f"  {k:8} {med[k] * 1000:9.1f} ms/step  {tokens / med[k]:10.0f} tokens/s  "
              f"{mem_kind} {mem[k] / 2**20:8.0f} MiB  (reps, ms: {reps})")
    print(f"fedlora / peft: time per step {med['fedlora'] / med['peft']:.2f}x, tokens/s "
          f"{med['peft'] / med['fedlora']:.2f}x, memory {mem['fedlora'] / mem['peft']:.2f}x")


def targets_for(path: Path) -> list[str]:
    """fedlora's default targets for the checkpoint's architecture (from its config only)."""
    mtype = json.loads((path / "config.json").read_text()).get("model_type")
    return list(causal_lm.CAUSAL_TARGETS.get(mtype, causal_lm.CAUSAL_TARGETS["llama"]))


if __name__ == "__main__":
    main()
