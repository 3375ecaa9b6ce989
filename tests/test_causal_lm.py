"""model.task = "causal-lm": tiny Llama / GPT-2 checkpoints built in code, every strategy through the
real apps, the masked loss against a hand computation, GPT-2's Conv1D orientation against the direct
formula, the row formats, bad input named before training, and exports that PEFT / transformers load
and that generate what fedlora's global model generates."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import lm_helpers  # noqa: E402

from fedlora import causal_lm, lm_data  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.hf_models import get_tokenizer  # noqa: E402
from fedlora.lora import LoRAConfig, inject_lora, lora_layers  # noqa: E402
from fedlora.train import _loss, evaluate, token_nll  # noqa: E402

STRATEGIES = ["fedavg", "fedex", "flora", "fedsb", "fedsa", "ffa", "rolora", "fedsvd", "flexlora", "hetlora"]


def _cfg(model_dir: Path, data: Path, run_dir: Path, *sets: str):
    return load_config(None, [
        'model.task="causal-lm"', f"model.name={json.dumps(f'hf:{model_dir}')}",
        f"data.name={json.dumps(str(data))}", "data.max_length=32", "data.server_examples=6",
        "data.val_fraction=0.2", "clients.num=3", "clients.ranks=[2,4]", "rounds=2", "train.local_steps=6",
        "train.batch_size=8", "train.lr=0.01", "eval.batch_size=16", f"run_dir={json.dumps(str(run_dir))}",
        "strategy.fedsb_init_examples=6", "strategy.fedsb_init_batches=1", *sets])


# ---- the loss, the orientation, the formats ---------------------------------------------------------

def test_the_masked_loss_is_the_mean_over_sequences_of_their_response_tokens_nll():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 4, 5, 1, -100], [-100, 7, 7, 2, 3, 9],
                           [-100, -100, -100, -100, 0, 1]])
    per_seq = []
    for b in range(3):
        terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for t in range(5)
                 if labels[b, t + 1] != -100]
        per_seq.append(sum(terms) / len(terms))
    assert _loss(logits, labels).item() == pytest.approx((sum(per_seq) / 3).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_token_nll_is_the_direct_per_token_formula_also_for_bf16_and_an_unscored_row(dtype):
    """Position t's logits score token t+1; -100 is not scored (a row of only -100 scores nothing);
    bf16 logits are scored in float32; the gradient is the direct formula's."""
    from fedlora.train import token_nll

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 13, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    labels = torch.tensor([[-100, 2, 5, -100, 7, 1, 0], [-100] * 7, [4, 4, -100, -100, 12, 3, 9]])
    nll, mask = token_nll(logits, labels)
    ref = logits.detach().double().requires_grad_(True)
    want = torch.zeros(3, 6, dtype=torch.float64)
    for b in range(3):
        for t in range(6):
            if labels[b, t + 1] != -100:
                want[b, t] = -torch.log_softmax(ref[b, t], -1)[labels[b, t + 1]]
    assert torch.equal(mask, labels[:, 1:] != -100) and nll.shape == (3, 6)
    assert nll.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(nll.double(), want.detach(), rtol=tol, atol=tol)
    assert torch.all(nll[1] == 0)
    nll.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad, rtol=tol, atol=1e-2 if dtype == torch.bfloat16
                               else tol)


def test_gpt2_conv1d_adapters_and_folds_equal_the_direct_formula(tmp_path):
    """fedlora's GPT-2 (Conv1D as nn.Linear) computes the checkpoint's function; with an adapter
    (s·B·A, out×in) and a folded base delta D it equals the original Conv1D model whose weight
    (in×out) got (D + s·B·A)ᵀ added — the orientation every fold and export relies on."""
    from transformers import GPT2LMHeadModel

    path = lm_helpers.gpt2(tmp_path / "g")
    ours = causal_lm.load_model(path, dtype=torch.float64).eval()
    ref = GPT2LMHeadModel.from_pretrained(str(path), dtype=torch.float64).eval()
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-10)
    assert ours.fedlora_conv1d
    assert all(isinstance(ours.get_submodule(n), torch.nn.Linear) for n in ours.fedlora_conv1d)
    names = inject_lora(ours, LoRAConfig(targets=["attn.c_attn", "attn.c_proj"], rank=3, scale=0.7, seed=0))
    g = torch.Generator().manual_seed(2)
    layers = lora_layers(ours)
    with torch.no_grad():
        for n in names:
            lin = layers[n]
            b = torch.randn(lin.lora_b.weight.shape, generator=g, dtype=torch.float64) * 0.1
            lin.lora_b.weight.copy_(b)
            d = torch.randn(lin.base.weight.shape, generator=g, dtype=torch.float64) * 0.05
            lin.fold_into_base_(d)
            conv = ref.get_submodule(n)
            full = d + 0.7 * lin.lora_b.weight @ lin.lora_a.weight
            conv.weight.add_(full.t())
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-9)


def test_formats_mask_the_prompt_and_end_with_eos(tmp_path):
    tok = lm_helpers.tokenizer(tmp_path / "t")
    chat_tok = lm_helpers.tokenizer(tmp_path / "c", chat_template=(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"))
    cases = [
        ("alpaca", {"instruction": "the king", "input": "one", "output": "two three"}, tok,
         lm_data.ALPACA_TEMPLATE.format(with_input=", paired with an input that provides further context",
                                        instruction="the king", input_block="### Input:\none\n\n"),
         "two three"),
        ("prompt-completion", {"prompt": "the fool", "completion": " laughs"}, tok, "the fool", " laughs"),
        ("text", {"text": "the ghost walks"}, tok, "", "the ghost walks"),
        ("chat", {"messages": [{"role": "user", "content": "the queen"},
                               {"role": "assistant", "content": "six"}]},
         chat_tok, "[user] the queen\n[assistant]", "six"),
    ]
    for fmt, row, t, prompt, response in cases:
        assert lm_data.detect_format(list(row)) == fmt
        ds = lm_data.tokenize([row], fmt, t, max_length=200)
        p_ids = t(prompt, add_special_tokens=fmt != "chat")["input_ids"]
        r_ids = t(response, add_special_tokens=False)["input_ids"] + [t.eos_token_id]
        assert ds.input_ids[0].tolist() == p_ids + r_ids, fmt
        assert ds.labels[0].tolist() == [-100] * len(p_ids) + r_ids, fmt


def test_truncation_empty_responses_and_packing(tmp_path):
    tok = lm_helpers.tokenizer(tmp_path / "t")
    long_prompt = {"prompt": "the king " * 30, "completion": " one"}
    ok = {"prompt": "the", "completion": " two three"}
    ds = lm_data.tokenize([ok, ok, {"prompt": "x", "completion": "  "}, long_prompt], "prompt-completion",
                          tok, 16)
    assert len(ds) == 2 and ds.skipped == {"empty_response": 1, "no_response_token_after_truncation": 1}
    assert all(len(x) <= 16 for x in ds.input_ids)
    with pytest.raises(ValueError, match=r"raise data.max_length \(now 16\)"):
        lm_data.tokenize([long_prompt, long_prompt, ok], "prompt-completion", tok, 16)
    plain = lm_data.tokenize([ok] * 5, "prompt-completion", tok, 64)
    packed = lm_data.tokenize([ok] * 5, "prompt-completion", tok, 8, packing=True)
    assert all(len(x) == 8 for x in packed.input_ids[:-1])
    # the packed blocks are the plain rows' stream cut every 8 tokens (a last block with nothing to
    # predict — its first token is never a target — is dropped); each row's first label is masked and
    # positions restart at 0 where a row starts and where a row goes on in a new block
    stream_ids = torch.cat(plain.input_ids).tolist()
    stream_lab = torch.cat([torch.cat([torch.tensor([-100]), x[1:]]) for x in plain.labels]).tolist()
    row_start = [i for i, x in enumerate(plain.input_ids) for _ in x]
    starts = torch.cumsum(torch.tensor([0] + [len(x) for x in plain.input_ids]), 0).tolist()
    stream_pos = [i - max(starts[row_start[i]], i - i % 8) for i in range(len(stream_ids))]
    assert max(stream_pos) < 8 and stream_pos.count(0) > len(plain)  # (rows do span blocks here)
    n = sum(len(x) for x in packed.input_ids)
    assert 0 < len(stream_ids) - n < 8 or n == len(stream_ids)
    assert torch.cat(packed.input_ids).tolist() == stream_ids[:n]
    assert torch.cat(packed.labels).tolist() == stream_lab[:n]
    assert torch.cat(packed.position_ids).tolist() == stream_pos[:n]
    batch = lm_data.LMCollator(tok.pad_token_id)([packed[len(packed) - 1], packed[0]])
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_row_is_scored_exactly_as_alone(tmp_path, arch):
    """Rows packed into one block: every scored token's NLL equals the row's own forward (float64) —
    attention does not cross rows. Without the position ids it would (checked last)."""
    model_dir = getattr(lm_helpers, arch)(tmp_path / "m")
    tok = get_tokenizer(f"hf:{model_dir}")
    model = causal_lm.load_model(model_dir, dtype=torch.float64).eval()
    rows = [{"prompt": "the king", "completion": " said one two"}, {"prompt": "a", "completion": " three"},
            {"prompt": "and the queen of", "completion": " four five six seven"}]
    alone = lm_data.tokenize(rows, "prompt-completion", tok, 64)
    packed = lm_data.tokenize(rows, "prompt-completion", tok, 64, packing=True)
    assert len(packed) == 1 and packed.input_ids[0].numel() == sum(x.numel() for x in alone.input_ids)

    def scored_nll(ds, drop=()):
        batch = lm_data.LMCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k not in drop}).logits
        nll, mask = token_nll(logits, labels)
        return torch.cat([nll[b][mask[b]] for b in range(len(ds))])

    want = scored_nll(alone)
    got = scored_nll(packed)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-10)
    assert not torch.allclose(scored_nll(packed, drop=("position_ids",)), want, rtol=0, atol=1e-6)
    # a row far longer than a block (and than GPT-2's 256 positions) packs with positions < max_length
    long = lm_data.tokenize([{"text": " ".join(lm_helpers.WORDS * 12)}], "text", tok, 32, packing=True)
    assert len(long) > 8 and max(int(p.max()) for p in long.position_ids) == 31
    assert torch.isfinite(scored_nll(long)).all()


# ---- bad input, before training -----------------------------------------------------------------------

def test_bad_input_is_named_before_anything_starts(tmp_path, llama_dir, data_file):
    bad = lm_helpers.write_jsonl(tmp_path / "bad.jsonl",
                                 [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match=r"row 2 has no 'completion'"):
        _cfg(llama_dir, bad, tmp_path / "r")
    odd = lm_helpers.write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}] * 3)
    with pytest.raises(ValueError, match=r"no known row format in the columns \['question', 'answer'\]"):
        _cfg(llama_dir, odd, tmp_path / "r")
    with pytest.raises(ValueError, match=r"data.format: must be 'auto' or one of"):
        _cfg(llama_dir, data_file, tmp_path / "r", 'data.format="yaml"')
    msg = r"model.name: model.task = 'causal-lm' needs a local causal-LM"
    with pytest.raises(ValueError, match=msg) as e:
        load_config(None, ['model.task="causal-lm"', 'model.name="tiny"',
                           f"data.name={json.dumps(str(data_file))}"])
    assert "`fedlora shakespeare prepare` builds" in str(e.value)  # a command that exists
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match=r"is not a causal LM \(config.json architectures \['BertModel'\]"):
        _cfg(tmp_path / "bert", data_file, tmp_path / "r")
    with pytest.raises(ValueError,
                       match=r"gives 3 clients \(one per value\), but clients.num = 4: set clients.num = 3"):
        _cfg(llama_dir, data_file, tmp_path / "r", 'data.partition="natural"', 'data.partition_by="who"',
             "clients.num=4")
    msg = (r"data.server_examples: the server holds out 12 of the 120 rows; 12 evaluation rows plus "
           r"strategy.fedsb_init_examples=6 init rows need 18")
    with pytest.raises(ValueError, match=msg):
        _cfg(llama_dir, data_file, tmp_path / "r", 'strategy.name="fedsb"', "data.server_examples=12")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"model.quantize = '4bit' needs a CUDA GPU"):
            _cfg(llama_dir, data_file, tmp_path / "r", 'model.quantize="4bit"', 'clients.device="cuda"')
    sim = _cfg(llama_dir, data_file, tmp_path / "r")  # (a deployment's nodes choose their own device)
    sim.model.quantize = "4bit"
    with pytest.raises(ValueError, match=r"model.quantize: a 4bit base is on a CUDA GPU, but clients.device"):
        sim.check_simulation_device()
    with pytest.raises(ValueError, match=r"model.quantize = '4bit' needs a CUDA device, but this client"):
        causal_lm.load_model(llama_dir, quantize="4bit", device="cpu")
    with pytest.raises(ValueError, match=r"model.gradient_checkpointing: cannot be combined with privacy"):
        _cfg(llama_dir, data_file, tmp_path / "r", "model.gradient_checkpointing=true",
             "privacy.enabled=true", "privacy.noise_multiplier=1.0")
    bloom = tmp_path / "bloom"
    bloom.mkdir()
    (bloom / "config.json").write_text(json.dumps({"architectures": ["BloomForCausalLM"],
                                                   "model_type": "bloom"}))
    with pytest.raises(ValueError, match=r"data.packing: \['BloomForCausalLM'\] takes no position ids"):
        _cfg(bloom, data_file, tmp_path / "r", "data.packing=true")
    assert causal_lm.packs_rows(llama_dir) and causal_lm.packs_rows(lm_helpers.gpt2(tmp_path / "g"))
    with pytest.raises(ValueError, match=r"data.packing: cannot be combined with privacy"):
        _cfg(llama_dir, data_file, tmp_path / "r", "data.packing=true",
             "privacy.enabled=true", "privacy.noise_multiplier=1.0")


# ---- runs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_a_tiny_llama_through_the_real_apps(tmp_path, llama_dir, data_file, strategy):
    from fedlora.loopback import run_loopback

    cfg = _cfg(llama_dir, data_file, tmp_path / strategy, f'strategy.name="{strategy}"',
               'data.partition="natural"', 'data.partition_by="who"')
    summary = run_loopback(cfg)
    rows = [json.loads(x) for x in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(c["accepted"] for r in rows for c in r["clients"]) and len(rows[0]["clients"]) == 3
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # it learns
    assert summary["metric"] == "perplexity"
    if strategy == "fedsa":  # no global model: the perplexity of the clients' own models on their shards
        pers = [(c["metrics"]["eval-loss"], c["metrics"]["eval-examples"]) for c in rows[-1]["clients"]]
        want = math.exp(sum(a * n for a, n in pers) / sum(n for _, n in pers))
        assert summary["final_perplexity"] == pytest.approx(want, rel=1e-9)
    else:
        assert summary["final_perplexity"] == pytest.approx(math.exp(rows[-1]["loss"]), rel=1e-9)
        assert summary["best_perplexity"] == min(r["perplexity"] for r in rows)
        assert rows[-1]["perplexity"] < rows[0]["perplexity"] * 1.05


def test_a_packed_run_learns_and_its_blocks_reach_the_model_with_position_ids(tmp_path, llama_dir, data_file,
                                                                               monkeypatch):
    from transformers import LlamaForCausalLM

    from fedlora.loopback import run_loopback

    seen: list[set] = []
    forward = LlamaForCausalLM.forward

    @functools.wraps(forward)  # (its signature is checked: packing needs position_ids)
    def spy(self, *a, **kw):
        seen.append({k for k, v in kw.items() if v is not None})
        return forward(self, *a, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "forward", spy)
    cfg = _cfg(llama_dir, data_file, tmp_path / "run", "data.packing=true", 'strategy.name="fedex"')
    run_loopback(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["perplexity"] > 1
    batches = [k for k in seen if "input_ids" in k]
    assert batches and all("position_ids" in k and "attention_mask" not in k for k in batches)


def test_simulate_tokenises_every_clients_rows_first_and_says_what_was_lost(tmp_path, llama_dir):
    """A client whose rows leave nothing to learn from is a config error naming it (it used to fail
    every round while the run went on); rows skipped or cut are said on the terminal and in each
    client's metrics."""
    from typer.testing import CliRunner

    from fedlora.cli import app

    rows = lm_helpers.rows()
    for i, r in enumerate(rows):
        if r["who"] == "fool":
            r["completion"] = " "  # the fool says nothing
        elif i % 10 == 0:
            r["completion"] = ""
    bad = lm_helpers.write_jsonl(tmp_path / "bad.jsonl", rows)
    sets = ['model.task="causal-lm"', f"model.name={json.dumps(f'hf:{llama_dir}')}",
            "data.max_length=32", "data.server_examples=6", "data.val_fraction=0", 'data.partition="natural"',
            'data.partition_by="who"', "clients.num=3", "clients.ranks=[2]", "rounds=1",
            "train.local_steps=2", "train.batch_size=8"]

    def simulate(data, run, *more):
        args = ["simulate", "--engine", "inprocess", "--set", f"data.name={json.dumps(str(data))}",
                "--set", f"run_dir={json.dumps(str(tmp_path / run))}"]
        for x in [*sets, *more]:
            args += ["--set", x]
        res = CliRunner().invoke(app, args)
        return res.exit_code, " ".join(res.output.split())

    code, out = simulate(bad, "bad")
    assert code == 2 and "config error" in out and "client 0's data:" in out, out  # "fool" sorts first
    assert "raise data.max_length" in out and not (tmp_path / "bad").exists()
    rows = [r for r in rows if r["who"] != "fool"]
    for r in rows[:12]:
        r["prompt"] = "the king " * 4 + r["prompt"]  # long prompts: their responses get cut
    some = lm_helpers.write_jsonl(tmp_path / "some.jsonl", rows)
    code, out = simulate(some, "some", "clients.num=2")
    assert code == 0, out
    skipped = sum(1 for r in rows if not r["completion"].strip())
    assert f"rows skipped: {skipped} empty response" in out and "responses cut at data.max_length = 32" in out
    line = json.loads((tmp_path / "some" / "metrics.jsonl").read_text().splitlines()[0])
    got = sum(c["metrics"]["data-skipped"] for c in line["clients"])
    assert 0 < got <= skipped and sum(c["metrics"]["data-truncated"] for c in line["clients"]) > 0


@pytest.mark.parametrize("strategy", ["flora", "rolora"])
def test_a_causal_lm_run_repeats_bit_for_bit_also_killed_and_resumed(tmp_path, llama_dir, data_file,
                                                                     strategy):
    """Same seed and config, same bits: an uninterrupted run against one whose server died after
    round 2 and was resumed (fresh clients; FLoRA's fresh A and RoLoRA's seeded A travel as seeds)."""
    from safetensors.torch import load_file

    from fedlora.loopback import run_loopback

    def cfg(name):
        return _cfg(llama_dir, data_file, tmp_path / name, f'strategy.name="{strategy}"', "rounds=3",
                    "train.local_steps=3", "lora.dropout=0.1")

    run_loopback(cfg("full"))
    assert run_loopback(cfg("cut"), stop_after_round=2)["stopped"]
    run_loopback(cfg("cut"), resume=True)
    a = load_file(str(tmp_path / "full" / "global_delta.safetensors"))
    b = load_file(str(tmp_path / "cut" / "global_delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("full", "cut")]
    assert [r["perplexity"] for r in rows[0]] == [r["perplexity"] for r in rows[1]]


def test_generations_are_written_and_the_report_knows_lower_is_better(tmp_path, llama_dir, data_file):
    from fedlora.loopback import run_loopback
    from fedlora.report import load_run, table

    cfg = _cfg(llama_dir, data_file, tmp_path / "run", "eval.generate=3", "eval.max_new_tokens=4")
    run_loopback(cfg)
    gens = [json.loads(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [g["round"] for g in gens] == [1, 1, 1, 2, 2, 2]
    assert all(g["prompt"].startswith("the king") for g in gens)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["gen_contains"] <= 1 for r in rows)
    s = load_run(tmp_path / "run")
    assert s.metric == "perplexity" and not s.higher_is_better
    line = table([s]).splitlines()
    assert "final ppl" in line[0] and f"{min(r['perplexity'] for r in rows):.4f}" in line[2]


def test_plain_text_rows_generate_their_second_half_from_the_first(tmp_path, data_file):
    """A `text` row has no prompt: the generation check continues its first half of words (GPT-2's
    tokenizer adds no BOS, so an empty prompt would give generate() no token at all)."""
    from fedlora.loopback import run_loopback

    tok = lm_helpers.tokenizer(tmp_path / "t")
    assert lm_data.generation_prompt({"text": "the king  speaks to the"}, "text", tok) == \
        ("the king", "  speaks to the", False)
    assert lm_data.generation_prompt({"text": "one"}, "text", tok) == ("one", "", False)
    texts = lm_helpers.write_jsonl(tmp_path / "text.jsonl", [
        {"text": r["prompt"] + r["completion"], "who": r["who"]} for r in lm_helpers.rows()])
    cfg = _cfg(lm_helpers.gpt2(tmp_path / "gpt2"), texts, tmp_path / "run", "eval.generate=2",
               "eval.max_new_tokens=3", 'lora.targets=["attn.c_attn"]')
    run_loopback(cfg)
    gens = [json.loads(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4
    assert all(g["prompt"] and g["reference"] and isinstance(g["output"], str) for g in gens)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(c["accepted"] for r in rows for c in r["clients"])


def test_exports_load_in_peft_and_transformers_and_generate_the_same_tokens(tmp_path, data_file):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from fedlora.client import load_global
    from fedlora.export import export_merged, load_run
    from fedlora.loopback import run_loopback
    from fedlora.rundata import build_base, inject

    for kind in ("llama", "gpt2"):
        model_dir = getattr(lm_helpers, kind)(tmp_path / kind)
        run = tmp_path / f"run-{kind}"
        targets = ['lora.targets=["attn.c_attn", "attn.c_proj"]'] if kind == "gpt2" else []
        run_loopback(_cfg(model_dir, data_file, run, 'strategy.name="fedex"', *targets))
        cfg, fl, _, _ = load_run(run)
        ours = build_base(cfg.client_spec())
        inject(cfg.client_spec(), ours, fl.r_max)
        load_global(ours, fl)
        ours.eval()
        ids = torch.tensor([[5, 17, 30, 8, 40]])
        want = ours(input_ids=ids).logits
        adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert adapter["task_type"] == "CAUSAL_LM" and adapter["fan_in_fan_out"] == (kind == "gpt2")
        base = AutoModelForCausalLM.from_pretrained(str(model_dir))
        pm = peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        mask = torch.ones_like(ids)
        assert pm.generate(input_ids=ids, attention_mask=mask, **greedy).tolist() == \
            ours.generate(input_ids=ids, attention_mask=mask, use_cache=True, **greedy).tolist()
        folder = export_merged(run, tmp_path / f"merged-{kind}")
        merged = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
        assert (tmp_path / f"merged-{kind}" / "tokenizer.json").is_file()


def test_eval_reports_token_level_perplexity(tmp_path, llama_dir):
    tok = lm_helpers.tokenizer(tmp_path / "t")
    model = causal_lm.load_model(llama_dir).eval()
    ds = lm_data.tokenize(lm_helpers.rows(10), "prompt-completion", tok, 32)
    ev = evaluate(model, lm_data.make_loader(ds, 4, False), device="cpu")
    nll, n = 0.0, 0
    with torch.no_grad():
        for x, y in zip(ds.input_ids, ds.labels):
            logits = model(input_ids=x[None]).logits[0]
            for t in range(len(x) - 1):
                if y[t + 1] != -100:
                    nll -= torch.log_softmax(logits[t].double(), -1)[y[t + 1]].item()
                    n += 1
    assert ev.tokens == n and ev.loss == pytest.approx(nll / n, rel=1e-5)
    assert ev.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dp_on_a_causal_lm_clips_per_sample_adapter_gradients_and_accounts_like_opacus(
        tmp_path, llama_dir, monkeypatch, dtype):
    """Opacus on a Llama with LoRA (float32 or bf16 base): the per-sample gradients are those of the
    adapters alone (their mean is the ordinary batch gradient), each is clipped to C, and ε is a
    fresh accountant's."""
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

    from fedlora.privacy import PrivacyConfig, PrivacyState, train_private
    from fedlora.train import OptimConfig

    seen: list[dict] = []
    clip0 = DPOptimizer.clip_and_accumulate

    def clip(self):
        seen.append({"raw": [g.detach().clone() for g in self.grad_samples],
                     "plain": [p.grad.detach().clone() for p in self.params]})
        clip0(self)
        seen[-1]["summed"] = [p.summed_grad.detach().clone() for p in self.params]

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip)
    tok = lm_helpers.tokenizer(tmp_path / "t")
    model = causal_lm.load_model(llama_dir, dtype=dtype)
    inject_lora(model, LoRAConfig(targets=["q_proj", "v_proj"], rank=4, scale=1.0, seed=0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ds = lm_data.tokenize(lm_helpers.rows(100), "prompt-completion", tok, 32)
    C = 0.01
    cfg = PrivacyConfig.from_dict({"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": C})
    res = train_private(model, ds, cfg=cfg, state=PrivacyState(), batch_size=10, steps=3,
                        planned_total_steps=3, optim=OptimConfig(lr=1e-2), device="cpu",
                        collate_fn=lm_data.LMCollator(ds.pad_token_id), seed=0)
    assert res.train.steps == 3 and len(seen) >= 1
    for s in seen:
        b = s["raw"][0].shape[0]
        assert len(s["raw"]) == len(trainable)
        for raw, plain in zip(s["raw"], s["plain"]):
            torch.testing.assert_close(raw.sum(0) / b, plain, atol=1e-6, rtol=1e-4)
        norms = torch.stack([g.reshape(b, -1).norm(dim=1) for g in s["raw"]], 1).norm(dim=1)
        assert (norms > C).any()
        factor = (C / (norms + 1e-6)).clamp(max=1.0)
        for raw, summed in zip(s["raw"], s["summed"]):
            torch.testing.assert_close(summed, torch.einsum("i,i...", factor, raw), atol=1e-8, rtol=1e-5)
    acc = RDPAccountant()
    acc.history = list(res.state.history)
    assert res.state.history == [(1.0, 10 / len(ds), 3)]
    assert res.epsilon == pytest.approx(acc.get_epsilon(delta=res.delta), rel=1e-12)


def test_a_causal_lm_run_on_flowers_engine_from_relative_paths(tmp_path, llama_dir, data_file):
    """`fedlora simulate` (Flower's engine, Ray) with the model folder and the data file given
    relative to the working directory, as a user would: the apps run elsewhere and still find them."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(llama_dir, tmp_path / "mymodel")
    shutil.copy(data_file, tmp_path / "rows.jsonl")
    sets = ['model.task="causal-lm"', 'model.name="hf:mymodel"', 'data.name="rows.jsonl"',
            "data.max_length=32", "data.server_examples=6", "clients.num=3", "clients.ranks=[2,4]",
            "rounds=2",
            "train.local_steps=4", "train.batch_size=8", 'run_dir="run"', 'data.partition="natural"',
            'data.partition_by="who"']
    cmd = [str(Path(sys.executable).with_name("fedlora")), "simulate"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["train_loss"] < rows[0]["train_loss"]
    assert "final perplexity" in res.stdout


def test_a_bf16_base_keeps_float32_adapters_and_deltas_and_computes_the_direct_formula():
    """model.dtype = "bfloat16": W0 stays bf16 and is never written; A, B and D are float32; outside
    autocast the layer computes bf16(W0 + D)·x + s·B·A·x with the adapter in float32."""
    from fedlora.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(24, 16, bias=True).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    lin = LoRALinear(base, rank=4, scale=0.5, seed=1)
    assert lin.lora_a.weight.dtype == lin.lora_b.weight.dtype == torch.float32
    B = torch.randn(16, 4, generator=g) * 0.1
    lin.set_factors_(B=B)
    d = torch.randn(16, 24, generator=g) * 0.01
    lin.fold_into_base_(d)
    assert lin.base_delta.dtype == torch.float32 and torch.equal(lin.base.weight, w0)
    x = torch.randn(3, 5, 24, generator=g).to(torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    A = lin.lora_a.weight.detach()
    frozen = torch.nn.functional.linear(x, (w0.float() + d).to(torch.bfloat16), base.bias)
    want = frozen.float() + (0.5 * x.float() @ A.t() @ B.t()).to(torch.bfloat16).float()
    torch.testing.assert_close(y.float(), want, rtol=0, atol=1e-2)
    y.float().pow(2).sum().backward()
    assert lin.lora_b.weight.grad.dtype == torch.float32 and lin.lora_b.weight.grad.abs().sum() > 0
    assert lin.base.weight.grad is None
    torch.testing.assert_close(lin.effective_weight(), w0.float() + d + 0.5 * B @ A, rtol=0, atol=0)


def test_model_dtype_picks_the_client_base_precision_and_the_server_stays_float32(tmp_path, llama_dir,
                                                                                data_file):
    from fedlora import rundata

    spec = _cfg(llama_dir, data_file, tmp_path / "r").client_spec()
    assert spec.model.dtype == "auto" and rundata.base_dtype(spec, "cpu") == torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert rundata.base_dtype(spec, "cuda") == torch.bfloat16
    else:  # no CUDA: auto stays float32 whatever the device name
        assert rundata.base_dtype(spec, "cuda") == torch.float32
    bf = _cfg(llama_dir, data_file, tmp_path / "r", 'model.dtype="bfloat16"').client_spec()
    assert rundata.base_dtype(bf, "cpu") == torch.bfloat16
    assert rundata.base_dtype(bf, "cpu", full_precision=True) == torch.float32
    model = rundata.build_base(bf, dtype=rundata.base_dtype(bf, "cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rundata.inject(bf, model, 4)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with pytest.raises(ValueError, match=r"model.dtype: must be 'auto', 'float32' or 'bfloat16', got 'fp8'"):
        _cfg(llama_dir, data_file, tmp_path / "r", 'model.dtype="fp8"')
    with pytest.raises(ValueError, match=r"model.dtype: a bfloat16 frozen base is for model.task = 'causal"):
        load_config(None, ['model.dtype="bfloat16"'])


def test_auto_picks_bf16_only_on_a_gpu_with_native_bf16(tmp_path, llama_dir, data_file, monkeypatch):
    from fedlora import rundata

    spec = _cfg(llama_dir, data_file, tmp_path / "r").client_spec()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, want in (((7, 0), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None, c=capability: c)
        assert rundata.base_dtype(spec, "cuda:0") == want  # a V100 emulates bf16: float32 there
    assert rundata.base_dtype(spec, "cpu") == torch.float32


@pytest.mark.parametrize("strategy", ["fedavg", "fedex", "flora"])
def test_clients_on_a_bf16_base_train_and_send_float32_updates(tmp_path, llama_dir, data_file, strategy):
    """A run whose clients hold a bf16 base (here on CPU): every update is accepted (float32 factors,
    the wire's checks), the loss falls, and the server's float32 model evaluates it."""
    from fedlora.loopback import run_loopback

    cfg = _cfg(llama_dir, data_file, tmp_path / strategy, 'model.dtype="bfloat16"',
               f'strategy.name="{strategy}"')
    run_loopback(cfg)
    rows = [json.loads(x) for x in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    assert all(c["accepted"] for r in rows for c in r["clients"]) and len(rows[0]["clients"]) == 3
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert math.isfinite(rows[-1]["perplexity"])
    from clients.app import _MODELS  # the loopback's ClientApp ran in this process

    (entry,) = _MODELS.values()
    frozen = {p.dtype for p in entry.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and entry.model_key.endswith("-bfloat16")


def test_a_centralized_baseline_of_a_natural_partition_is_one_pooled_client(tmp_path, llama_dir, data_file):
    from fedlora.compare import plan

    sets = ['model.task="causal-lm"', f"model.name={json.dumps(f'hf:{llama_dir}')}",
            f"data.name={json.dumps(str(data_file))}", 'data.partition="natural"', 'data.partition_by="who"',
            "clients.num=3", f"run_dir={json.dumps(str(tmp_path / 'cmp'))}"]
    _, runs = plan(None, ["fedavg", "fedex"], sets, centralized=True)
    assert [(n, c.clients.num, c.data.partition) for n, c in runs] == [
        ("fedavg", 3, "natural"), ("fedex", 3, "natural"), ("centralized", 1, "iid")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_training_on_cuda_lowers_the_loss(tmp_path, llama_dir, dtype):
    """bf16 autocast over a float32 base, and a bf16 base (model.dtype = "auto" on CUDA)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fedlora.train import OptimConfig, train_local

    tok = lm_helpers.tokenizer(tmp_path / "t")
    model = causal_lm.load_model(llama_dir, dtype=dtype)
    inject_lora(model, LoRAConfig(targets=["q_proj", "v_proj"], rank=8, scale=1.0, seed=0))
    ds = lm_data.tokenize(lm_helpers.rows(64), "prompt-completion", tok, 32)
    before = evaluate(model, lm_data.make_loader(ds, 16, False), device="cuda").loss
    train_local(model, lm_data.make_loader(ds, 16, True), steps=30, optim=OptimConfig(lr=1e-2), device="cuda")
    assert evaluate(model, lm_data.make_loader(ds, 16, False), device="cuda").loss < before


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_eight_virtual_clients_share_one_frozen_base(tmp_path, llama_dir, data_file, device, monkeypatch):
    """Eight clients in one process (on one CUDA device, or the CPU): every train message of both
    rounds runs on the same model object (the process's model cache, never a copy per client; on the
    CPU the same frozen-weight storage too), every update is accepted, and the loss falls."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import clients.app as capp
    from fedlora.loopback import run_loopback

    seen = []
    get = capp.get_model_entry

    def spy(*a, **kw):
        entry, load_s = get(*a, **kw)
        w = next(p for p in entry.model.parameters() if not p.requires_grad)
        seen.append((id(entry.model), w.data_ptr()))
        return entry, load_s

    monkeypatch.setattr(capp, "get_model_entry", spy)
    cfg = _cfg(llama_dir, data_file, tmp_path / "run", "clients.num=8", f'clients.device="{device}"',
               "clients.ranks=[2,4,8,16]")
    run_loopback(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) == 8 and all(c["accepted"] for c in r["clients"]) for r in rows)
    assert len(seen) == 16 and len({model for model, _ in seen}) == 1
    if device == "cpu":  # (on CUDA the client moves the model back to the CPU after each message)
        assert len({ptr for _, ptr in seen}) == 1
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
