"""Real text-classification data: files → ``datasets.Dataset`` → partitions → cached token ids.

- ``load_text_classification(path, ...)``: a CSV/TSV file (TSV read with ``csv.QUOTE_NONE``, as the
  GLUE files need) → a ``datasets.Dataset`` with columns ``text``, [``text_pair``], ``label`` (int,
  a ``ClassLabel`` whose names are the original labels).
- ``KNOWN_DATASETS`` (``sst2``, ``agnews``, ``rte``) and ``load_known(name, split)``: the data sets
  under the data root (``resolve_data_root``: ``FEDLORA_DATA``, else ``shared/data`` found next
  to the config file or the repository; see ``shared/data/*/SOURCE.md``).
- ``partition(ds, n, method="iid"|"dirichlet"|"shards")``: flwr-datasets' ``IidPartitioner``,
  ``DirichletPartitioner`` (label skew, α) and ``ShardPartitioner`` (pathological label shards),
  on a ``datasets.Dataset`` or on any dataset with ``.labels`` and ``.subset`` (the synthetic
  ``TensorDictDataset``, ``TokenizedDataset``). ``train_val_split`` for a client's validation set.
- ``tokenize(ds, tokenizer, max_length)``: unpadded token ids, memoised in-process and cached on
  disk (key: tokenizer content, data content, max length), so rounds never re-tokenise;
  ``make_text_loader`` batches them with dynamic padding (``collate_text``) into the dicts
  ``fedlora.train`` expects.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedlora.synthetic import SyntheticTask, TensorDictDataset

DATA_ENV = "FEDLORA_DATA"
CACHE_ENV = "FEDLORA_CACHE"
DATA_HINT = "see shared/data/SOURCE.md (each data set's folder has one)"
METHODS = ("iid", "dirichlet", "shards")
_CACHE_FORMAT = "fedlora-tokens/1"


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("real data needs the optional 'models' extra (datasets, flwr-datasets): "
                          'pip install -e ".[models]"') from e
    return datasets


# ---- where the data live ------------------------------------------------------------------------

def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def resolve_data_root(root: str | os.PathLike | None = None,
                      config_path: str | os.PathLike | None = None) -> Path:
    """The folder holding ``sst2/``, ``agnews/``, ``rte/``.

    1. ``root`` if given (a relative path is taken relative to the config file's folder when
       ``config_path`` is given, else to the working directory);
    2. the ``FEDLORA_DATA`` environment variable;
    3. the first existing ``shared/data`` in the config file's folder or its parents (3 levels),
       then in the repository's folder or its parent (the default layout: ``<repo>/../shared/data``).

    Falls back to ``<repo>/../shared/data`` even when missing, so errors name a useful path.
    """
    if root is not None:
        p = Path(root).expanduser()
        if not p.is_absolute() and config_path is not None:
            p = Path(config_path).resolve().parent / p
        return p.resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    starts: list[Path] = []
    if config_path is not None:
        starts += list(Path(config_path).resolve().parents)[:4]
    starts += [repo_root(), repo_root().parent]
    for d in starts:
        cand = d / "shared" / "data"
        if cand.is_dir():
            return cand
    return repo_root().parent / "shared" / "data"


def missing_file_error(path: Path, config_key: str, what: str = "data file") -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: {str(path)!r}. Set `{config_key}` in the config to the file (or the data "
        f"root with the {DATA_ENV} environment variable); where the data sets come from and how "
        f"to get them: {DATA_HINT}")


# ---- reading files -----------------------------------------------------------------------------

def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        kw: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    elif suffix == ".csv":
        kw = {"delimiter": ","}
    else:
        raise ValueError(f"{str(path)!r}: expected a .csv or .tsv file (got suffix {suffix!r})")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, **kw)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{str(path)!r} is empty (expected a header row)") from None
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{str(path)!r} line {lineno}: {len(row)} fields, the header has "
                                 f"{len(header)} ({header})")
            rows.append(row)
    return header, rows


def _label_names(raw: Sequence[str]) -> list[str]:
    uniq = sorted(set(raw))
    try:  # integer labels sort by value ("2" < "10")
        return sorted(uniq, key=int)
    except ValueError:
        return uniq


def load_text_classification(path: str | os.PathLike, text_col: str = "sentence",
                             label_col: str = "label", text_pair_col: str | None = None,
                             label_map: dict[str, int] | None = None, limit: int | None = None,
                             seed: int = 0, config_key: str = "data.path", offset: int = 0):
    """A CSV/TSV file → ``datasets.Dataset`` with ``text``, [``text_pair``], ``label`` (int).

    Labels map through ``label_map`` (original string → int) or, without one, to their index in
    the sorted unique labels (integers sorted numerically). The ``label`` column is a
    ``ClassLabel`` whose names are the original labels. ``limit`` keeps a random subset of that
    many rows (seeded, file order kept); ``offset`` skips the first ``offset`` rows of that seeded
    order, so ``offset=N`` gives rows disjoint from ``limit=N`` (a second held-out split).
    """
    datasets = _datasets()
    path = Path(path).expanduser()
    if not path.is_file():
        raise missing_file_error(path, config_key)
    header, rows = _read_rows(path)
    cols = [text_col, label_col] + ([text_pair_col] if text_pair_col else [])
    missing = [c for c in cols if c not in header]
    if missing:
        raise ValueError(f"{str(path)!r}: no column(s) {missing}; the columns are {header}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if offset or (limit is not None and limit < len(rows)):
        if offset + (limit or 1) > len(rows):
            raise ValueError(f"{str(path)!r} has {len(rows)} rows: too few for {limit or 'all'} rows "
                             f"after the first {offset}")
        perm = np.random.default_rng(seed).permutation(len(rows))
        keep = np.sort(perm[offset:offset + limit] if limit is not None else perm[offset:])
        rows = [rows[i] for i in keep]
    li = header.index(label_col)
    raw = [r[li].strip() for r in rows]
    if label_map is None:
        names = _label_names(raw)
        label_map = {n: i for i, n in enumerate(names)}
    else:
        label_map = {str(k): int(v) for k, v in label_map.items()}
        unknown = sorted(set(raw) - set(label_map))
        if unknown:
            raise ValueError(f"{str(path)!r}: labels {unknown[:10]} are not in label_map "
                             f"{label_map}")
        if sorted(set(label_map.values())) != list(range(len(set(label_map.values())))):
            raise ValueError(f"label_map values must be 0..C-1, got {label_map}")
        names = [None] * len(set(label_map.values()))
        for k, v in label_map.items():
            names[v] = names[v] or k
    data: dict[str, list] = {"text": [r[header.index(text_col)] for r in rows]}
    if text_pair_col:
        data["text_pair"] = [r[header.index(text_pair_col)] for r in rows]
    data["label"] = [label_map[x] for x in raw]
    feats = {"text": datasets.Value("string")}
    if text_pair_col:
        feats["text_pair"] = datasets.Value("string")
    feats["label"] = datasets.ClassLabel(names=[str(n) for n in names])
    return datasets.Dataset.from_dict(data, features=datasets.Features(feats))


@dataclass(frozen=True)
class DatasetSpec:
    """A known data set under the data root (files and columns as in its SOURCE.md)."""

    name: str
    train: str
    test: str
    text_col: str
    label_col: str
    label_names: tuple[str, ...]  # index = class id
    text_pair_col: str | None = None
    max_length: int = 64  # a sensible default for tokenisation

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def label_map(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names)}


KNOWN_DATASETS: dict[str, DatasetSpec] = {
    "sst2": DatasetSpec("sst2", "sst2/train.tsv", "sst2/test.tsv", "sentence", "label",
                        ("0", "1"), max_length=64),
    # The usual AG News class order (the HF ``ag_news`` ids).
    "agnews": DatasetSpec("agnews", "agnews/train.tsv", "agnews/test.tsv", "text", "label",
                          ("World", "Sports", "Business", "Sci/Tech"), max_length=128),
    # GLUE ids: entailment = 0, not_entailment = 1.
    "rte": DatasetSpec("rte", "rte/train.tsv", "rte/test.tsv", "sentence1", "label",
                       ("entailment", "not_entailment"), text_pair_col="sentence2",
                       max_length=128),
}


def known_path(name: str, split: str = "train", root: str | os.PathLike | None = None,
               config_path: str | os.PathLike | None = None) -> Path:
    spec = _spec(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return resolve_data_root(root, config_path) / getattr(spec, split)


def _spec(name: str) -> DatasetSpec:
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(KNOWN_DATASETS)} (or give a "
                         "CSV/TSV path with its text/label columns)")
    return KNOWN_DATASETS[name]


def load_known(name: str, split: str = "train", root: str | os.PathLike | None = None,
               config_path: str | os.PathLike | None = None, limit: int | None = None,
               seed: int = 0, config_key: str = "data.root", offset: int = 0):
    """``sst2`` / ``agnews`` / ``rte``, ``train`` or ``test`` split, as a ``datasets.Dataset``
    (``limit``/``offset``: see ``load_text_classification``)."""
    spec = _spec(name)
    path = known_path(name, split, root, config_path)
    if not path.is_file():
        raise missing_file_error(path, config_key, f"{name} {split} file")
    return load_text_classification(path, spec.text_col, spec.label_col, spec.text_pair_col,
                                    spec.label_map, limit, seed, config_key, offset)


def load_synthetic(n: int, seed: int = 0, **task: Any) -> TensorDictDataset:
    """``data = "synthetic"``: the seeded toy task of ``fedlora.synthetic`` (tiny model)."""
    return SyntheticTask(**task).generate(n, seed=seed)


# ---- partitioning (flwr-datasets) ----------------------------------------------------------------

def _column(ds: Any, name: str):
    """A ``datasets.Dataset`` column as one pyarrow array (fast; ``ds[name]`` goes row by row)."""
    if name not in ds.column_names:
        raise ValueError(f"no column {name!r}; the columns are {ds.column_names}")
    return ds.with_format("arrow")[name].combine_chunks()


def _labels_of(ds: Any, label_col: str = "label") -> np.ndarray:
    if hasattr(ds, "column_names"):  # datasets.Dataset
        return _column(ds, label_col).to_numpy()
    if hasattr(ds, "labels"):
        return np.asarray(torch.as_tensor(ds.labels).cpu())
    raise TypeError(f"cannot read labels of a {type(ds).__name__}: give a datasets.Dataset or a "
                    "dataset with .labels and .subset")


def _select(ds: Any, idx: np.ndarray) -> Any:
    if hasattr(ds, "column_names"):
        return ds.select(idx.tolist())
    return ds.subset(torch.as_tensor(idx, dtype=torch.long))


def partition_indices(labels: Sequence[int] | np.ndarray | torch.Tensor, num_partitions: int,
                      method: str = "iid", alpha: float = 0.5, shards_per_partition: int = 2,
                      seed: int = 0, min_partition_size: int | None = None) -> list[np.ndarray]:
    """Row indices of each partition, computed by flwr-datasets' partitioners.

    The rows are shuffled with ``seed`` first (so IID shards are random and which rows of a class
    land in which shard is random), then:

    - ``iid``: ``IidPartitioner`` (equal sizes ±1; the sizes sum to the total);
    - ``dirichlet``: ``DirichletPartitioner(alpha)`` over the labels, every partition holding at
      least ``min_partition_size`` rows (default ``min(10, n // (2·num_partitions))``, ≥ 1); when
      flwr-datasets gives up after its 10 draws, it is re-run with a derived seed (up to 5 times,
      then 5 more with the default minimum relaxed to 1 row), then ``ValueError``: with very
      small α and few classes most clients would hold nothing, which no redraw fixes;
    - ``shards``: ``ShardPartitioner`` — rows sorted by label, cut into
      ``num_partitions × shards_per_partition`` equal shards, each partition getting
      ``shards_per_partition`` random shards. As in flwr-datasets (and McMahan et al.) the
      remainder ``n mod (num_partitions × shards_per_partition)`` rows are left out.

    Same arguments → same indices. Each array keeps the partitioner's (shuffled) order.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    n = len(labels)
    if method not in METHODS:
        raise ValueError(f"partition method must be one of {METHODS}, got {method!r}")
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if num_partitions > n:
        raise ValueError(f"{num_partitions} partitions of {n} rows: some would be empty")
    perm = np.random.default_rng(seed).permutation(n)
    try:
        datasets = _datasets()
        from flwr_datasets.partitioner import (
            DirichletPartitioner,
            IidPartitioner,
            ShardPartitioner,
        )
    except ImportError as e:
        if method == "iid":  # IidPartitioner = contiguous equal shards: the same split
            return [np.asarray(p, dtype=np.int64) for p in np.array_split(perm, num_partitions)]
        raise ImportError(f"partition method {method!r} needs flwr-datasets (the 'models' extra): "
                          'pip install -e ".[models]"') from e
    # Arrow format: flwr-datasets reads whole columns, which the default format does row by row.
    table = datasets.Dataset.from_dict({"label": labels[perm], "_row": perm}).with_format("arrow")
    if method == "iid":
        parts = [IidPartitioner(num_partitions)]
    elif method == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
        mps = min_partition_size if min_partition_size is not None else max(
            1, min(10, n // (2 * num_partitions)))
        if mps < 1:
            raise ValueError(f"min_partition_size must be >= 1, got {mps}")
        # the default minimum relaxes to 1 row before giving up (tiny alpha, few classes)
        sizes = [mps] * 5 + ([1] * 5 if min_partition_size is None and mps > 1 else [])
        parts = [DirichletPartitioner(num_partitions, "label", float(alpha),
                                      min_partition_size=m, self_balancing=False,
                                      shuffle=True, seed=seed + 7919 * k)
                 for k, m in enumerate(sizes)]
    else:
        if not isinstance(shards_per_partition, int) or shards_per_partition < 1:
            raise ValueError(f"shards_per_partition must be an integer >= 1, got "
                             f"{shards_per_partition!r}")
        if num_partitions * shards_per_partition > n:
            raise ValueError(f"{num_partitions}×{shards_per_partition} shards of {n} rows: a shard "
                             "would be empty")
        parts = [ShardPartitioner(num_partitions, "label",
                                  num_shards_per_partition=shards_per_partition,
                                  shuffle=True, seed=seed)]
    last: Exception | None = None
    for p in parts:
        p.dataset = table
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the Dirichlet redraw chatter
                return [p.load_partition(i)["_row"].to_numpy().astype(np.int64)
                        for i in range(num_partitions)]
        except ValueError as e:
            last = e
    raise ValueError(f"Dirichlet partitioning (alpha={alpha}) left a partition below its minimum "
                     f"size after {len(parts) * 10} draws; raise alpha, lower num_partitions or "
                     f"min_partition_size ({last})")


def partition(dataset: Any, num_partitions: int, method: str = "iid", alpha: float = 0.5,
              shards_per_partition: int = 2, seed: int = 0, label_col: str = "label",
              min_partition_size: int | None = None) -> list[Any]:
    """Split a data set into ``num_partitions`` client data sets (see ``partition_indices``).

    Works on a ``datasets.Dataset`` (labels from ``label_col``) and on a dataset with ``.labels``
    and ``.subset(idx)`` (``TensorDictDataset`` of the synthetic task, ``TokenizedDataset``).
    """
    idx = partition_indices(_labels_of(dataset, label_col), num_partitions, method, alpha,
                            shards_per_partition, seed, min_partition_size)
    return [_select(dataset, i) for i in idx]


def train_val_split(dataset: Any, val_fraction: float = 0.1, seed: int = 0) -> tuple[Any, Any]:
    """A seeded random ``(train, val)`` split; ``val`` gets ``round(n·fraction)`` rows, at least
    one when ``fraction > 0`` and ``n ≥ 2``, and ``train`` keeps at least one row."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(dataset)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(n)
    return _select(dataset, np.sort(perm[n_val:])), _select(dataset, np.sort(perm[:n_val]))


def label_histogram(dataset: Any, num_classes: int, label_col: str = "label") -> np.ndarray:
    """Counts per class (for reports and skew checks)."""
    return np.bincount(_labels_of(dataset, label_col).astype(np.int64), minlength=num_classes)


# ---- tokenisation ------------------------------------------------------------------------------

class TokenizedDataset(Dataset):
    """Unpadded token ids, stored flat (``ids`` + ``offsets``) with an optional row index view.

    Rows are dicts ``input_ids`` (1-D long), [``token_type_ids``], ``labels`` (0-D long).
    """

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor,
                 type_ids: torch.Tensor | None = None, pad_token_id: int = 0,
                 rows: torch.Tensor | None = None) -> None:
        self.ids, self.offsets, self.type_ids = ids, offsets, type_ids
        self._labels = labels.long()
        self.pad_token_id = int(pad_token_id)
        self.rows = rows  # None: all rows in order

    def __len__(self) -> int:
        return len(self._labels) if self.rows is None else len(self.rows)

    def _row(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self.rows is None else int(self.rows[i])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self._row(i)
        a, b = int(self.offsets[r]), int(self.offsets[r + 1])
        out = {"input_ids": self.ids[a:b].long()}
        if self.type_ids is not None:
            out["token_type_ids"] = self.type_ids[a:b].long()
        out["labels"] = self._labels[r]
        return out

    @property
    def labels(self) -> torch.Tensor:
        return self._labels if self.rows is None else self._labels[self.rows]

    @property
    def lengths(self) -> torch.Tensor:
        lens = self.offsets[1:] - self.offsets[:-1]
        return lens if self.rows is None else lens[self.rows]

    def subset(self, idx: torch.Tensor | Sequence[int]) -> TokenizedDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        rows = idx if self.rows is None else self.rows[idx]
        return TokenizedDataset(self.ids, self.offsets, self._labels, self.type_ids,
                                self.pad_token_id, rows)

    # -- on-disk form (the full flat storage; a subset view is materialised first) --
    def to_state(self) -> dict[str, Any]:
        src = self if self.rows is None else _materialise(self)
        st = {"format": _CACHE_FORMAT, "ids": src.ids, "offsets": src.offsets,
              "labels": src._labels, "pad_token_id": src.pad_token_id}
        if src.type_ids is not None:
            st["type_ids"] = src.type_ids
        return st

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> TokenizedDataset:
        if st.get("format") != _CACHE_FORMAT:
            raise ValueError(f"not a {_CACHE_FORMAT} file")
        return cls(st["ids"], st["offsets"], st["labels"], st.get("type_ids"),
                   int(st["pad_token_id"]))


def _materialise(ds: TokenizedDataset) -> TokenizedDataset:
    lens = ds.lengths
    offsets = torch.zeros(len(ds) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lens, 0)
    rows = ds.rows.tolist() if ds.rows is not None else range(len(ds))
    ids = torch.cat([ds.ids[int(ds.offsets[r]):int(ds.offsets[r + 1])] for r in rows]) \
        if len(ds) else ds.ids[:0]
    tt = None if ds.type_ids is None else (torch.cat(
        [ds.type_ids[int(ds.offsets[r]):int(ds.offsets[r + 1])] for r in rows]) if len(ds)
        else ds.type_ids[:0])
    return TokenizedDataset(ids, offsets, ds.labels.clone(), tt, ds.pad_token_id)


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    base = Path(env).expanduser() if env else Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedlora"
    return base / "tokens"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's content (its full ``tokenizer.json`` for fast tokenizers)."""
    fp = getattr(tokenizer, "_fedlora_fingerprint", None)
    if fp:
        return fp
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}".encode())
    h.update(f"|pad={tokenizer.pad_token_id}|{list(tokenizer.model_input_names)}".encode())
    fp = h.hexdigest()
    with contextlib.suppress(AttributeError):  # a tokenizer refusing new attributes
        tokenizer._fedlora_fingerprint = fp
    return fp


def dataset_fingerprint(dataset: Any) -> str:
    """SHA-256 over the ``text``, [``text_pair``] and ``label`` columns (content, not identity)."""
    h = hashlib.sha256()
    for col in ("text", "text_pair", "label"):
        if col not in dataset.column_names:
            continue
        h.update(f"|{col}|".encode())
        vals = _column(dataset, col)
        if col == "label":
            h.update(vals.to_numpy().astype(np.int64).tobytes())
        else:
            h.update("\x1f".join(vals.to_pylist()).encode("utf-8", "surrogatepass"))
    h.update(f"|n={len(dataset)}".encode())
    return h.hexdigest()


_MEMO: OrderedDict[str, TokenizedDataset] = OrderedDict()
_MEMO_MAX = 32


def _memo_put(key: str, ds: TokenizedDataset) -> None:
    _MEMO[key] = ds
    _MEMO.move_to_end(key)
    while len(_MEMO) > _MEMO_MAX:
        _MEMO.popitem(last=False)


def tokenize(dataset: Any, tokenizer: Any, max_length: int = 64,
             cache_dir: str | os.PathLike | None | bool = None,
             batch_size: int = 2000) -> TokenizedDataset:
    """Token ids of ``text`` (and ``text_pair``: ``truncation="longest_first"``), truncated to
    ``max_length``, no padding.

    Memoised in-process and cached on disk under ``cache_dir`` (default ``$FEDLORA_CACHE/tokens``
    or ``~/.cache/fedlora/tokens``; ``False`` disables the disk cache), keyed by the tokenizer's
    content, the data's content and ``max_length``: a later round or process reuses the ids.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{tokenizer_fingerprint(tokenizer)}|"
                         f"{dataset_fingerprint(dataset)}|{int(max_length)}".encode()).hexdigest()
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    path = None
    if cache_dir is not False:
        path = Path(cache_dir if cache_dir not in (None, True) else default_cache_dir()) / \
            f"{key}.pt"
        if path.is_file():
            try:
                ds = TokenizedDataset.from_state(torch.load(path, weights_only=True))
                _memo_put(key, ds)
                return ds
            except Exception:  # noqa: BLE001 - a corrupt cache file is rebuilt
                pass
    ds = _tokenize(dataset, tokenizer, max_length, batch_size)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
            os.close(fd)
            torch.save(ds.to_state(), tmp)
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache is not fatal
            warnings.warn(f"could not write the token cache {path}: {e}", stacklevel=2)
    _memo_put(key, ds)
    return ds


def _tokenize(dataset: Any, tokenizer: Any, max_length: int, batch_size: int) -> TokenizedDataset:
    if "text" not in dataset.column_names or "label" not in dataset.column_names:
        raise ValueError(f"tokenize needs 'text' and 'label' columns, got {dataset.column_names}")
    pair = "text_pair" in dataset.column_names
    want_tt = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    texts = _column(dataset, "text").to_pylist()
    pairs = _column(dataset, "text_pair").to_pylist() if pair else None
    ids: list[list[int]] = []
    tts: list[list[int]] = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], pairs[s:s + batch_size] if pair else None,
                        truncation="longest_first" if pair else True, max_length=max_length,
                        padding=False, return_attention_mask=False,
                        return_token_type_ids=want_tt)
        ids += enc["input_ids"]
        if want_tt:
            tts += enc["token_type_ids"]
    lens = torch.tensor([len(x) for x in ids], dtype=torch.long)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lens, 0)
    vocab = len(tokenizer)
    dtype = torch.int32 if vocab < 2**31 else torch.long
    total = int(offsets[-1])
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                                        count=total)).to(dtype)
    tt = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(tts), dtype=np.int8,
                                      count=total)) if want_tt else None
    labels = torch.as_tensor(_column(dataset, "label").to_numpy().astype(np.int64))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenizedDataset(flat, offsets, labels, tt, pad)


# ---- batching ----------------------------------------------------------------------------------

class TextCollator:
    """Dynamic padding: pads ``input_ids`` (with ``pad_token_id``) and ``token_type_ids`` (0) to the
    batch's longest row; ``attention_mask`` is 1 on tokens, 0 on padding. Rows may carry
    ``labels`` or ``label``; fixed-length rows (the synthetic task) pass through unchanged."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        b = len(rows)
        lens = [int(r["input_ids"].shape[0]) for r in rows]
        t = max(lens, default=0)
        input_ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        has_tt = b > 0 and "token_type_ids" in rows[0]
        tt = torch.zeros((b, t), dtype=torch.long) if has_tt else None
        for i, (r, n) in enumerate(zip(rows, lens)):
            input_ids[i, :n] = r["input_ids"]
            if "attention_mask" in r:
                mask[i, :n] = torch.as_tensor(r["attention_mask"])[:n]
            else:
                mask[i, :n] = 1
            if tt is not None:
                tt[i, :n] = r["token_type_ids"]
        out = {"input_ids": input_ids, "attention_mask": mask}
        if tt is not None:
            out["token_type_ids"] = tt
        key = "labels" if b == 0 or "labels" in rows[0] else "label"
        out["labels"] = torch.as_tensor([int(r[key]) for r in rows], dtype=torch.long)
        return out


def collate_text(rows: list[dict[str, torch.Tensor]], pad_token_id: int = 0
                 ) -> dict[str, torch.Tensor]:
    return TextCollator(pad_token_id)(rows)


def make_text_loader(tok_ds: Dataset, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """Batches of ``input_ids`` / ``attention_mask`` / [``token_type_ids``] / ``labels``, each
    padded to its own longest row. ``seed`` fixes the shuffle order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(int(seed))
    pad = getattr(tok_ds, "pad_token_id", 0)
    return DataLoader(tok_ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                      collate_fn=TextCollator(pad), drop_last=drop_last, num_workers=num_workers)
