"""The causal-LM task's model side: a local transformers causal LM, ready for fedlora's LoRA.

``model.task = "causal-lm"`` with ``model.name = "hf:<folder>"`` (any local transformers
checkpoint whose ``architectures`` is a ``*ForCausalLM`` / ``*LMHeadModel``): loaded with
``AutoModelForCausalLM`` from the folder only, no hub.

**GPT-2's ``Conv1D``.** GPT-2 stores its projections as ``transformers.pytorch_utils.Conv1D``
with the weight transposed (``y = x·W + b``, ``W`` of shape in×out). fedlora's ``LoRALinear``
adapts ``nn.Linear`` (``y = x·Wᵀ + b``), so each ``Conv1D`` is replaced at load by the
``nn.Linear`` with weight ``Wᵀ`` — the same function. Every delta (``ΔW = s·B·A``, out×in) and
every base fold then has the ``nn.Linear`` orientation; the PEFT export declares
``fan_in_fan_out = true`` for these modules (PEFT transposes ``B·A`` onto the ``Conv1D``), and
the merged export turns the merged ``nn.Linear`` back into a ``Conv1D`` with ``W + ΔWᵀ``
(``restore_conv1d``). The names of the converted modules are kept in ``model.fedlora_conv1d``.

Default LoRA targets by architecture (``lora.targets`` overrides; adding the MLP is
``targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]``):
Llama / Mistral / Qwen / Gemma: the attention's ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``;
GPT-2: ``attn.c_attn``, ``attn.c_proj``. No head is trained (the LM head is the frozen, usually
tied, embedding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

#: Device types a quantized base (``model.quantize``) is loaded on. bitsandbytes (>= 0.48) also runs
#: its 4-bit and 8-bit layers on the CPU, slowly: the tests add "cpu" here to run the QLoRA path on a
#: machine without a GPU; users train a quantized base on CUDA.
QUANTIZE_DEVICES: tuple[str, ...] = ("cuda",)

_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
CAUSAL_TARGETS: dict[str, list[str]] = {
    **{t: _ATTENTION for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                               "gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3")},
    "gpt2": ["attn.c_attn", "attn.c_proj"],
}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def architectures(path: Path) -> list[str]:
    try:
        return list(json.loads((Path(path) / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


def is_causal_lm(path: Path) -> bool:
    """Whether the checkpoint folder declares a causal-LM architecture (config.json)."""
    return any(a.endswith(CAUSAL_SUFFIXES) for a in architectures(path))


def packs_rows(path: Path) -> bool:
    """Whether the checkpoint's architecture can keep packed rows apart: its ``forward`` takes
    ``position_ids`` (``fedlora.lm_data``'s packed batches; BLOOM and MPT, say, do not). An
    architecture this transformers does not know is given the benefit of the doubt."""
    import inspect

    import transformers

    classes = [getattr(transformers, a, None) for a in architectures(path)]
    return all(c is None or "position_ids" in inspect.signature(c.forward).parameters for c in classes)


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` by the equivalent ``nn.Linear`` (weight transposed); their names."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None,
                        device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        lin.weight.requires_grad_(conv.weight.requires_grad)
        setattr(parent, child, lin)
    return names


def restore_conv1d(model: nn.Module, names: list[str]) -> None:
    """The inverse of ``conv1d_to_linear`` for the named (plain, merged) ``nn.Linear`` modules."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name}: expected a merged nn.Linear, got {type(lin).__name__}")
        conv = Conv1D(lin.out_features, lin.in_features)
        with torch.no_grad():
            conv.weight.copy_(lin.weight.t())
            if lin.bias is not None:
                conv.bias.copy_(lin.bias)
            else:
                conv.bias.zero_()
        setattr(parent, child, conv.to(lin.weight.dtype))


def load_model(path: Path, num_layers: int | None = None, dtype: torch.dtype = torch.float32,
               dropout: float | None = None, gradient_checkpointing: bool = False,
               quantize: str = "", device: str | torch.device | None = None) -> nn.Module:
    """``AutoModelForCausalLM`` from a local folder, GPT-2's ``Conv1D`` as ``nn.Linear``.

    ``num_layers`` keeps the first layers only (tests, quick runs); ``dropout`` overrides the
    checkpoint's; ``gradient_checkpointing`` trades compute for activation memory;
    ``quantize`` (``"4bit"``/``"8bit"``, CUDA and bitsandbytes only) loads the frozen base
    quantized (QLoRA) onto the CUDA ``device`` (ignored without ``quantize``); ``dtype`` is the
    precision of the (other) frozen weights — bfloat16 halves a base's memory, and LoRA adapters on
    it still train in float32 (``fedlora.lora.LoRALinear``).
    """
    from fedlora.hf_models import _DROPOUT_ATTRS, _quiet_transformers, _transformers

    transformers = _transformers()
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if num_layers is not None:
        for attr in ("num_hidden_layers", "n_layer"):
            total = getattr(config, attr, None)
            if total is not None:
                if not 1 <= int(num_layers) <= total:
                    raise ValueError(f"num_layers must be in 1..{total} for {str(path)!r}, got {num_layers}")
                setattr(config, attr, int(num_layers))
                break
        else:
            raise ValueError(f"{str(path)!r}: its config has no layer count; leave num_layers unset")
    if dropout is not None:
        for attr in (*_DROPOUT_ATTRS, "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if isinstance(getattr(config, attr, None), float | int):
                setattr(config, attr, float(dropout))
    config.use_cache = False  # training never needs a KV cache (generation turns it on)
    kw: dict = {"config": config, "local_files_only": True, "dtype": dtype}
    if quantize:  # the quantized projections' compute dtype is bf16; the rest of the model is dtype
        dev = torch.device(device) if device is not None else torch.device("cuda")
        if dev.type not in QUANTIZE_DEVICES:
            raise ValueError(f"model.quantize = {quantize!r} needs a CUDA device, but this client's is "
                             f"{str(dev)!r}: set clients.device = 'cuda' (or the node's device), or "
                             "model.quantize = ''")
        kw["quantization_config"] = quantization_config(quantize)
        if dev.type == "cuda":  # the client's GPU
            kw["device_map"] = {"": dev.index if dev.index is not None else torch.cuda.current_device()}
        else:
            kw["device_map"] = {"": str(dev)}
    with _quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw)
    if quantize and torch.device(device or "cuda").type == "cpu":
        for m in model.modules():
            # bitsandbytes repacks a CPU 4-bit weight for inference at its first no-grad eval pass
            # (on AVX512-BF16 CPUs), after which backward drops the input's gradient (its gemv_4bit
            # has no autograd): a client evaluates and trains the same model, so keep one layout
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: let gradients reach the adapters
    model.fedlora_conv1d = conv1d_to_linear(model)
    model.fedlora_name = f"hf:{path}"
    model.fedlora_task = "causal-lm"
    return model


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """A frozen base's dtype on ``device`` for ``model.dtype = "auto"``: bfloat16 on a CUDA GPU with
    native bf16 (compute capability 8.0, Ampere, or newer; older ones only emulate it, slowly),
    float32 elsewhere."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(dev) >= (8, 0) else torch.float32


def quantization_config(quantize: str):
    """bitsandbytes' config for a 4-bit (NF4, bf16 compute) or 8-bit frozen base; a clear error where
    it cannot run (``model.quantize`` needs CUDA and the bitsandbytes package)."""
    import importlib.util

    if quantize not in ("4bit", "8bit"):
        raise ValueError(f"model.quantize must be '', '4bit' or '8bit', got {quantize!r}")
    if not torch.cuda.is_available() and "cpu" not in QUANTIZE_DEVICES:
        raise ValueError(f"model.quantize = {quantize!r} needs a CUDA GPU (none here): set "
                         "model.quantize = ''")
    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"model.quantize = {quantize!r} needs {' and '.join(missing)}: "
                         'pip install -e ".[quantize]"')
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


def default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(lora targets, trainable head)`` of a causal LM by ``config.model_type``; no head."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in CAUSAL_TARGETS:
        return list(CAUSAL_TARGETS[mtype]), []
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if set(_ATTENTION) <= names:  # an unlisted Llama-style architecture
        return list(_ATTENTION), []
    raise ValueError(f"no default LoRA targets for causal LM architecture {mtype!r}: set lora.targets "
                     f"(nn.Linear module names here: {sorted(names)})")
