"""Local training and evaluation loops (one client, one round).

Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels``. Models return logits or an
HF output with ``.logits``. ``device="auto"`` picks CUDA when present; on CUDA the forward runs
under bf16 autocast (the adapters and the master base delta stay in float32), on CPU in float32.

The labels say the task: a vector (B) holds class ids (sequence classification, cross-entropy
and accuracy); a matrix (B×T) holds the next-token targets of a causal LM, ``-100`` where a
token is not scored (prompt, padding). The causal-LM training loss is the mean over sequences of
each sequence's mean negative log-likelihood over its scored tokens (every example weighs the
same, whatever its length: the per-sample loss DP-SGD clips); evaluation reports the token-level
mean NLL (``loss``), its ``perplexity = exp(loss)`` and the top-1 next-token ``accuracy``, all over
the scored tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedlora.lora import trainable_parameters


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 5e-3
    weight_decay: float = 0.0
    momentum: float = 0.0

    def build(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if not params:
            raise ValueError("no trainable parameters: inject LoRA (or name a trainable head) first")
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        raise ValueError(f"optimizer name must be 'adamw' or 'sgd', got {self.name!r}")


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps taken
    num_examples: int  # examples seen (counting repeats)
    steps: int
    seconds: float


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per example (classification) or per scored token (causal LM)
    accuracy: float  # class accuracy, or next-token accuracy over the scored tokens
    num_examples: int
    tokens: int = 0  # causal LM: the scored tokens

    @property
    def perplexity(self) -> float:
        import math

        return math.exp(min(self.loss, 700.0))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else as given (validated)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available (use 'auto' or 'cpu')")
    return dev


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of a causal LM (B×(T-1)) and the mask of scored tokens: position ``t``'s
    logits predict token ``t+1``; labels of ``-100`` are not scored."""
    # shift the labels, not the logits (as transformers does): the logits stay one contiguous
    # (B·T)×V block, 4-5x faster than cross-entropy over a strided B×V×(T-1) view on CPU
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 kept
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
                          ignore_index=-100).view(target.shape)[:, :-1]
    return nll, labels[:, 1:] != -100


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels)
    nll, mask = token_nll(logits, labels)
    return (nll.sum(1) / mask.sum(1).clamp_min(1)).mean()


def _forward(model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, int]:
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = _logits(model(**inputs))
    return _loss(logits, labels), labels.shape[0]


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training loader yielded no batch")


def train_local(model: nn.Module, loader: Iterable[dict], steps: int | None = None,
                epochs: int | None = None, optim: OptimConfig | None = None,
                device: str | torch.device = "auto", grad_accum: int = 1,
                optimizer: torch.optim.Optimizer | None = None,
                on_empty_batch: Callable[[], None] | None = None,
                before_step: Callable[[torch.optim.Optimizer], None] | None = None) -> TrainResult:
    """Train the trainable parameters for ``steps`` optimizer steps or ``epochs`` passes.

    ``optimizer`` lets a caller pass one it built (Opacus' DPOptimizer); otherwise ``optim``
    builds one over ``requires_grad`` parameters. Empty batches (Poisson sampling) are skipped,
    unless ``on_empty_batch`` is given: then it is called instead of the forward/backward pass and
    the batch still counts as a micro-batch, so the optimizer step is taken and counted (with
    Opacus: a noise-only step, which is what its accountant assumes for an empty Poisson draw).
    ``before_step(optimizer)`` runs after the gradients are in, before each optimizer step (a
    decoupled regulariser: ``fedlora.client.RankSelfPruning``).
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs=")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    dev = resolve_device(device)
    model.to(dev).train()
    opt = optimizer or (optim or OptimConfig()).build(trainable_parameters(model))
    t0 = time.perf_counter()
    batches: Iterable = _cycle(loader) if steps is not None else (
        b for _ in range(epochs) for b in loader)
    total_loss, n_examples, n_steps, micro, n_loss = 0.0, 0, 0, 0, 0
    opt.zero_grad(set_to_none=True)
    for batch in batches:
        if steps is not None and n_steps >= steps:
            break
        if batch["labels"].shape[0] == 0:
            if on_empty_batch is None:
                continue
            on_empty_batch()
        else:
            loss, n = _forward(model, batch, dev)
            (loss / grad_accum).backward()
            total_loss += loss.item()
            n_loss += 1
            n_examples += n
        micro += 1
        if micro == grad_accum:
            if before_step is not None:
                before_step(opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            micro = 0
            n_steps += 1
    if micro:  # an epoch ended inside an accumulation window
        if before_step is not None:
            before_step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_steps += 1
    return TrainResult(total_loss / max(n_loss, 1), n_examples, n_steps,
                       time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict],
             device: str | torch.device = "auto") -> EvalResult:
    """Mean cross-entropy and accuracy over the loader (per example for class labels, per scored
    token for a causal LM's token labels)."""
    dev = resolve_device(device)
    model.to(dev).eval()
    total, correct, n, tokens = 0.0, 0, 0, 0
    for batch in loader:
        if batch["labels"].shape[0] == 0:
            continue
        inputs = {k: v.to(dev) for k, v in batch.items() if k != "labels"}
        labels = batch["labels"].to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = _logits(model(**inputs)).float()
        n += labels.shape[0]
        if labels.dim() == 1:
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
        else:
            nll, mask = token_nll(logits, labels)
            total += nll.sum().item()
            correct += ((logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask).sum().item()
            tokens += int(mask.sum().item())
    if n == 0:
        raise ValueError("the evaluation loader yielded no example")
    if labels.dim() == 2 and tokens == 0:
        raise ValueError("the evaluation loader yielded no scored token (every label is -100)")
    per = tokens if labels.dim() == 2 else n
    return EvalResult(total / per, correct / per, n, tokens)


def accumulate_weight_gradients(model: nn.Module, loader: Iterable[dict], layer_names: list[str],
                                batches: int = 2, device: str | torch.device = "auto",
                                ) -> dict[str, torch.Tensor]:
    """Σ over ``batches`` mini-batches of ∇_W (mean loss) for the frozen weight of each named layer.

    The Fed-SB (LoRA-SB) initialisation input. Adapters are bypassed (merged state untouched: the
    gradient is taken at ``W0 + D``, the layer's current frozen weight); nothing is updated.
    """
    from fedlora.lora import lora_layers

    dev = resolve_device(device)
    model.to(dev).train()
    layers = lora_layers(model)
    missing = [n for n in layer_names if n not in layers]
    if missing:
        raise ValueError(f"layers {missing} are not adapted layers of the model")
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in layer_names:
        layers[n].base.weight.requires_grad_(True)
        layers[n].base.weight.grad = None
        layers[n]._w_eff = None
    seen = 0
    try:
        for batch in loader:
            if seen >= batches:
                break
            if batch["labels"].shape[0] == 0:
                continue
            loss, _ = _forward(model, batch, dev)
            loss.backward()
            seen += 1
        if seen == 0:
            raise ValueError("the loader yielded no batch for the gradient accumulation")
        return {n: layers[n].base.weight.grad.detach().float().cpu().clone() for n in layer_names}
    finally:
        for n in layer_names:
            layers[n].base.weight.grad = None
            layers[n].base.weight.requires_grad_(False)
            layers[n]._w_eff = None
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A training step's activations are freed after it but glibc keeps the pages, so a long-lived
    process (a Ray actor serving many virtual clients, the server evaluating every round) would
    hold its peak forever: ~0.4 GB per MiniLM process. Likewise torch's cached CUDA blocks (Ray
    actors sharing one GPU). Called after local training and evaluation.
    """
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    if torch.cuda.is_available():  # and the GPU's cached blocks, for other processes on the same GPU
        torch.cuda.empty_cache()


_LIBC = None
