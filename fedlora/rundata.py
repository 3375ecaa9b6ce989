"""The model and data of a run, built from the typed client spec (``config.ClientSpec``).

Shared by the ServerApp (server-held splits, the model's adapted layer shapes) and the ClientApp
(a client's partition), so both sides build exactly the same thing from the same spec.

Synthetic data (``data.name = "synthetic"``), partition ``iid``: client ``i`` draws its own
``examples_per_client`` examples with seed ``seed·1000 + i`` (the in-process harness's draw, so a
Flower run and ``fedlora.testing.run_harness`` train on the same data), and its validation shard
with seed ``seed·1000 + i + 500000``. Other partitions split one pooled draw with
``fedlora.data.partition``. The server's held-out split is seed ``seed + 10000``; Fed-SB's init
split is seed ``seed + 20000``. A Hugging Face source (``hf:<id or folder>``, ``fedlora.hf_data``): each
client's rows are its partition from flwr-datasets' ``FederatedDataset``, the server's pool is the
``test_split``. Real data (``sst2``/``agnews``/``rte`` or a CSV/TSV path): the
training file is partitioned with flwr-datasets' partitioners, each partition split into train/val,
tokenised with the model's tokenizer (cached), batched with dynamic padding; the server evaluates on
``data.server_examples`` rows of the test file (a CSV/TSV path: of a held-out 10% of its rows, which
no client sees), and Fed-SB's init gradients come from the next ``strategy.fedsb_init_examples``
rows of that held-out pool: server data, disjoint from the clients' and from the evaluation rows.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset

from fedlora import hf_data
from fedlora.config import ClientSpec, DataSection
from fedlora.lora import LoRAConfig, inject_lora
from fedlora.models import default_targets, get_model
from fedlora.synthetic import SyntheticTask, make_loader

VAL_SEED_OFFSET = 500_000


def is_causal(spec: ClientSpec) -> bool:
    return spec.model.task == "causal-lm"


def num_classes(spec: ClientSpec) -> int:
    if spec.label_names:  # sent by the server: a node with its own data may not have the shared set
        return len(spec.label_names)
    d = spec.data
    if d.name == "synthetic":
        return SyntheticTask().num_classes
    from fedlora import data as fdata

    if d.name in fdata.KNOWN_DATASETS:
        return fdata.KNOWN_DATASETS[d.name].num_classes
    if hf_data.is_hf(d.name):
        return len(hf_data.label_names(d))
    return len(_real_train_pool(spec.key("data", "seed")).features["label"].names)


def label_names(spec: ClientSpec) -> list[str]:
    """The class names of a classification run's data, in id order (none for synthetic data)."""
    d = spec.data
    if d.name == "synthetic":
        return []
    if hf_data.is_hf(d.name):
        return [str(n) for n in hf_data.label_names(d)]
    pools = _real_pools(spec.key("data", "seed"))
    return [str(n) for n in (pools[0] if pools[0] is not None else pools[1]).features["label"].names]


def base_dtype(spec: ClientSpec, device: str = "cpu", full_precision: bool = False) -> torch.dtype:
    """The frozen base's dtype on a client: ``model.dtype`` (``"auto"``: bfloat16 for a causal LM
    on a CUDA device with native bf16, float32 otherwise); float32 where ``full_precision``."""
    want = spec.model.dtype
    if full_precision or not is_causal(spec) or want == "float32":
        return torch.float32
    if want == "bfloat16":
        return torch.bfloat16
    from fedlora.causal_lm import auto_dtype

    return auto_dtype(device)


def build_base(spec: ClientSpec, full_precision: bool = False,
               dtype: torch.dtype = torch.float32, device: str | None = None) -> nn.Module:
    """The pretrained model (no adapters), seeded by the run seed. ``full_precision``: never the
    quantized base of ``model.quantize`` (the server evaluates and exports at full precision);
    ``dtype`` (a causal LM's frozen base, ``base_dtype``): what the non-quantized weights are in;
    ``device``: the GPU a quantized base is loaded onto."""
    m = spec.model
    if is_causal(spec):
        from fedlora import causal_lm
        from fedlora.hf_models import model_path

        return causal_lm.load_model(model_path(m.name), gradient_checkpointing=m.gradient_checkpointing,
                                    quantize="" if full_precision else m.quantize,
                                    dtype=torch.float32 if full_precision else dtype,
                                    device=device, **m.kwargs)
    return get_model(m.name, seed=spec.seed, num_classes=num_classes(spec), **m.kwargs)


def lora_config(spec: ClientSpec, model: nn.Module, rank: int) -> tuple[LoRAConfig, list[str]]:
    lo = spec.lora
    targets, head = default_targets(spec.model.name, model)
    head = list(lo.head or head)
    cfg = LoRAConfig(targets=list(lo.targets or targets), rank=rank, alpha=lo.alpha,
                     dropout=lo.dropout, rslora=lo.rslora, mode=spec.adapter,
                     scale=spec.scale, trainable=head, seed=spec.seed)
    return cfg, head


def inject(spec: ClientSpec, model: nn.Module, rank: int) -> tuple[list[str], list[str]]:
    """Put adapters of ``rank`` into ``model``; ``(adapted layer names, head module names)``."""
    cfg, head = lora_config(spec, model, rank)
    return inject_lora(model, cfg), head


# ---- data --------------------------------------------------------------------------------------

def _is_text(spec: ClientSpec) -> bool:
    return spec.data.name != "synthetic"


# ---- causal-LM data (fedlora.lm_data) ---------------------------------------------------------------

@lru_cache(maxsize=4)
def _lm_pools(spec_key: str):
    """``(client rows, server rows, format)`` of a causal-LM source, as stored."""
    from fedlora import lm_data

    spec = _DataSeed.model_validate_json(spec_key)
    d = spec.data
    if hf_data.is_hf(d.name):
        server = hf_data.split_raw(d, d.test_split)
        return None, server, lm_data.detect_format(list(server.column_names), d.format, d.name)
    rows = lm_data.read_rows(d.name)
    fmt = lm_data.detect_format(list(rows.column_names), d.format, d.name)
    clients, server = lm_data.split_rows(rows, spec.seed)
    if d.limit and d.limit < len(clients):
        keep = np.random.default_rng(spec.seed).permutation(len(clients))[:d.limit]
        clients = clients.select(np.sort(keep).tolist())
    return clients, server, fmt


def _lm_tokenize(spec: ClientSpec, rows, where: str, fmt: str | None = None):
    from fedlora import lm_data
    from fedlora.hf_models import get_tokenizer

    fmt = fmt or _lm_pools(spec.key("data", "seed"))[2]
    return lm_data.tokenize(list(rows), fmt, get_tokenizer(spec.model.name), spec.data.max_length or 256,
                            spec.data.packing, where)


@lru_cache(maxsize=4)
def _lm_partitions(spec_key: str, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Every client's row indices of a causal-LM file's client pool: computed once per process
    (not once per virtual client: that was O(clients) work for each of them)."""
    from fedlora import lm_data

    spec = _DataSeed.model_validate_json(spec_key)
    pool = _lm_pools(spec_key)[0]
    return tuple(lm_data.partition_rows(pool, num_partitions, spec.data, spec.seed))


def _lm_client_data(spec: ClientSpec, partition_id: int, num_partitions: int):

    d = spec.data
    if hf_data.is_hf(d.name):
        part = hf_data.client_raw(d, partition_id, num_partitions, spec.seed)
    else:
        key = spec.key("data", "seed")
        pool = _lm_pools(key)[0]
        idx = _lm_partitions(key, num_partitions)[partition_id]
        part = pool.select(idx.tolist())
    return _lm_split(spec, part, partition_id, f"client {partition_id}'s data")


def _lm_split(spec: ClientSpec, rows, partition_id: int, where: str, fmt: str | None = None):
    """A client's rows → ``(train, validation)`` token sets (its own ``data.val_fraction`` share)."""
    from fedlora import data as fdata

    train, val = fdata.train_val_split(rows, spec.data.val_fraction, seed=spec.seed + partition_id)
    return (_lm_tokenize(spec, train, where, fmt),
            _lm_tokenize(spec, val, where + " (validation)", fmt) if spec.data.val_fraction > 0 else None)


def check_causal_data(spec: ClientSpec, num_partitions: int) -> str:
    """Every client's rows and the server's, tokenised once before a simulation starts (and kept in
    this process's cache): an error naming each client whose data has too little to learn from
    (instead of that client failing every round), else one line saying what was skipped and cut."""
    errors, datasets = [], []
    for pid in range(num_partitions):
        try:
            datasets += [ds for ds in client_data(spec, pid, num_partitions) if ds is not None]
        except ValueError as e:
            errors.append(str(e))
    try:
        datasets.append(server_eval_data(spec))
    except ValueError as e:
        errors.append(str(e))
    if errors:
        errors = list(dict.fromkeys(errors))  # a data-wide problem is raised by every client alike
        more = f"\n... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise ValueError("\n".join(errors[:5]) + more)
    skipped = sum((Counter(ds.skipped) for ds in datasets), Counter())
    truncated = sum(ds.truncated for ds in datasets)
    lost = {k.replace("_", " "): v for k, v in skipped.items() if v}
    out = f"data: {sum(len(ds) for ds in datasets)} sequences for {num_partitions} clients and the server"
    if lost:
        out += f"; rows skipped: {', '.join(f'{v} {k}' for k, v in lost.items())}"
    if truncated:
        out += f"; {truncated} responses cut at data.max_length = {spec.data.max_length or 256}"
    return out


#: a CSV/TSV file without a test file: this share of its rows is the server's held-out split
SERVER_SHARE = 0.1


class _DataSeed(BaseModel):
    data: DataSection
    seed: int


@lru_cache(maxsize=4)
def _real_pools(spec_key: str):
    """``(client pool, server pool)`` of a real data set, disjoint.

    Known data sets: the training file (``data.limit`` rows) and the test file. A CSV/TSV path: a
    seeded ``SERVER_SHARE`` of its rows is held out for the server, the clients share the rest.
    """
    from fedlora import data as fdata

    spec = _DataSeed.model_validate_json(spec_key)  # (a string key, so lru_cache can hold it)
    d = spec.data
    limit = d.limit or None
    if d.name in fdata.KNOWN_DATASETS:
        train = fdata.load_known(d.name, "train", root=d.root or None, limit=limit, seed=spec.seed)
        test = fdata.load_known(d.name, "test", root=d.root or None, seed=spec.seed)
        return train, test
    if hf_data.is_hf(d.name):  # the clients' rows come from FederatedDataset (client_data)
        return None, hf_data.server_rows(d)
    rows = fdata.load_text_classification(d.name, d.text_col, d.label_col, seed=spec.seed)
    clients, server = fdata.train_val_split(rows, SERVER_SHARE, seed=spec.seed + 10_000)
    if limit is not None and limit < len(clients):
        keep = np.random.default_rng(spec.seed).permutation(len(clients))[:limit]
        clients = clients.select(np.sort(keep))
    return clients, server


def _real_train_pool(spec_key: str):
    return _real_pools(spec_key)[0]


def _tokenize(spec: ClientSpec, ds):
    from fedlora import data as fdata
    from fedlora.hf_models import get_tokenizer

    name = spec.model.name
    if not (name == "minilm" or name.startswith("hf:")):
        raise ValueError(f"data.name={spec.data.name!r} is text: use a pretrained model with a "
                         f"tokenizer (model.name = 'minilm' or 'hf:<path>'), not {name!r}")
    spec_d = fdata.KNOWN_DATASETS.get(spec.data.name)
    max_len = spec.data.max_length or (spec_d.max_length if spec_d else 64)
    return fdata.tokenize(ds, get_tokenizer(name), max_length=max_len)


@lru_cache(maxsize=4)
def _synthetic_pool(spec_key: str, num_partitions: int):
    """The pooled synthetic draw that a non-IID partition splits (once per process)."""
    spec = _DataSeed.model_validate_json(spec_key)
    return SyntheticTask().generate(spec.data.examples_per_client * num_partitions, seed=spec.seed)


def _partition_pool(spec_key: str, num_partitions: int):
    spec = _DataSeed.model_validate_json(spec_key)
    if spec.data.name == "synthetic":
        return _synthetic_pool(spec_key, num_partitions)
    return _real_train_pool(spec_key)


@lru_cache(maxsize=4)
def _partitions(spec_key: str, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Every client's row indices of the pooled data (``fedlora.data.partition_indices``), computed
    once per process and kept: a virtual client selects its own rows from them. (Partitioning the
    pool again for each client made each client's first call O(clients): measured 1.9 s per client
    with 1,000 shards clients on the smoke data, so about 1,000 × 1.9 s of round-1 capability
    queries, estimated, not run.)"""
    from fedlora import data as fdata

    spec = _DataSeed.model_validate_json(spec_key)
    d = spec.data
    pool = _partition_pool(spec_key, num_partitions)
    return tuple(fdata.partition_indices(fdata.labels_of(pool), num_partitions, d.partition, alpha=d.alpha,
                                         shards_per_partition=d.shards_per_partition, seed=spec.seed))


#: clients' ``(train, val)`` data sets kept per process, most recently used last. Bounded: a process
#: that serves many virtual clients (1,000 clients on 2 Ray actors) keeps at most this many, not one
#: per client it ever served; an evicted client's data is rebuilt from the cached partition indices
#: (and, for text, the on-disk token cache) when it is sampled again.
CLIENT_DATA_CACHE = 64
_CLIENT_DATA: OrderedDict[tuple, tuple[Dataset, Dataset | None]] = OrderedDict()


def client_data(spec: ClientSpec, partition_id: int, num_partitions: int,
                data_path: str = "") -> tuple[Dataset, Dataset | None]:
    """``(train, val)`` of one client (cached per process: the last ``CLIENT_DATA_CACHE`` clients):
    its partition of the run's data set, or with ``data_path`` (a node's own file, node config
    ``data-path``) all of that file's rows."""
    key = (spec.key("data", "seed", "model", "label_names"), partition_id, num_partitions, data_path)
    if key in _CLIENT_DATA:
        _CLIENT_DATA.move_to_end(key)
        return _CLIENT_DATA[key]
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside 0..num-partitions-1={num_partitions - 1}")
    out = (own_client_data(spec, partition_id, data_path) if data_path
           else _build_client_data(spec, partition_id, num_partitions))
    _CLIENT_DATA[key] = out
    while len(_CLIENT_DATA) > CLIENT_DATA_CACHE:
        _CLIENT_DATA.popitem(last=False)
    return out


def own_client_data(spec: ClientSpec, partition_id: int, path: str) -> tuple[Dataset, Dataset | None]:
    """A node's own rows (node config ``data-path``: a CSV/TSV/JSON(L)/Parquet file on the node), in
    the run's columns and format; split into train/validation as a partition is. A classification
    node's labels map through the server's class names (``ClientSpec.label_names``)."""
    from fedlora import data as fdata

    d, where = spec.data, f"node config data-path {path!r}"
    if is_causal(spec):
        from fedlora import lm_data

        rows = lm_data.read_rows(Path(path), "node config data-path")  # (its errors name the path)
        return _lm_split(spec, rows, partition_id, where,
                         lm_data.detect_format(list(rows.column_names), d.format, where))
    if not spec.label_names:
        raise ValueError(f"{where}: a node's own data needs the run's class names, and the server sent "
                         "none (synthetic data has no files: leave data-path unset)")
    known = fdata.KNOWN_DATASETS.get(d.name)  # a known set's node file is laid out as its files are
    text_col, pair_col, label_col = ((known.text_col, known.text_pair_col, known.label_col) if known
                                     else (d.text_col, None, d.label_col))
    if known and known.label_map:
        label_map = dict(known.label_map)
    else:  # the class names, or their ids where no name is a number (a ClassLabel source saved as ids)
        label_map = {name: i for i, name in enumerate(spec.label_names)}
        if not any(n.strip().lstrip("-").isdigit() for n in spec.label_names):
            label_map |= {str(i): i for i in range(len(spec.label_names))}
    rows = fdata.load_text_classification(path, text_col, label_col, pair_col, label_map=label_map,
                                          seed=spec.seed, config_key="node config data-path")
    return _split(spec, rows, partition_id)


def _build_client_data(spec: ClientSpec, partition_id: int, num_partitions: int):
    d, seed = spec.data, spec.seed
    if is_causal(spec):
        return _lm_client_data(spec, partition_id, num_partitions)
    task = SyntheticTask()
    n_val = max(1, round(d.examples_per_client * d.val_fraction)) if d.val_fraction > 0 else 0
    if d.name == "synthetic" and d.partition == "iid":
        train = task.generate(d.examples_per_client, seed=seed * 1000 + partition_id)
        val = task.generate(n_val, seed=seed * 1000 + partition_id + VAL_SEED_OFFSET) if n_val else None
        return train, val
    from fedlora import data as fdata

    if hf_data.is_hf(d.name):  # FederatedDataset partitions once per process (hf_data._federated)
        part = hf_data.client_rows(d, partition_id, num_partitions, seed)
    else:
        key = spec.key("data", "seed")
        rows = _partitions(key, num_partitions)[partition_id]
        part = fdata.select_rows(_partition_pool(key, num_partitions), rows)
    return _split(spec, part, partition_id)


def _split(spec: ClientSpec, rows, partition_id: int):
    """A classification client's rows → ``(train, validation)`` (its own ``data.val_fraction``
    share; none at 0), tokenised for a text data set."""
    from fedlora import data as fdata

    train, val = fdata.train_val_split(rows, spec.data.val_fraction, seed=spec.seed + partition_id)
    val = val if spec.data.val_fraction > 0 else None
    if _is_text(spec):
        return _tokenize(spec, train), (_tokenize(spec, val) if val is not None else None)
    return train, val


def _server_rows(spec: ClientSpec, examples: int, offset: int):
    """``examples`` rows of the server's held-out pool after the first ``offset`` (seeded order)."""
    pool = (_lm_pools if is_causal(spec) else _real_pools)(spec.key("data", "seed"))[1]
    n = len(pool)
    if offset + examples > n and offset:
        raise ValueError(f"the server's held-out split of {spec.data.name!r} has {n} rows: too "
                         f"few for data.server_examples={offset} evaluation rows plus "
                         f"strategy.fedsb_init_examples={examples} Fed-SB init rows; lower one of them")
    perm = np.random.default_rng(spec.seed).permutation(n)
    return pool.select(np.sort(perm[offset:offset + examples]))


def server_eval_data(spec: ClientSpec) -> Dataset:
    """The server's held-out evaluation split: ``data.server_examples`` rows of the test file
    (a CSV/TSV path: of its held-out share), never seen by a client."""
    d = spec.data
    if d.name == "synthetic":
        return SyntheticTask().generate(d.server_examples, seed=spec.seed + 10_000)
    if is_causal(spec):
        return _lm_tokenize(spec, _server_rows(spec, d.server_examples, 0), "the server's held-out rows")
    return _tokenize(spec, _server_rows(spec, d.server_examples, 0))


def server_prompts(spec: ClientSpec, n: int) -> list[tuple[str, str, bool]]:
    """``(prompt, reference response, prompt is templated)`` of the first ``n`` held-out server rows
    (the generation checks)."""
    from fedlora import lm_data
    from fedlora.hf_models import get_tokenizer

    fmt = _lm_pools(spec.key("data", "seed"))[2]
    tok = get_tokenizer(spec.model.name)
    pool = _lm_pools(spec.key("data", "seed"))[1]
    return [lm_data.generation_prompt(r, fmt, tok) for r in _server_rows(spec, min(n, len(pool)), 0)]


def init_data(spec: ClientSpec, examples: int) -> Dataset:
    """The server-held split for Fed-SB's init gradients: public to the server, disjoint from every
    client's data and from the evaluation rows (the next ``examples`` rows of the held-out pool)."""
    d = spec.data
    if d.name == "synthetic":
        return SyntheticTask().generate(examples, seed=spec.seed + 20_000)
    if is_causal(spec):
        return _lm_tokenize(spec, _server_rows(spec, examples, d.server_examples), "Fed-SB's init rows")
    return _tokenize(spec, _server_rows(spec, examples, d.server_examples))


def loader(spec: ClientSpec, ds: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    if is_causal(spec):
        from fedlora.lm_data import make_loader as lm_loader

        return lm_loader(ds, batch_size, shuffle, seed)
    if _is_text(spec):
        from fedlora.data import make_text_loader

        return make_text_loader(ds, batch_size, shuffle=shuffle, seed=seed)
    return make_loader(ds, batch_size, shuffle=shuffle, seed=seed)


def collate_fn(spec: ClientSpec, ds: Dataset):
    """The batch collator of ``ds`` (the one ``loader`` uses; DP batches go through it too)."""
    if is_causal(spec):
        from fedlora.lm_data import LMCollator

        return LMCollator(ds.pad_token_id)
    if _is_text(spec):
        from fedlora.data import text_collator

        return text_collator(ds)
    return None
