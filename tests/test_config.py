"""Run config: defaults, TOML loading, overrides and validation errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config import RunConfig, load_config, parse_value

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_file_is_the_defaults_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "simulations" / "smoke.toml")
    ref = RunConfig()
    assert (cfg.clients, cfg.train, cfg.strategy, cfg.data, cfg.model) == \
        (ref.clients, ref.train, ref.strategy, ref.data, ref.model)
    assert cfg.r_max == 8 and cfg.scale == 2.0 and [cfg.rank_for(i) for i in range(4)] == [2, 4, 8, 2]
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert load_config(p) == cfg


def test_overrides_and_flat_aliases():
    cfg = load_config(None, ["train.lr=0.005", "clients.ranks=[1,16]", 'strategy.name="flora"',
                             "num-server-rounds=7", "ranks=[2,4]", "min-nodes=3", "run-dir=/tmp/x",
                             "data.name=synthetic"])
    assert cfg.train.lr == 0.005 and cfg.clients.ranks == [2, 4] and cfg.strategy.name == "flora"
    assert cfg.rounds == 7 and cfg.clients.min_nodes == 3 and cfg.run_dir == "/tmp/x"
    assert cfg.r_max == 4
    assert load_config(None, ['ranks="[2,8]"']).clients.ranks == [2, 8]  # a list inside a string
    assert parse_value("abc") == "abc" and parse_value("[1, 2]") == [1, 2] and parse_value("1e-3") == 1e-3


@pytest.mark.parametrize("overrides, key", [
    (["train.learning_rate=0.1"], "train.'learning_rate'"),
    (["optimiser.lr=0.1"], "'optimiser'"),
    (["strategy.name=fedprox"], "strategy.name"),
    (["train.lr=-1"], "train.lr"),
    (["train.lr='fast'"], "train.lr"),
    (["train.local_steps=1.5"], "train.local_steps"),
    (["clients.ranks=[0, 4]"], "clients.ranks"),
    (["clients.fraction_train=0"], "clients.fraction_train"),
    (["clients.device='tpu'"], "clients.device"),
    (["strategy.r_max=2"], "strategy.r_max"),
    (["data.name='nope.tsv'"], "data.name"),
    (["data.partition='random'"], "data.partition"),
    (["privacy.enabled=true"], "privacy.target_epsilon"),
    (["privacy.sigma=1.0"], "privacy"),
    (["clients=3"], "clients"),
    (["strategy.name=fedsa", "data.val_fraction=0"], "data.val_fraction"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert key in str(e.value), str(e.value)


def test_bad_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nlr = 0.1\nbatch = 3\n")
    with pytest.raises(ValueError, match=r"train\.'batch'") as e:
        load_config(p)
    assert "known keys of [train]: [" in str(e.value) and "'batch_size'" in str(e.value)


def test_cli_rejects_a_bad_config_before_any_work(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fedlora.cli", "simulate", "--set", "train.nope=1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "train.'nope'" in res.stdout + res.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_data_or_model_is_a_config_error_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="FEDLORA_DATA=/that/folder") as e:
        load_config(None, ['data.name="sst2"', 'model.name="minilm"'])
    assert str(tmp_path / "nowhere" / "sst2") in str(e.value) and "data.root" in str(e.value)
    with pytest.raises(ValueError, match="model.name.*no folder"):
        load_config(None, [f'model.name="hf:{tmp_path / "no-model"}"'])


def test_gpu_memory_per_client_sets_rays_gpu_fraction(monkeypatch):
    """clients.gpu_memory_gb: the GPU share per virtual client is what it needs over the device's memory
    (at most 1), so Ray runs as many clients per GPU at once as fit; an error without CUDA."""
    import torch

    cfg = load_config(None, ["clients.gpu_memory_gb=10.0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"clients.gpu_memory_gb = 10.0: no CUDA device here"):
        cfg.gpu_fraction()

    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    assert cfg.gpu_fraction() == pytest.approx(0.125)  # eight clients at a time on an 80 GiB GPU
    assert load_config(None, ["clients.gpu_memory_gb=100.0"]).gpu_fraction() == 1.0
    assert load_config(None, ["clients.num_gpus=0.5"]).gpu_fraction() == 0.5
    with pytest.raises(ValueError, match=r"clients.gpu_memory_gb: give clients.num_gpus .* not both"):
        load_config(None, ["clients.num_gpus=0.5", "clients.gpu_memory_gb=10.0"])


def test_clients_that_use_cuda_get_a_gpu_share_and_a_missing_gpu_is_named(monkeypatch):
    """Ray hides the GPUs from a virtual client without a GPU share: CUDA clients with none configured
    get a whole GPU each; a CUDA device that is not here is a config error, not a failure per client."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"clients.device = 'cuda': no CUDA GPU on this machine"):
        load_config(None, ['clients.device="cuda"']).gpu_fraction()
    load_config(None, ["clients.gpu_memory_gb=10.0"]).check_simulation_device()  # in process: no GPU asked
    auto = load_config(None, ['clients.device="auto"'])
    assert auto.gpu_fraction() == 0.0 and not auto.default_gpu_share()  # auto on a CPU machine: CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("cuda", "auto"):
        cfg = load_config(None, [f'clients.device="{device}"'])
        assert cfg.gpu_fraction() == 1.0 and cfg.default_gpu_share()
    assert load_config(None, []).gpu_fraction() == 0.0  # clients.device = "cpu"
    assert load_config(None, ['clients.device="cuda"', "clients.num_gpus=0.25"]).gpu_fraction() == 0.25
    with pytest.raises(ValueError, match=r"clients.device = 'cuda:1': on Flower's engine Ray gives each"):
        load_config(None, ['clients.device="cuda:1"']).gpu_fraction()


def test_a_model_folder_without_hf_prefix_is_named_with_the_fix(tmp_path):
    msg = rf"choose one of \['minilm', 'tiny', 'hf:<path>'\] \(a local folder is named hf:{tmp_path}\)"
    with pytest.raises(ValueError, match=msg):
        load_config(None, [f'model.name="{tmp_path}"'])


def test_text_data_with_a_model_that_has_no_tokenizer_is_a_config_error(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("sentence,label\ngood,pos\nbad,neg\n")
    with pytest.raises(ValueError, match=r"model.name: data.name = .* is text: use a pretrained model with a "
                                         r"tokenizer \(model.name = 'minilm' or 'hf:<folder>'\), not 'tiny'"):
        load_config(None, [f'data.name="{path}"'])


def test_an_hf_test_split_that_is_the_training_split_is_refused():
    with pytest.raises(ValueError, match=r"data.test_split: is the clients' training split \('train'\)"):
        load_config(None, ['data.name="hf:/nowhere"', 'data.test_split="train"', 'model.name="minilm"'],
                    validate_data=False)
