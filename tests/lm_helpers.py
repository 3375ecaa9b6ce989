"""Tiny causal LMs and a tokenizer built in code (random weights, no download) for the causal-LM tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["the", "king", "speaks", "to", "the", "queen", "and", "the", "fool", "laughs", "at", "the", "crown",
         "while", "the", "ghost", "walks", "on", "the", "wall", "of", "the", "castle", "at", "night", "one",
         "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def tokenizer(path: Path, chat_template: str | None = None):
    """A byte-level BPE tokenizer (vocab ~300) trained on WORDS; pad/bos/eos are <pad>/<s>/</s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return fast


def llama(path: Path, seed: int = 0, chat_template: str | None = None, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(path, chat_template)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def gpt2(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer(path)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    GPT2LMHeadModel(cfg).save_pretrained(str(path))
    return path


def rows(n: int = 120, seed: int = 0) -> list[dict]:
    """Prompt/completion rows with a learnable rule (the completion counts on from the prompt) and a
    `who` column for natural partitions."""
    import random

    r = random.Random(seed)
    nums = WORDS[-10:]
    out = []
    for i in range(n):
        k = r.randrange(0, 7)
        out.append({"prompt": f"the king speaks {nums[k]}", "completion": " " + " ".join(nums[k + 1:k + 4]),
                    "who": ["king", "queen", "fool"][i % 3], "topic": ["a", "b"][k % 2]})
    return out


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path
