"""Hugging Face data sets by id, partitioned by flwr-datasets' ``FederatedDataset``.

``data.name = "hf:<dataset id>"`` (e.g. ``"hf:stanfordnlp/sst2"``, ``"hf:fancyzhx/ag_news"``) or
``"hf:<local folder>"`` (a folder of CSV / JSON(L) / Parquet files that ``datasets.load_dataset``
reads, e.g. ``train.csv`` + ``test.csv``: offline, and how the tests run this path)::

    [data]
    name = "hf:nyu-mll/glue"
    subset = "sst2"            # the data set's configuration, if it has several
    train_split = "train"      # partitioned among the clients
    test_split = "validation"  # the server's held-out split (GLUE's test labels are hidden)
    text_col = "sentence"
    label_col = "label"
    partition = "dirichlet"    # iid | dirichlet (alpha, by label_col) | shards | natural | flwr:<Class>
    partition_by = ""          # natural: one client per value of this column (a user, a hospital)
    limit = 0                  # a seeded subset of this many training rows (0: all)
    partition_kwargs = {}      # flwr:<Class>: its keyword arguments, e.g.
                               #   partition = "flwr:PathologicalPartitioner"
                               #   partition_kwargs = {partition_by = "label", num_classes_per_partition = 2}

Partitions are flwr-datasets' partitioners (``IidPartitioner``, ``DirichletPartitioner``,
``ShardPartitioner``, ``NaturalIdPartitioner``, or any class of ``flwr_datasets.partitioner`` by
name — ``flwr:LinearPartitioner``, ``flwr:SquarePartitioner``, ``flwr:ExponentialPartitioner``,
``flwr:PathologicalPartitioner``, ``flwr:InnerDirichletPartitioner``, ... — with
``num_partitions = clients.num`` unless the class takes none); ``FederatedDataset`` shuffles the
training split with the run's seed first. A natural partition has as many partitions as the
column has values: ``clients.num`` must equal that count (the error says it).

Labels: a ``ClassLabel`` column keeps its ids and names; other labels are numbered in sorted
order over the training split, one mapping for every client and the server. The server evaluates
on ``data.server_examples`` rows of ``test_split``, and Fed-SB's init rows are the next ones.

Downloading needs the Hugging Face Hub; ``HF_DATASETS_OFFLINE=1`` uses what ``datasets`` has
cached. ``check(...)`` (config validation, before Flower starts) resolves the source, the splits
and the columns within seconds, or names the key and the fix.
"""

from __future__ import annotations

import inspect
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

PREFIX = "hf:"
NAMED = {"iid": "IidPartitioner", "dirichlet": "DirichletPartitioner", "shards": "ShardPartitioner",
         "natural": "NaturalIdPartitioner"}


def is_hf(name: str) -> bool:
    return name.startswith(PREFIX)


def dataset_id(name: str) -> str:
    ident = name[len(PREFIX):]
    local = Path(ident).expanduser()
    return str(local.absolute()) if local.is_dir() else ident


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_DATASETS_OFFLINE",
                                                                              "HF_HUB_OFFLINE"))


def partitioner(d, num_partitions: int, seed: int):
    """The flwr-datasets partitioner ``data.partition`` names, for ``num_partitions`` clients."""
    from flwr_datasets import partitioner as fp

    method = d.partition
    cls_name = method[len("flwr:"):] if method.startswith("flwr:") else NAMED.get(method)
    cls = getattr(fp, cls_name or "", None)
    if not (inspect.isclass(cls) and issubclass(cls, fp.Partitioner)) or cls is fp.Partitioner:
        known = sorted(n for n, c in vars(fp).items()
                       if inspect.isclass(c) and issubclass(c, fp.Partitioner) and c is not fp.Partitioner)
        raise ValueError(f"data.partition: {method!r} is not a flwr-datasets partitioner; use iid, "
                         f"dirichlet, shards, natural or flwr:<one of {known}>")
    if method == "iid":
        return cls(num_partitions)
    if method == "dirichlet":
        return cls(num_partitions, d.label_col, d.alpha, min_partition_size=1, self_balancing=False,
                   shuffle=True, seed=seed)
    if method == "shards":
        return cls(num_partitions, d.label_col, num_shards_per_partition=d.shards_per_partition,
                   shuffle=True, seed=seed)
    if method == "natural":
        return cls(partition_by=d.partition_by)
    kw = dict(d.partition_kwargs)
    params = inspect.signature(cls).parameters
    if "num_partitions" in params:
        kw.setdefault("num_partitions", num_partitions)
    if "seed" in params:
        kw.setdefault("seed", seed)
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"data.partition_kwargs: {cls_name}({kw}) failed: {e}") from e


def _load_kwargs(d) -> dict[str, Any]:
    from fedlora.data import cache_root

    kw: dict[str, Any] = {"cache_dir": str(cache_root() / "datasets")}
    if d.subset:
        kw["name"] = d.subset
    return kw


@lru_cache(maxsize=4)
def _federated(data_json: str, num_partitions: int, seed: int):
    from flwr_datasets import FederatedDataset

    from fedlora.config import DataSection

    d = DataSection.model_validate_json(data_json)
    fds = FederatedDataset(dataset=dataset_id(d.name), partitioners={
        d.train_split: partitioner(d, num_partitions, seed)}, preprocessor=_limit(d, seed), shuffle=True,
        seed=seed, **_load_kwargs(d))
    have = fds.partitioners[d.train_split].num_partitions
    if have != num_partitions:
        raise ValueError(f"data.partition = {d.partition!r} (by {d.partition_by or d.label_col!r}) gives "
                         f"{have} partitions, but the run has {num_partitions} clients: set "
                         f"clients.num = {have}")
    return fds


def _limit(d, seed: int):
    """``data.limit``: a seeded subset of that many training rows, before partitioning."""
    if not d.limit:
        return None

    def keep(dd):
        train = dd[d.train_split]
        if d.limit < len(train):
            dd[d.train_split] = train.shuffle(seed=seed).select(range(d.limit))
        return dd

    return keep


@lru_cache(maxsize=8)
def _split(data_json: str, split: str):
    """One whole split, as ``datasets.load_dataset`` gives it (what ``FederatedDataset`` loads)."""
    from datasets import load_dataset

    from fedlora.config import DataSection
    from fedlora.data import _no_progress_bars

    d = DataSection.model_validate_json(data_json)
    with _no_progress_bars():
        return load_dataset(dataset_id(d.name), split=split, **_load_kwargs(d))


@lru_cache(maxsize=4)
def _labels(data_json: str) -> tuple[list[str], dict[str, int]]:
    from fedlora.config import DataSection
    from fedlora.data import label_mapping

    d = DataSection.model_validate_json(data_json)
    return label_mapping(_split(data_json, d.train_split), f"{d.name} [{d.train_split}]", d.text_col,
                         d.label_col)


def _key(d) -> str:
    return d.model_dump_json()


def label_names(d) -> list[str]:
    """The class names (the same on every client and the server, whatever the partitioning)."""
    return _labels(_key(d))[0]


def client_rows(d, partition_id: int, num_partitions: int, seed: int):
    """Client ``partition_id``'s rows of the training split (``text``, ``label``)."""
    from fedlora.data import _no_progress_bars, classification_layout, label_mapping

    names, mapping = _labels(_key(d))
    with _no_progress_bars():
        part = _federated(_key(d), num_partitions, seed).load_partition(partition_id, d.train_split)
    # a client's rows are checked against the whole split's labels
    label_mapping(part, f"{d.name} [{d.train_split}] partition {partition_id}", d.text_col, d.label_col,
                  label_map=mapping)
    return classification_layout(part, d.text_col, d.label_col, None, names, mapping)


def client_raw(d, partition_id: int, num_partitions: int, seed: int):
    """Client ``partition_id``'s rows of the training split as stored (the causal-LM task formats them)."""
    from fedlora.data import _no_progress_bars

    with _no_progress_bars():
        return _federated(_key(d), num_partitions, seed).load_partition(partition_id, d.train_split)


def split_raw(d, split: str):
    """One whole split as stored."""
    return _split(_key(d), split)


def server_rows(d):
    """The whole ``test_split`` (``text``, ``label``): the server's held-out pool."""
    from fedlora.data import classification_layout

    names, mapping = _labels(_key(d))
    return classification_layout(_split(_key(d), d.test_split), d.text_col, d.label_col, None, names,
                                 mapping)


def check(d, num_partitions: int, causal: bool = False) -> None:
    """Config validation: the source exists and is reachable, the splits and columns are there, and
    the partitioner can be built — within seconds, each failure a ``ValueError`` naming the key."""
    ident = d.name[len(PREFIX):]
    if not ident:
        raise ValueError("data.name: 'hf:' needs a data set id or a local folder, e.g. 'hf:stanfordnlp/sst2'")
    local = Path(ident).expanduser()
    looks_local = ident.startswith(("/", ".", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise ValueError(f"data.name: {d.name!r}: no folder {str(local.absolute())!r} (a local Hugging Face "
                         "data set is a folder of CSV/JSON/Parquet files, e.g. train.csv and test.csv)")
    if not looks_local and not _offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            HfApi().dataset_info(ident, timeout=10)
        except RepositoryNotFoundError as e:
            raise ValueError(f"data.name: {d.name!r}: no such data set on the Hugging Face Hub (check the "
                             "id, e.g. 'hf:stanfordnlp/sst2', or log in for a gated one)") from e
        except Exception as e:  # noqa: BLE001 - no network, proxy, DNS ...
            raise ValueError(
                f"data.name: {d.name!r}: the Hugging Face Hub could not be reached ({type(e).__name__}: "
                f"{str(e)[:200]}). Download it once where the Hub is reachable and set "
                "HF_DATASETS_OFFLINE=1 (datasets then reads its cache), or save it as files "
                "(Dataset.to_csv / to_json / to_parquet) and use data.name = 'hf:/path/to/folder' or "
                "a file path") from e
    partitioner(d, num_partitions, 0)  # a bad partition name / kwargs fails here
    from datasets import get_dataset_split_names, load_dataset_builder

    try:
        builder = load_dataset_builder(dataset_id(d.name), **_load_kwargs(d))
        splits = get_dataset_split_names(dataset_id(d.name), **_load_kwargs(d))
    except Exception as e:  # noqa: BLE001 - re-raised naming the key
        key = "data.subset" if "config" in str(e).lower() else "data.name"
        raise ValueError(f"{key}: {d.name!r} (subset {d.subset!r}) could not be read: "
                         f"{type(e).__name__}: {str(e)[:300]}") from e
    for key in ("train_split", "test_split"):
        if getattr(d, key) not in splits:
            others = [x for x in splits if x != d.train_split] if key == "test_split" else splits
            raise ValueError(f"data.{key}: {getattr(d, key)!r} is not a split of {d.name!r}; its splits "
                             f"are {splits}" + (f": set data.{key} to one of {others}" if others else "")
                             + (f" (a folder's splits are its files' names: add {getattr(d, key)}.csv"
                                + (", or give one local file as data.name, of which fedlora holds out 10% "
                                   "for the server" if d.partition in ("iid", "dirichlet", "shards") else "")
                                + ")" if looks_local else ""))
    features = builder.info.features
    if features is None and looks_local:  # a folder of CSV files has none until it is read
        from datasets import load_dataset

        features = load_dataset(dataset_id(d.name), split=d.train_split, **_load_kwargs(d)).features
    if features is not None and causal:  # a causal LM reads the columns of its row format
        from fedlora.lm_data import detect_format

        detect_format(list(features), d.format, f"data.name {d.name!r}")
    if features is not None:
        for key in ("partition_by",) if causal else ("text_col", "label_col", "partition_by"):
            col = getattr(d, key)
            if col and col not in features:
                raise ValueError(f"data.{key}: no column {col!r} in {d.name!r}; its columns are "
                                 f"{list(features)}")
    if d.partition == "natural":  # the count of clients is the data's: say so now, not in every client
        train = _split(_key(d), d.train_split)
        have = len(train.unique(d.partition_by))
        if have != num_partitions:
            from fedlora.lm_data import natural_mismatch

            raise ValueError(natural_mismatch(d.partition_by, have, num_partitions))
