"""Real text-classification data: files → ``datasets.Dataset`` → partitions → token ids → batches.

Everything goes through the libraries made for it:

- ``load_text_classification(path, ...)``: a ``.csv`` / ``.tsv`` (``.tab``) / ``.json`` /
  ``.jsonl`` / ``.parquet`` file, read by ``datasets.load_dataset("csv" | "json" | "parquet")``
  (TSV: delimiter tab, ``csv.QUOTE_NONE``, as the GLUE files need), → a ``datasets.Dataset`` with
  columns ``text``, [``text_pair``], ``label`` (int, a ``ClassLabel`` whose names are the original
  labels). The Arrow cache of ``load_dataset`` and of the ``.map`` that builds these columns lives
  under ``$FEDLORA_CACHE/datasets`` (default ``~/.cache/fedlora/datasets``), never next to the
  data file.
- ``KNOWN_DATASETS`` (``sst2``, ``agnews``, ``rte``) and ``load_known(name, split)``: the data sets
  under the data root (``resolve_data_root``: ``FEDLORA_DATA``, else ``shared/data`` found next
  to the config file or the repository; see ``shared/data/*/SOURCE.md``).
- ``partition(ds, n, method="iid"|"dirichlet"|"shards")``: flwr-datasets' ``IidPartitioner``,
  ``DirichletPartitioner`` (label skew, α) and ``ShardPartitioner`` (pathological label shards),
  on a ``datasets.Dataset`` or on any dataset with ``.labels`` and ``.subset`` (the synthetic
  ``TensorDictDataset``, ``TokenizedDataset``). ``train_val_split`` for a client's validation set.
- ``tokenize(ds, tokenizer, max_length)``: unpadded token ids from ``Dataset.map(batched=True)``,
  cached by ``datasets`` in an Arrow file named after the tokenizer's content, the data set's
  ``datasets`` fingerprint and the max length (and memoised in-process), so rounds and later
  processes never re-tokenise.
- ``text_collator(ds)`` / ``make_text_loader``: one collate path for DP and non-DP training —
  transformers' ``DataCollatorWithPadding`` over the data set's own tokenizer (its pad id), right
  padding to each batch's longest row, with ``attention_mask``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import itertools
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
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
_CACHE_FORMAT = "fedlora-tokens/2"
# file suffix → the datasets builder that reads it
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".tab": "csv", ".json": "json", ".jsonl": "json",
                ".parquet": "parquet"}


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("real data needs the optional 'models' extra (datasets, flwr-datasets): "
                          'pip install -e ".[models]"') from e
    return datasets


@contextlib.contextmanager
def _no_progress_bars():
    """``datasets``' progress bars off for one call (a simulation has many clients), then as before."""
    from datasets import config
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    switch = not are_progress_bars_disabled() and config.HF_DATASETS_DISABLE_PROGRESS_BARS is not False
    if switch:
        disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            enable_progress_bars()


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


def cache_root() -> Path:
    """fedlora's cache folder: ``$FEDLORA_CACHE``, else ``$XDG_CACHE_HOME/fedlora`` (``~/.cache``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedlora"


def default_cache_dir() -> Path:
    """Where ``tokenize`` keeps its Arrow files: ``cache_root() / "tokens"``."""
    return cache_root() / "tokens"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


# ---- reading files -----------------------------------------------------------------------------

def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception (``datasets`` wraps a pandas error in ``DatasetGenerationError``)."""
    seen = {id(e)}
    while True:
        nxt = e.__cause__ if e.__cause__ is not None else (
            None if e.__suppress_context__ else e.__context__)
        if nxt is None or id(nxt) in seen:
            return e
        e = nxt
        seen.add(id(e))


def _csv_options(suffix: str) -> dict[str, Any]:
    """pandas/``datasets`` CSV options: every field a string as written (no NA guessing: a text
    "NA" or "null" stays text), an over-long row an error rather than a silent index column."""
    tsv = suffix in (".tsv", ".tab")
    return {"delimiter": "\t" if tsv else ",", "quoting": csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
            "keep_default_na": False, "index_col": False}


def _csv_header(path: Path, opts: dict[str, Any]) -> list[str]:
    import pandas as pd

    try:
        return [str(c) for c in pd.read_csv(path, nrows=0, sep=opts["delimiter"],
                                            quoting=opts["quoting"], encoding="utf-8").columns]
    except pd.errors.EmptyDataError:
        raise ValueError(f"{str(path)!r} is empty (expected a header row)") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ValueError(f"{str(path)!r}: cannot read its header row as "
                         f"{'TSV' if opts['delimiter'] == chr(9) else 'CSV'} (UTF-8): {e}") from e


def file_columns(path: Path) -> list[str]:
    """The columns of a local data file (a CSV/TSV header, a JSON-lines file's first record, a
    Parquet schema; a JSON document is read whole): for checks before a run starts."""
    suffix = path.suffix.lower()
    builder = FILE_FORMATS.get(suffix)
    if builder is None:
        raise ValueError(f"{str(path)!r}: expected a {', '.join(FILE_FORMATS)} file (got suffix {suffix!r})")
    if builder == "csv":
        return _csv_header(path, _csv_options(suffix))
    if builder == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path, encoding="utf-8") as f:  # JSON lines: the first record
        first = next((line.strip() for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        row = None
    if isinstance(row, dict):
        return list(row)
    import pandas as pd  # a JSON document (a list of records, or columns): as the loader reads it

    try:
        return [str(c) for c in pd.read_json(path).columns]
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: cannot read it as JSON lines or a JSON document of records: "
                         f"{e}") from e


def _load_file(path: Path, cols: list[str]):
    """``datasets.load_dataset`` on one local file → its ``train`` split, the ``cols`` checked."""
    datasets = _datasets()
    suffix = path.suffix.lower()
    builder = FILE_FORMATS.get(suffix)
    if builder is None:
        raise ValueError(f"{str(path)!r}: expected a {', '.join(FILE_FORMATS)} file (got suffix "
                         f"{suffix!r})")
    kw: dict[str, Any] = {}
    header: list[str] = []
    if builder == "csv":
        kw = _csv_options(suffix)
        header = _csv_header(path, kw)
        missing = [c for c in cols if c not in header]
        if missing:
            raise ValueError(f"{str(path)!r}: no column(s) {missing}; the columns are {header}")
        # every column read (``usecols`` would hide rows longer than the header), as strings
        kw.update(encoding="utf-8",
                  features=datasets.Features({c: datasets.Value("string") for c in header}))
    cache = cache_root() / "datasets"
    tmp = None
    if not _writable_dir(cache):  # a read-only cache: a throw-away one, the data kept in memory
        tmp = tempfile.TemporaryDirectory(prefix="fedlora-datasets-")
        warnings.warn(f"the data cache {str(cache)!r} is not writable; reading {str(path)!r} "
                      "without a cache", stacklevel=3)
        cache = Path(tmp.name)
    import pandas as pd

    try:
        with _no_progress_bars(), warnings.catch_warnings():
            # pandas warns (and drops a field) when the first row is longer than the header
            warnings.simplefilter("error", pd.errors.ParserWarning)
            ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                       cache_dir=str(cache), keep_in_memory=tmp is not None, **kw)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        cause = _root_cause(e)
        if isinstance(cause, pd.errors.ParserWarning):
            msg = (f"the first data row (line 2, unless blank lines come first) has more fields "
                   f"than the header's {len(header)} ({header})")
        elif "corresponds to no data" in str(cause):
            msg = "no data rows"
        else:
            msg = f"{type(cause).__name__}: {cause}"
        raise ValueError(f"{str(path)!r} (read as {builder}): {msg}") from e
    finally:
        if tmp is not None:
            tmp.cleanup()
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise ValueError(f"{str(path)!r}: no column(s) {missing}; the columns are {ds.column_names}")
    return ds


def _label_names(raw: Sequence[str]) -> list[str]:
    uniq = sorted(set(raw))
    try:  # integer labels sort by value ("2" < "10")
        return sorted(uniq, key=int)
    except ValueError:
        return uniq


def _as_strings(col):
    """An Arrow column as strings (JSON/Parquet integers → "1")."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col
    return pc.cast(col, pa.string())


def _bad_rows(mask) -> str:
    rows = np.flatnonzero(np.asarray(mask))
    first = ", ".join(str(int(i) + 1) for i in rows[:5])
    return f"{len(rows)} row(s) (data rows {first}{', ...' if len(rows) > 5 else ''}; 1 = the first)"


def _layout(batch, text_col: str, text_pair_col: str | None, label_col: str, keys: list[str],
            ids: list[int]):
    """One Arrow batch → ``text``, [``text_pair``], ``label`` (``keys[k]`` → ``ids[k]``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {"text": _as_strings(batch[text_col])}
    if text_pair_col:
        out["text_pair"] = _as_strings(batch[text_pair_col])
    pos = pc.index_in(pc.utf8_trim_whitespace(_as_strings(batch[label_col])),
                      value_set=pa.array(keys, pa.string()))
    out["label"] = pa.array(np.asarray(ids, dtype=np.int64)[pos.to_numpy(zero_copy_only=False)])
    return pa.table(out)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def load_text_classification(path: str | os.PathLike, text_col: str = "sentence",
                             label_col: str = "label", text_pair_col: str | None = None,
                             label_map: dict[str, int] | None = None, limit: int | None = None,
                             seed: int = 0, config_key: str = "data.path", offset: int = 0):
    """A CSV/TSV/JSON(L)/Parquet file → ``datasets.Dataset`` with ``text``, [``text_pair``],
    ``label`` (int).

    The file is read by ``datasets.load_dataset`` by suffix: ``.csv`` (``"csv"``), ``.tsv`` /
    ``.tab`` (``"csv"``, delimiter tab, no quoting, as the GLUE files need), ``.json`` / ``.jsonl``
    (``"json"``: JSON lines or a list of records), ``.parquet`` (``"parquet"``). CSV/TSV fields
    are read as written (strings; "NA" stays text). Its Arrow cache, and the ``.map`` building
    the columns below, live under ``cache_root()/datasets`` (the data folder is never written;
    an unwritable cache means a throw-away one, with a warning); ``datasets`` keys that cache on
    the file's path and modification time, so a changed file is read again.

    Labels map through ``label_map`` (original string → int) or, without one, to their index in
    the sorted unique labels of the whole file (integers sorted numerically), so the ids do not
    depend on ``limit``/``offset``. The ``label`` column is a ``ClassLabel`` whose names are the
    original labels. A row without a label (a missing or empty field — also what a row with fewer
    fields than the header gives) is an error. ``limit`` keeps a random subset of that many rows
    (seeded, file order kept); ``offset`` skips the first ``offset`` rows of that seeded order, so
    ``offset=N`` gives rows disjoint from ``limit=N`` (a second held-out split).
    """
    _datasets()  # the clear "install the models extra" error first
    path = Path(path).expanduser()
    if not path.is_file():
        raise missing_file_error(path, config_key)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    cols = [text_col, label_col] + ([text_pair_col] if text_pair_col else [])
    ds = _load_file(path, cols)
    names, label_map = label_mapping(ds, repr(str(path)), text_col, label_col, text_pair_col, label_map)
    n = len(ds)
    if offset or (limit is not None and limit < n):
        if offset + (limit or 1) > n:
            raise ValueError(f"{str(path)!r} has {n} rows: too few for {limit or 'all'} rows "
                             f"after the first {offset}")
        perm = np.random.default_rng(seed).permutation(n)
        keep = np.sort(perm[offset:offset + limit] if limit is not None else perm[offset:])
        ds = ds.select(keep.tolist())
    return classification_layout(ds, text_col, label_col, text_pair_col, names, label_map)


def label_mapping(ds, where: str, text_col: str, label_col: str, text_pair_col: str | None = None,
                  label_map: dict[str, int] | None = None) -> tuple[list[str], dict[str, int]]:
    """``(class names, {original label as text: class id})`` of a ``datasets.Dataset``, after checking
    that no row lacks its text or label (``where`` names the source in errors). Without a
    ``label_map``: a ``ClassLabel`` column keeps its ids and names; other labels are numbered in
    sorted order (integers by value)."""
    import pyarrow.compute as pc

    for c in [text_col] + ([text_pair_col] if text_pair_col else []):
        nulls = pc.is_null(_column(ds, c)).to_numpy(zero_copy_only=False)
        if nulls.any():
            raise ValueError(f"{where}: column {c!r} is missing in {_bad_rows(nulls)}")
    feature = ds.features.get(label_col)
    if label_map is None and type(feature).__name__ == "ClassLabel":
        return list(feature.names), {str(i): i for i in range(feature.num_classes)}
    raw = pc.utf8_trim_whitespace(_as_strings(_column(ds, label_col)))
    empty = pc.fill_null(pc.equal(pc.utf8_length(raw), 0), True).to_numpy(zero_copy_only=False)
    if empty.any():
        raise ValueError(f"{where}: no {label_col!r} value in {_bad_rows(empty)} (a row with "
                         "fewer fields than the header leaves its last columns empty)")
    present = pc.unique(raw).to_pylist()
    if label_map is None:
        names = _label_names(present)
        return names, {name: i for i, name in enumerate(names)}
    label_map = {str(k): int(v) for k, v in label_map.items()}
    unknown = sorted(set(present) - set(label_map))
    if unknown:
        raise ValueError(f"{where}: labels {unknown[:10]} are not in label_map {label_map}")
    if sorted(set(label_map.values())) != list(range(len(set(label_map.values())))):
        raise ValueError(f"label_map values must be 0..C-1, got {label_map}")
    names = [None] * len(set(label_map.values()))
    for k, v in label_map.items():
        names[v] = names[v] or k
    return names, label_map


def classification_layout(ds, text_col: str, label_col: str, text_pair_col: str | None,
                          names: Sequence[str], label_map: dict[str, int]):
    """``ds`` → columns ``text``, [``text_pair``], ``label`` (a ``ClassLabel`` of ``names``; ids
    through ``label_map``, see ``label_mapping``), by a cached ``Dataset.map``."""
    datasets = _datasets()
    feats = {"text": datasets.Value("string")}
    if text_pair_col:
        feats["text_pair"] = datasets.Value("string")
    feats["label"] = datasets.ClassLabel(names=[str(n) for n in names])
    keys = list(label_map)
    ids = [label_map[k] for k in keys]
    with _no_progress_bars():
        return ds.with_format("arrow").map(
            _layout, batched=True, batch_size=10_000, remove_columns=ds.column_names,
            features=datasets.Features(feats),
            fn_kwargs={"text_col": text_col, "text_pair_col": text_pair_col, "label_col": label_col,
                       "keys": keys, "ids": ids},
            new_fingerprint=_fingerprint("layout/1", ds._fingerprint, text_col, text_pair_col,
                                         label_col, keys, ids, names)).with_format(None)


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
    #: where to get it: the files' origin (research use: fedlora does not ship them) and the
    #: Hugging Face copy, as the overrides that use it instead
    origin: str = ""
    hub: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def label_map(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names)}


_GLUE = "the GLUE benchmark (gluebenchmark.com, research use)"
KNOWN_DATASETS: dict[str, DatasetSpec] = {
    "sst2": DatasetSpec("sst2", "sst2/train.tsv", "sst2/test.tsv", "sentence", "label",
                        ("0", "1"), max_length=64,
                        origin=f"SST-2 from {_GLUE}: TSV files with columns sentence, label",
                        hub="--set data.name='hf:stanfordnlp/sst2' --set data.test_split='validation'"),
    # The usual AG News class order (the HF ``ag_news`` ids).
    "agnews": DatasetSpec("agnews", "agnews/train.tsv", "agnews/test.tsv", "text", "label",
                          ("World", "Sports", "Business", "Sci/Tech"), max_length=128,
                          origin="AG News (Zhang et al., 2015, research use): TSV files with columns "
                          "text, label",
                          hub="--set data.name='hf:fancyzhx/ag_news' --set data.text_col='text'"),
    # GLUE ids: entailment = 0, not_entailment = 1.
    "rte": DatasetSpec("rte", "rte/train.tsv", "rte/test.tsv", "sentence1", "label",
                       ("entailment", "not_entailment"), text_pair_col="sentence2",
                       max_length=128, origin=f"RTE from {_GLUE}: TSV files with columns sentence1, "
                       "sentence2, label"),
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
                         "CSV/TSV/JSON/Parquet path with its text/label columns)")
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


def labels_of(ds: Any, label_col: str = "label") -> np.ndarray:
    """The label column of a ``datasets.Dataset``, or ``.labels`` of a tensor data set."""
    if hasattr(ds, "column_names"):  # datasets.Dataset
        return _column(ds, label_col).to_numpy()
    if hasattr(ds, "labels"):
        return np.asarray(torch.as_tensor(ds.labels).cpu())
    raise TypeError(f"cannot read labels of a {type(ds).__name__}: give a datasets.Dataset or a "
                    "dataset with .labels and .subset")


def select_rows(ds: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of either kind of data set (a partition from ``partition_indices``)."""
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
    idx = partition_indices(labels_of(dataset, label_col), num_partitions, method, alpha,
                            shards_per_partition, seed, min_partition_size)
    return [select_rows(dataset, i) for i in idx]


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
    return select_rows(dataset, np.sort(perm[n_val:])), select_rows(dataset, np.sort(perm[:n_val]))



# ---- tokenisation ------------------------------------------------------------------------------

class TokenizedDataset(Dataset):
    """Unpadded token ids as a torch ``Dataset``: rows are dicts ``input_ids`` (1-D long),
    [``token_type_ids``], ``labels`` (0-D long).

    ``tokenize`` builds it from the ``datasets.Dataset`` that ``Dataset.map`` wrote (``.hf``):
    its Arrow list columns are taken once as flat storage (``ids`` + ``offsets``, a copy of a few
    MB), because indexing a ``datasets.Dataset`` row by row costs ~0.5-1 ms a row against ~30-70 µs here.
    ``subset`` is a row-index view on the same storage. ``tokenizer`` (when known) is the one that
    made the ids; ``text_collator`` pads with it.
    """

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor,
                 type_ids: torch.Tensor | None = None, pad_token_id: int = 0,
                 rows: torch.Tensor | None = None, *, tokenizer: Any = None, hf: Any = None) -> None:
        self.ids, self.offsets, self.type_ids = ids, offsets, type_ids
        self._labels = labels.long()
        self.pad_token_id = int(pad_token_id)
        self.rows = rows  # None: all rows in order
        self.tokenizer = tokenizer
        self._hf = hf

    @classmethod
    def from_hf(cls, hf: Any, pad_token_id: int = 0, tokenizer: Any = None) -> TokenizedDataset:
        """From a ``datasets.Dataset`` with ``input_ids`` [, ``token_type_ids``] (lists of ints) and
        ``labels``."""
        def flat(name: str, dtype: np.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            col = _column(hf, name)
            off = np.asarray(col.offsets, dtype=np.int64)
            vals = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=dtype)
            return torch.from_numpy(vals.copy()), torch.from_numpy(off - off[0])

        ids, offsets = flat("input_ids", np.int32)
        tt = flat("token_type_ids", np.int8)[0] if "token_type_ids" in hf.column_names else None
        labels = torch.from_numpy(_column(hf, "labels").to_numpy(zero_copy_only=False)
                                  .astype(np.int64))
        return cls(ids, offsets, labels, tt, pad_token_id, tokenizer=tokenizer, hf=hf)

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

    @property
    def hf(self) -> Any:
        """The rows as a ``datasets.Dataset`` (``None`` when built from tensors)."""
        if self._hf is None or self.rows is None:
            return self._hf
        return self._hf.select(self.rows.tolist())

    def subset(self, idx: torch.Tensor | Sequence[int]) -> TokenizedDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        rows = idx if self.rows is None else self.rows[idx]
        return TokenizedDataset(self.ids, self.offsets, self._labels, self.type_ids,
                                self.pad_token_id, rows, tokenizer=self.tokenizer, hf=self._hf)


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


_MEMO: OrderedDict[str, TokenizedDataset] = OrderedDict()
_MEMO_MAX = 32


def _memo_put(key: str, ds: TokenizedDataset) -> None:
    _MEMO[key] = ds
    _MEMO.move_to_end(key)
    while len(_MEMO) > _MEMO_MAX:
        _MEMO.popitem(last=False)


def _list_array(rows: list[list[int]], dtype: type):
    """Python lists of ints → one Arrow ``list<dtype>`` array (no per-value Python objects)."""
    import pyarrow as pa

    lens = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
    off = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lens, out=off[1:])
    vals = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=int(off[-1]))
    return pa.ListArray.from_arrays(pa.array(off), pa.array(vals))


def _encode(batch, tokenizer: Any, max_length: int, pair: bool, want_tt: bool):
    """One Arrow batch of ``text`` [, ``text_pair``], ``label`` → token ids (``Dataset.map``)."""
    import pyarrow as pa

    enc = tokenizer(batch["text"].to_pylist(), batch["text_pair"].to_pylist() if pair else None,
                    truncation="longest_first" if pair else True, max_length=max_length,
                    padding=False, return_attention_mask=False, return_token_type_ids=want_tt)
    out = {"input_ids": _list_array(enc["input_ids"], np.int32)}
    if want_tt:
        out["token_type_ids"] = _list_array(enc["token_type_ids"], np.int8)
    out["labels"] = batch["label"]
    return pa.table(out)


def tokenize(dataset: Any, tokenizer: Any, max_length: int = 64,
             cache_dir: str | os.PathLike | None | bool = None,
             batch_size: int = 2000) -> TokenizedDataset:
    """Token ids of ``text`` (and ``text_pair``: ``truncation="longest_first"``), truncated to
    ``max_length``, no padding, as a ``TokenizedDataset``.

    ``dataset.map(batched=True)`` does the work; ``datasets`` caches its result in the Arrow file
    ``<cache_dir>/<key>.arrow`` (default ``cache_dir``: ``$FEDLORA_CACHE/tokens`` or
    ``~/.cache/fedlora/tokens``; ``False``: no file, ``keep_in_memory``), ``key`` hashing the
    tokenizer's content, the data set's ``datasets`` fingerprint (which follows the file and
    every ``select``/``map`` that made it) and ``max_length``; a later round or process reuses
    it. The result is also memoised in-process (same key → the same object). The on-disk cache
    is used because measured it is not slower: writing the Arrow file costs no more than building
    the same table in memory (SST-2 train, 60,614 rows, MiniLM, 2 busy cores: ~7 s either way,
    most of it the tokenizer; the former hand-written path ~9 s in the same run), and a hit takes
    ~15 ms (the former ``.pt`` cache ~40 ms, most of it hashing the texts).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not hasattr(dataset, "column_names") or not hasattr(dataset, "_fingerprint"):
        raise TypeError(f"tokenize needs a datasets.Dataset, got {type(dataset).__name__}")
    if "text" not in dataset.column_names or "label" not in dataset.column_names:
        raise ValueError(f"tokenize needs 'text' and 'label' columns, got {dataset.column_names}")
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{tokenizer_fingerprint(tokenizer)}|"
                         f"{dataset._fingerprint}|{int(max_length)}".encode()).hexdigest()
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    datasets = _datasets()
    pair = "text_pair" in dataset.column_names
    want_tt = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    feats = {"input_ids": datasets.List(datasets.Value("int32"))}
    if want_tt:
        feats["token_type_ids"] = datasets.List(datasets.Value("int8"))
    feats["labels"] = datasets.Value("int64")
    where: dict[str, Any] = {"keep_in_memory": True}
    path = None
    if cache_dir is not False:
        folder = Path(cache_dir if cache_dir not in (None, True) else default_cache_dir())
        if _writable_dir(folder):
            path = folder / f"{key}.arrow"
            where = {"cache_file_name": str(path)}
        else:  # a read-only cache is not fatal
            warnings.warn(f"the token cache {str(folder)!r} is not writable; tokenising in memory",
                          stacklevel=2)

    def run() -> Any:
        with _no_progress_bars():
            return dataset.with_format("arrow").map(
                _encode, batched=True, batch_size=batch_size, remove_columns=dataset.column_names,
                features=datasets.Features(feats), new_fingerprint=key[:32],
                fn_kwargs={"tokenizer": tokenizer, "max_length": int(max_length), "pair": pair,
                           "want_tt": want_tt}, **where).with_format(None)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if len(dataset) == 0:  # .map on no rows makes no columns
        none = torch.zeros(0, dtype=torch.long)
        ds = TokenizedDataset(none.int(), torch.zeros(1, dtype=torch.long), none,
                              none.to(torch.int8) if want_tt else None, pad, tokenizer=tokenizer)
        _memo_put(key, ds)
        return ds
    cached = path is not None and path.is_file()
    try:
        out = run()
    except Exception:
        if not cached:
            raise
        path.unlink(missing_ok=True)  # a corrupt cache file is rebuilt
        out = run()
    ds = TokenizedDataset.from_hf(out, pad, tokenizer)
    _memo_put(key, ds)
    return ds


# ---- batching ----------------------------------------------------------------------------------

@lru_cache(maxsize=16)
def _pad_only_tokenizer(pad_token_id: int):
    """A transformers tokenizer that knows nothing but its pad token (id ``pad_token_id``), for
    padding rows whose own tokenizer is unknown (``TextCollator(pad_token_id)``)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"[PAD]": int(pad_token_id)}, unk_token="[PAD]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", padding_side="right",
                                   model_input_names=["input_ids", "token_type_ids",
                                                      "attention_mask"])


def _right_padding(tokenizer: Any) -> Any:
    """``tokenizer`` padding on the right with an attention mask (a shallow copy if it does not):
    the real tokens keep positions 0..n-1, as unpadded, whatever the model family."""
    names = list(getattr(tokenizer, "model_input_names", []))
    if getattr(tokenizer, "padding_side", "right") == "right" and "attention_mask" in names:
        return tokenizer
    tok = copy.copy(tokenizer)
    tok.padding_side = "right"
    if "attention_mask" not in names:
        tok.model_input_names = [*names, "attention_mask"]
    return tok


class TextCollator:
    """Dynamic padding with transformers' ``DataCollatorWithPadding``: ``input_ids`` padded with
    the pad id, ``token_type_ids`` with the tokenizer's pad type id (0), ``attention_mask`` 1 on
    tokens and 0 on padding (a row's own mask is padded with 0), all to the batch's longest row,
    on the right; ``label`` becomes ``labels``; every tensor ``long``. Fixed-length rows (the
    synthetic task) pass through unchanged; an empty batch gives 0-row tensors.

    ``TextCollator(pad_token_id)`` pads with that id; ``TextCollator(tokenizer=tok)`` with the
    tokenizer's own (``text_collator(ds)`` picks the data set's). The same object serves DP
    (Opacus) and non-DP loaders.
    """

    def __init__(self, pad_token_id: int | None = 0, tokenizer: Any = None) -> None:
        from transformers import DataCollatorWithPadding

        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer = None  # no pad token: pad with pad_token_id (default 0), as before
        if tokenizer is None:
            tokenizer = _pad_only_tokenizer(0 if pad_token_id is None else int(pad_token_id))
        elif pad_token_id is not None and int(pad_token_id) != tokenizer.pad_token_id:
            raise ValueError(f"pad_token_id={pad_token_id} but the tokenizer pads with "
                             f"{tokenizer.pad_token_id}")
        self.tokenizer = _right_padding(tokenizer)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        # NumPy out, then torch.from_numpy: 2-3x faster than return_tensors="pt", whose
        # torch.tensor(nested lists) dominates a batch (32 AG News rows: ~2 ms against ~5-7 ms)
        self._pad = DataCollatorWithPadding(self.tokenizer, padding="longest", return_tensors="np")

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not rows:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(),
                    "labels": torch.zeros(0, dtype=torch.long)}
        return {k: torch.from_numpy(np.asarray(v)).long() for k, v in self._pad(rows).items()}


def text_collator(dataset: Any) -> TextCollator:
    """The collator for ``dataset``'s rows, padding with that data set's own pad id: its
    tokenizer's (``DataCollatorWithPadding`` over it) for a ``TokenizedDataset`` from ``tokenize``,
    else its ``.pad_token_id`` (0 when it has none, e.g. the synthetic task). ``make_text_loader``
    uses it; a DP loader (Opacus) should too, so both pad alike."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    tok = getattr(dataset, "tokenizer", None)
    if tok is not None and getattr(tok, "pad_token_id", None) is not None:
        return TextCollator(None, tokenizer=tok)
    return TextCollator(getattr(dataset, "pad_token_id", 0))


def collate_text(rows: list[dict[str, torch.Tensor]], pad_token_id: int = 0
                 ) -> dict[str, torch.Tensor]:
    """``TextCollator(pad_token_id)(rows)``."""
    return TextCollator(pad_token_id)(rows)


def make_text_loader(tok_ds: Dataset, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """Batches of ``input_ids`` / ``attention_mask`` / [``token_type_ids``] / ``labels``, each
    padded to its own longest row by ``text_collator(tok_ds)``. ``seed`` fixes the shuffle order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(int(seed))
    return DataLoader(tok_ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                      collate_fn=text_collator(tok_ds), drop_last=drop_last,
                      num_workers=num_workers)
