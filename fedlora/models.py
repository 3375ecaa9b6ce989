"""Model registry: ``get_model(name, **kw)``.

- ``tiny``: a seeded transformer sequence classifier built in code (tests, CI, smoke runs).
- ``minilm`` and ``hf:<path>``: pretrained Hugging Face encoders (``fedlora.hf_models``, needs the
  ``models`` extra).

Every model takes ``input_ids`` (B×T, long) and ``attention_mask`` (B×T, 1 = token) and returns
logits (B×C) — HF models return an output object with ``.logits``; ``fedlora.train`` accepts both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}
#: Default LoRA targets and trainable head per registered model name.
DEFAULT_TARGETS: dict[str, list[str]] = {}
DEFAULT_HEAD: dict[str, list[str]] = {}


def register_model(name: str, targets: list[str], head: list[str]):
    """Decorator: register a factory under ``name`` with its default LoRA targets and head."""

    def deco(fn: ModelFactory) -> ModelFactory:
        _REGISTRY[name] = fn
        DEFAULT_TARGETS[name] = targets
        DEFAULT_HEAD[name] = head
        return fn

    return deco


def available_models() -> list[str]:
    return sorted([*_REGISTRY, "minilm"]) + ["hf:<path>"]


def get_model(name: str, **kw) -> nn.Module:
    """Build a model by registry name (``tiny``, ``minilm``) or ``hf:<local folder>``."""
    if name.startswith("hf:") or name == "minilm":
        from fedlora import hf_models  # optional dependency: imported only when asked for

        return hf_models.get_hf_model(name, **kw)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    return _REGISTRY[name](**kw)


def default_targets(name: str, model: nn.Module | None = None) -> tuple[list[str], list[str]]:
    """``(lora targets, trainable head modules)`` for a model name."""
    if getattr(model, "fedlora_task", None) == "causal-lm":
        from fedlora import causal_lm

        return causal_lm.default_targets(model)
    if name.startswith("hf:") or name == "minilm":
        from fedlora import hf_models

        return hf_models.default_targets(model)
    return DEFAULT_TARGETS[name], DEFAULT_HEAD[name]


# ---- the tiny transformer ----------------------------------------------------------------------

@dataclass
class TinyConfig:
    vocab_size: int = 64
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 2
    d_ff: int = 64
    max_len: int = 32
    num_classes: int = 2


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o ``nn.Linear`` (adaptable, Opacus-friendly)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        att = att.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformerClassifier(nn.Module):
    """Embedding → pre-LN blocks (q/k/v/o + MLP) → masked mean pooling → linear ``head``."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t = input_ids.shape
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool())
        pos = torch.arange(t, device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)[None]
        for layer in self.layers:
            x = layer(x, mask)
        x = self.ln(x)
        m = mask[..., None].to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1).clamp_min(1.0))


@register_model("tiny", targets=["attn.q", "attn.v"], head=["head"])
def tiny(seed: int = 0, num_classes: int = 2, vocab_size: int = 64, d_model: int = 32,
         n_heads: int = 2, n_layers: int = 2, d_ff: int = 64, max_len: int = 32,
         dtype: torch.dtype = torch.float32, **_: object) -> TinyTransformerClassifier:
    """The tiny classifier, weights drawn from ``seed`` (same seed → same weights everywhere)."""
    cfg = TinyConfig(vocab_size, d_model, n_heads, n_layers, d_ff, max_len, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyTransformerClassifier(cfg)
    return model.to(dtype)
