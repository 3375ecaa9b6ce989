"""The causal-LM task's data: instruction, chat, prompt/completion or plain-text rows → token ids with
the prompt masked → batches.

Sources (``data.name``): a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` / ``.parquet`` file,
or ``hf:<dataset id or folder>`` (its ``train_split`` for the clients, ``test_split`` for the
server). A file keeps a seeded 10 % of its rows for the server (never a client's).

Row formats (``data.format``; ``"auto"`` picks by the columns, in this order):

- ``chat``: ``messages = [{"role": ..., "content": ...}, ...]`` ending with an ``assistant`` turn;
  the prompt is every turn before the last, the response is the last assistant turn (earlier
  assistant turns are context, not scored);
- ``alpaca``: ``instruction``, optional ``input``, ``output``;
- ``prompt-completion``: ``prompt``, ``completion`` (TRL's format; the Shakespeare roles);
- ``text``: ``text`` — no prompt, every token scored (plain next-token prediction).

Prompts go through the tokenizer's chat template when it has one (``add_generation_prompt``);
without one, chat and alpaca rows use the documented templates ``CHAT_TEMPLATE`` /
``ALPACA_TEMPLATE`` below, and a prompt/completion row is its two strings concatenated. The
response ends with the EOS token. Token ids: ``prompt + response``, cut to ``data.max_length``;
labels ``-100`` on the prompt (and on padding), the token ids on the response. A row whose
response is empty, or that keeps no response token after the cut, is skipped and counted
(``LMDataset.skipped``); more than half of a split skipped is an error naming
``data.max_length``. ``data.packing = true`` concatenates the rows (uncut) and cuts the stream into
``max_length`` blocks (fewer pad tokens). Each row in a block keeps its own position ids (0, 1, ...)
and its first token is not a target, as in an unpacked row; a packed batch carries ``position_ids``
and no ``attention_mask``, from which transformers' ``create_causal_mask`` (sdpa and eager attention
of Llama, Qwen, Mistral, Gemma, GPT-2 ...) keeps attention within each row, so a row that fits in
its block is scored exactly as alone. A row cut by a block's end goes on in the next block as a
row of its own (positions from 0, no context before the cut). A model whose ``forward`` takes no
``position_ids`` cannot pack (a config error).

Partitions of a file (``data.partition``): ``iid``; ``dirichlet`` over the categories of
``data.label_col`` (a topic, a task type); ``natural`` — one client per value of
``data.partition_by`` (a user, a role, a hospital), clients ordered by the sorted values, so
``clients.num`` must equal the number of values; ``hf:`` sources use flwr-datasets'
partitioners (``fedlora.hf_data``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

FORMATS = ("chat", "alpaca", "prompt-completion", "text")
_COLUMNS = {"chat": ["messages"], "alpaca": ["instruction", "output"],
            "prompt-completion": ["prompt", "completion"], "text": ["text"]}
#: the prompt of an instruction row when the tokenizer has no chat template (the Alpaca template)
ALPACA_TEMPLATE = ("Below is an instruction that describes a task{with_input}. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "{input_block}### Response:\n")
#: a chat turn when the tokenizer has no chat template; the prompt ends with the assistant's header
CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
SERVER_SHARE = 0.1
MAX_SKIPPED = 0.5


def detect_format(columns: list[str], fmt: str = "auto", where: str = "data.name") -> str:
    """The row format: ``fmt`` checked against the columns, or the first whose columns are there."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"data.format must be 'auto' or one of {list(FORMATS)}, got {fmt!r}")
        missing = [c for c in _COLUMNS[fmt] if c not in columns]
        if missing:
            raise ValueError(f"{where}: data.format = {fmt!r} needs the column(s) {missing}; the columns "
                             f"are {columns}")
        return fmt
    for f in FORMATS:
        if all(c in columns for c in _COLUMNS[f]):
            return f
    raise ValueError(f"{where}: no known row format in the columns {columns}: give messages (chat), "
                     "instruction + output (alpaca), prompt + completion, or text")


def _template_chat(tokenizer: Any, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) + \
        CHAT_TEMPLATE.format(role="assistant", content="")[:-1]


def render(row: dict, fmt: str, tokenizer: Any) -> tuple[str, str, bool]:
    """``(prompt, response, prompt_is_templated)`` of one row (the response without EOS)."""
    if fmt == "text":
        return "", str(row["text"] or ""), False
    if fmt == "prompt-completion":
        return str(row["prompt"] or ""), str(row["completion"] or ""), False
    if fmt == "alpaca":
        instruction, inp = str(row["instruction"] or ""), str(row.get("input") or "")
        if getattr(tokenizer, "chat_template", None):
            content = instruction + (f"\n\n{inp}" if inp else "")
            prompt = _template_chat(tokenizer, [{"role": "user", "content": content}])
            return prompt, str(row["output"] or ""), True
        prompt = ALPACA_TEMPLATE.format(
            with_input=", paired with an input that provides further context" if inp else "",
            instruction=instruction, input_block=f"### Input:\n{inp}\n\n" if inp else "")
        return prompt, str(row["output"] or ""), False
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise ValueError("a chat row's messages must be a non-empty list of {role, content}")
    if msgs[-1]["role"] != "assistant":
        raise ValueError("a chat row must end with an assistant turn (the response), not "
                         f"{msgs[-1]['role']!r}")
    templated = bool(getattr(tokenizer, "chat_template", None))
    return _template_chat(tokenizer, msgs[:-1]), str(msgs[-1]["content"] or ""), templated


def generation_prompt(row: dict, fmt: str, tokenizer: Any) -> tuple[str, str, bool]:
    """``(prompt, reference, prompt_is_templated)`` for a generation check: the row's own prompt and
    response, except a ``text`` row (no prompt): its first half of words is the prompt and the rest
    the reference continuation."""
    if fmt != "text":
        return render(row, fmt, tokenizer)
    text = str(row["text"] or "")
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    cut = ends[max(len(ends) // 2, 1) - 1] if ends else 0
    return text[:cut], text[cut:], False


@dataclass
class LMDataset(Dataset):
    """Token ids and labels (``-100`` = not scored), one row per sequence."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    pad_token_id: int
    skipped: dict[str, int] = field(default_factory=dict)
    position_ids: list[torch.Tensor] | None = None  # packed blocks only: each row's own positions
    truncated: int = 0  # rows kept with their response cut at max_length

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        row = {"input_ids": self.input_ids[i], "labels": self.labels[i]}
        if self.position_ids is not None:
            row["position_ids"] = self.position_ids[i]
        return row

    def subset(self, idx) -> LMDataset:
        idx = [int(i) for i in idx]
        pos = None if self.position_ids is None else [self.position_ids[i] for i in idx]
        return LMDataset([self.input_ids[i] for i in idx], [self.labels[i] for i in idx], self.pad_token_id,
                         dict(self.skipped), pos, self.truncated)


def tokenize(rows: list[dict], fmt: str, tokenizer: Any, max_length: int, packing: bool = False,
             where: str = "data") -> LMDataset:
    """Rows → ``LMDataset`` (see the module docstring for the masking, the cut and the skips)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{where}: the tokenizer has no EOS token; a causal-LM response must end with one")
    ids, labels, truncated = [], [], 0
    skipped = {"empty_response": 0, "no_response_token_after_truncation": 0}
    rendered = [render(row, fmt, tokenizer) for row in rows]
    kept = [x for x in rendered if x[1].strip()]
    skipped["empty_response"] = len(rendered) - len(kept)
    # one batched call per kind of text (a fast tokenizer encodes a batch in parallel, 4-5x faster
    # than row by row); verbose=False: sequences longer than model_max_length are cut below, by us
    prompt_ids: list[list[int]] = [[] for _ in kept]
    for templated in (False, True):  # a templated prompt carries its own BOS; a plain one (even "") gets it
        at = [i for i, x in enumerate(kept) if x[2] == templated]
        if at:
            enc = tokenizer([kept[i][0] for i in at], add_special_tokens=not templated, verbose=False)
            for i, p in zip(at, enc["input_ids"]):
                prompt_ids[i] = p
    responses = tokenizer([x[1] for x in kept], add_special_tokens=False, verbose=False)["input_ids"] \
        if kept else []
    for p, r in zip(prompt_ids, responses):
        r = r + [tokenizer.eos_token_id]
        seq, lab = p + r, [-100] * len(p) + r
        cut = not packing and len(seq) > max_length  # packed rows are cut as one stream below
        if cut:
            seq, lab = seq[:max_length], lab[:max_length]
        if all(x == -100 for x in lab[1:]):  # label 0 is never predicted (nothing comes before it)
            skipped["no_response_token_after_truncation"] += 1
            continue
        truncated += cut
        ids.append(seq)
        labels.append(lab)
    total = len(rows)
    lost = sum(skipped.values())
    if total and lost > MAX_SKIPPED * total:
        raise ValueError(f"{where}: {lost} of {total} rows have no response token to learn from ({skipped}): "
                         f"raise data.max_length (now {max_length}) or fix the empty responses")
    positions = None
    if packing:
        flat_ids = [t for s in ids for t in s]
        # a row's first token is never a target (in a block, the token before it is another row's)
        flat_lab = [t for lab in labels for t in [-100, *lab[1:]]]
        # positions from 0 in each row, and again where a row goes on in the next block (a long
        # row would otherwise reach positions past max_length: GPT-2's table ends at n_positions)
        starts = np.cumsum([0] + [len(s) for s in ids[:-1]])
        flat_pos = [min(j, (g + j) % max_length) for g, s in zip(starts, ids) for j in range(len(s))]
        cut = range(0, len(flat_ids), max_length)
        ids = [flat_ids[i:i + max_length] for i in cut]
        labels = [flat_lab[i:i + max_length] for i in cut]
        keep = [k for k, lab in enumerate(labels) if any(x != -100 for x in lab[1:])]
        ids, labels = [ids[k] for k in keep], [labels[k] for k in keep]
        positions = [torch.tensor(flat_pos[i:i + max_length], dtype=torch.long) for i in cut]
        positions = [positions[k] for k in keep]
    return LMDataset([torch.tensor(s, dtype=torch.long) for s in ids],
                     [torch.tensor(s, dtype=torch.long) for s in labels], int(tokenizer.pad_token_id),
                     skipped, positions, truncated)


class LMCollator:
    """Right-pads ``input_ids`` with the pad id, ``labels`` with -100; ``attention_mask`` 1 on tokens —
    or, for packed blocks, ``position_ids`` (the padding one more row from 0) and no attention mask:
    the model then keeps attention within each row (right padding is never attended by a real token)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = int(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:  # an empty Poisson draw (DP): a batch of zero sequences
            z = torch.zeros(0, 1, dtype=torch.long)
            return {"input_ids": z, "attention_mask": z.clone(), "labels": z.clone()}
        t = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), t), self.pad, dtype=torch.long)
        lab = torch.full((len(rows), t), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], lab[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        if "position_ids" not in rows[0]:
            return {"input_ids": ids, "attention_mask": mask, "labels": lab}
        pos = torch.arange(t).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r["position_ids"])
            pos[i, :n] = r["position_ids"]
            pos[i, n:] -= n
        return {"input_ids": ids, "position_ids": pos, "labels": lab}


def make_loader(ds: LMDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                      collate_fn=LMCollator(ds.pad_token_id))


# ---- rows: files and partitions -------------------------------------------------------------------

def read_rows(path: Path, where: str = "data.name"):
    """A local file → ``datasets.Dataset`` (JSON lines or a list, CSV/TSV, Parquet); errors name
    ``where`` (the key that gave the path)."""
    from fedlora.data import FILE_FORMATS, _csv_options, _datasets, _no_progress_bars, cache_root

    datasets = _datasets()
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{where}: no file {str(path.absolute())!r}")
    builder = FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{where}: {str(path)!r}: expected one of {', '.join(FILE_FORMATS)} (got "
                         f"{path.suffix!r})")
    kw = _csv_options(path.suffix.lower()) if builder == "csv" else {}
    try:
        with _no_progress_bars():
            return datasets.load_dataset(builder, data_files=str(path), split="train",
                                         cache_dir=str(cache_root() / "datasets"), **kw)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f"{where}: {str(path)!r} could not be read as {builder}: {type(e).__name__}: "
                         f"{str(e)[:300]}") from e


def split_rows(ds, seed: int):
    """``(client rows, server rows)`` of one file: a seeded ``SERVER_SHARE`` held out for the server."""
    n = len(ds)
    if n < 2:
        raise ValueError(f"data.name: {n} row(s): too few to hold any out for the server")
    perm = np.random.default_rng(seed + 10_000).permutation(n)
    k = max(1, int(round(n * SERVER_SHARE)))
    return ds.select(np.sort(perm[k:]).tolist()), ds.select(np.sort(perm[:k]).tolist())


def natural_mismatch(by: str, have: int, want: int) -> str:
    """The one message for a natural partition whose number of values is not the run's clients."""
    return (f"data.partition = 'natural' by {by!r} gives {have} clients (one per value), but clients.num = "
            f"{want}: set clients.num = {have}")


def natural_groups(values: list) -> list[np.ndarray]:
    """Row indices per distinct value, the values in sorted order (client i = the i-th value)."""
    keys = sorted({str(v) for v in values})
    pos = {k: i for i, k in enumerate(keys)}
    groups: list[list[int]] = [[] for _ in keys]
    for i, v in enumerate(values):
        groups[pos[str(v)]].append(i)
    return [np.asarray(g, dtype=np.int64) for g in groups]


def partition_rows(ds, num_partitions: int, d, seed: int) -> list[np.ndarray]:
    """Row indices of each client (``d``: the data section)."""
    from fedlora.data import partition_indices

    if d.partition == "natural":
        groups = natural_groups(list(ds[d.partition_by]))
        if len(groups) != num_partitions:
            raise ValueError(natural_mismatch(d.partition_by, len(groups), num_partitions))
        return groups
    if d.partition == "iid":
        labels = np.zeros(len(ds), dtype=np.int64)
    else:
        if d.label_col not in ds.column_names:
            raise ValueError(f"data.partition = {d.partition!r} splits by the categories of data.label_col = "
                             f"{d.label_col!r}, which is not a column ({ds.column_names})")
        labels = np.unique([str(v) for v in ds[d.label_col]], return_inverse=True)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return partition_indices(labels, num_partitions, d.partition, alpha=d.alpha,
                                 shards_per_partition=d.shards_per_partition, seed=seed)


def check_rows(ds, d, where: str) -> str:
    """Validation of a source's rows before any run: the format's columns and, for every row, its
    fields' types (a row missing a field is named by number). Returns the format."""
    fmt = detect_format(list(ds.column_names), d.format, where)
    for k, row in enumerate(ds.select(range(min(len(ds), 10_000)))):
        for c in _COLUMNS[fmt]:
            if row.get(c) is None:
                raise ValueError(f"{where}: row {k + 1} has no {c!r} (data.format {fmt!r} needs "
                                 f"{_COLUMNS[fmt]} in every row)")
        if fmt == "chat":
            try:
                render(row, fmt, _NoTemplate())
            except ValueError as e:
                raise ValueError(f"{where}: row {k + 1}: {e}") from e
    if d.partition == "natural" and d.partition_by not in ds.column_names:
        raise ValueError(f"data.partition_by: no column {d.partition_by!r} in {where}; the columns are "
                         f"{ds.column_names}")
    return fmt


class _NoTemplate:
    chat_template = None

