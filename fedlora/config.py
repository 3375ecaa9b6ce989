"""Run configuration: dataclasses, TOML loading, ``--set`` overrides, validation (before any work).

A run is one TOML file; every section and key is optional (the defaults are the smoke run)::

    name = "smoke"            seed = 0            rounds = 3
    output_dir = "runs"       # the run folder is <output_dir>/<name> unless run_dir is given
    [model]     name = "tiny"          kwargs = {}
    [lora]      targets = []  head = []   alpha = 16.0   scale = 0.0   dropout = 0.0   rslora = false
    [strategy]  name = "fedex"  weighting = "samples"  r_max = 0  fedsb_init_examples = 64 ...
    [clients]   num = 6  ranks = [2, 4, 8]  fraction_train = 1.0  min_nodes = 0  round_timeout = 600.0
                min_replies = 0
    [data]      name = "synthetic"  examples_per_client = 256  partition = "iid" ...
    [train]     local_steps = 10  batch_size = 32  lr = 0.01  optimizer = "adamw"
    [eval]      every = 1  batch_size = 256
    [privacy]   enabled = false ...   (fedlora.privacy.PrivacyConfig)

Rules: ``lora.scale = 0`` means ``alpha / r_max`` (one scale for every client, whatever its rank);
``strategy.r_max = 0`` means ``max(clients.ranks)``; ``clients.min_nodes = 0`` means every sampled
node; client ``i`` (Flower ``partition-id``) has rank ``clients.ranks[i % len(ranks)]`` unless its
node config sets ``rank``. Unknown sections or keys, wrong types and bad values raise
``ValueError`` naming the key and the fix.

Overrides (``--set``) are ``section.key=value`` with a TOML value (``train.lr=0.01``,
``clients.ranks=[2,8]``, ``strategy.name="flora"``; a bare word is read as a string). The flat
Flower run-config keys are accepted as aliases (``strategy``, ``num-server-rounds``, ``seed``,
``run-dir``, ``round-timeout``, ``min-nodes``, ``num-clients``, ``ranks``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomllib

STRATEGY_NAMES = ("fedavg", "fedex", "flora", "fedsb", "fedsa")
KNOWN_DATA = ("synthetic", "sst2", "agnews", "rte")
PARTITIONS = ("iid", "dirichlet", "shards")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
#: flat aliases (Flower run-config keys, deployment contract) -> dotted config keys
ALIASES = {
    "strategy": "strategy.name", "num-server-rounds": "rounds", "seed": "seed", "run-dir": "run_dir",
    "round-timeout": "clients.round_timeout", "min-nodes": "clients.min_nodes",
    "num-clients": "clients.num", "ranks": "clients.ranks", "rounds": "rounds", "name": "name",
    "min-replies": "clients.min_replies",
}


@dataclass
class ModelSection:
    name: str = "tiny"  # tiny | minilm | hf:<local folder>
    kwargs: dict = field(default_factory=dict)  # extra get_model keyword arguments


@dataclass
class LoRASection:
    targets: list[str] = field(default_factory=list)  # empty: the model's default targets
    head: list[str] = field(default_factory=list)  # trainable head modules; empty: model default
    alpha: float = 16.0
    scale: float = 0.0  # 0: alpha / r_max (or alpha / sqrt(r_max) with rslora)
    dropout: float = 0.0
    rslora: bool = False


@dataclass
class StrategySection:
    name: str = "fedex"
    weighting: str = "samples"  # samples | uniform
    r_max: int = 0  # 0: max(clients.ranks)
    dtype: str = "float32"  # server-side precision: float32 | float64
    fedsb_init_examples: int = 64  # server-held split for the Fed-SB init gradients
    fedsb_init_batches: int = 2
    # size of the LoRA-SB init step U = -eta·sign(G); 0: train.lr (one AdamW-like first step)
    fedsb_eta: float = 0.0


@dataclass
class ClientsSection:
    num: int = 6  # virtual clients (simulation)
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8])
    fraction_train: float = 1.0
    min_nodes: int = 0  # 0: all sampled nodes must be connected before a round starts
    round_timeout: float = 600.0
    min_replies: int = 0  # a round ends once this many sampled clients replied (0: all, or the timeout)
    device: str = "cpu"  # auto | cpu | cuda[:N] (a node's own `device` node config wins)
    num_cpus: int = 1  # Ray resources per virtual client (whole CPUs only)
    num_gpus: float = 0.0
    poll_interval: float = 0.2  # seconds between the server's reply polls (Flower's default: 3)


@dataclass
class DataSection:
    name: str = "synthetic"  # synthetic | sst2 | agnews | rte | path to a CSV/TSV file
    examples_per_client: int = 256  # synthetic: examples each client generates
    partition: str = "iid"  # iid | dirichlet | shards (synthetic iid: one seeded draw per client)
    alpha: float = 0.5  # Dirichlet concentration
    shards_per_partition: int = 2
    val_fraction: float = 0.2  # each client's own validation shard (FedSA personal evaluation)
    server_examples: int = 512  # server's held-out split (synthetic size; real data: test-split cap)
    limit: int = 0  # real data: use at most this many training rows (0: all)
    root: str = ""  # data root (default: FEDLORA_DATA or shared/data)
    text_col: str = "sentence"  # CSV/TSV path only
    label_col: str = "label"
    max_length: int = 0  # tokenisation; 0: the data set's default (64)


@dataclass
class TrainSection:
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 1e-2
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.0
    momentum: float = 0.0


@dataclass
class EvalSection:
    every: int = 1  # server-side evaluation every N rounds (the last round always); 0: last only
    batch_size: int = 256


@dataclass
class RunConfig:
    name: str = "smoke"
    seed: int = 0
    rounds: int = 3
    output_dir: str = "runs"
    run_dir: str = ""  # explicit run folder (absolute or relative to the working directory)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    strategy: StrategySection = field(default_factory=StrategySection)
    clients: ClientsSection = field(default_factory=ClientsSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    privacy: dict = field(default_factory=dict)  # fedlora.privacy.PrivacyConfig fields

    # ---- derived ------------------------------------------------------------------------------
    @property
    def r_max(self) -> int:
        return self.strategy.r_max or max(self.clients.ranks)

    @property
    def scale(self) -> float:
        if self.lora.scale:
            return float(self.lora.scale)
        r = self.r_max
        return self.lora.alpha / (math.sqrt(r) if self.lora.rslora else r)

    def rank_for(self, partition_id: int) -> int:
        return self.clients.ranks[partition_id % len(self.clients.ranks)]

    def resolved_run_dir(self, base: str | Path | None = None) -> Path:
        if self.run_dir:
            return Path(self.run_dir).expanduser().absolute()
        return (Path(base or ".") / self.output_dir / self.name).absolute()

    def to_dict(self) -> dict:
        return asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def client_spec(self) -> dict:
        """What a ClientApp needs, sent inside every train message (clients never read files)."""
        return {"seed": self.seed, "rounds": self.rounds, "strategy": self.strategy.name,
                "model": asdict(self.model), "lora": asdict(self.lora), "r_max": self.r_max,
                "scale": self.scale, "data": asdict(self.data), "train": asdict(self.train),
                "eval": asdict(self.eval), "privacy": dict(self.privacy),
                "device": self.clients.device, "ranks": list(self.clients.ranks)}


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


# ---- TOML writing (tomllib only reads) ------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        raise ValueError("TOML has no null: leave the key out instead")
    raise ValueError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(d: dict) -> str:
    """Top-level scalars first, then one table per dict (inline tables for nested dicts)."""
    head = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    out = "\n".join(head) + "\n"
    for k, v in d.items():
        if isinstance(v, dict):
            out += f"\n[{k}]\n" + "".join(f"{kk} = {_toml_value(vv)}\n" for kk, vv in v.items()
                                          if vv is not None)
    return out


# ---- loading + validation ---------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the field type (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r} (quote it: {key}=\"...\")")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and value.strip().startswith("["):  # a list given as a string
            value = parse_value(value.strip())  # (flat run-config values can only be strings)
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list of {_type_name(item)}, got {value!r}")
        return [_coerce(x, item, f"{key}[{i}]") for i, x in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a table, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {tp} for {key}")  # pragma: no cover


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(d: dict) -> RunConfig:
    """A ``RunConfig`` from a parsed TOML dict; unknown keys and wrong types raise ``ValueError``."""
    cfg = RunConfig()
    top = _hints(RunConfig)
    for key, value in d.items():
        if key not in top:
            raise ValueError(f"unknown config key {key!r}; known top-level keys and sections: "
                             f"{sorted(top)}")
        tp = top[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"[{key}] must be a table (section), got {value!r}")
            sec = getattr(cfg, key)
            hints = _hints(tp)
            for k, v in value.items():
                if k not in hints:
                    raise ValueError(f"unknown config key {key}.{k!r}; known keys of [{key}]: "
                                     f"{sorted(hints)}")
                setattr(sec, k, _coerce(v, hints[k], f"{key}.{k}"))
        else:
            setattr(cfg, key, _coerce(value, tp, key))
    return cfg


def parse_value(text: str) -> Any:
    """A ``--set`` value as TOML (``0.01``, ``[2,4]``, ``"x"``, ``true``); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(d: dict, item: str) -> None:
    """``section.key=value`` (or a flat alias) into the raw dict ``d``."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=0.01)")
    key, _, text = item.partition("=")
    key = ALIASES.get(key.strip(), key.strip())
    value = parse_value(text.strip())
    parts = key.split(".")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"override key {key!r} must be 'key' or 'section.key'")
    if len(parts) == 2:
        sec = d.setdefault(parts[0], {})
        if not isinstance(sec, dict):
            raise ValueError(f"override {key!r}: {parts[0]!r} is not a section")
        sec[parts[1]] = value
    else:
        d[parts[0]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                validate_data: bool = True) -> RunConfig:
    """Read ``path`` (TOML; ``None``: defaults = the smoke run), apply ``overrides``, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist (give a TOML file, e.g. "
                             "simulations/smoke.toml)")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(p)!r} is not valid TOML: {e}") from e
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item)
    cfg = from_dict(raw)
    validate(cfg, config_path=path if validate_data else None, check_data=validate_data)
    return cfg


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}")


def validate(cfg: RunConfig, config_path: str | Path | None = None, check_data: bool = True) -> None:
    """Values that types cannot catch; each error names the key and the fix."""
    _check(bool(re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name)), "name",
           f"use letters, digits, '.', '_' or '-' (it names the run folder), got {cfg.name!r}")
    _check(cfg.rounds >= 1, "rounds", f"must be >= 1, got {cfg.rounds}")
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    from fedlora.models import available_models

    m = cfg.model.name
    _check(m in available_models() or m.startswith("hf:") or m == "minilm", "model.name",
           f"unknown model {m!r}; choose one of {available_models()}")
    _check(cfg.lora.alpha > 0, "lora.alpha", f"must be > 0, got {cfg.lora.alpha}")
    _check(cfg.lora.scale >= 0 and math.isfinite(cfg.lora.scale), "lora.scale",
           f"must be >= 0 (0 means alpha / r_max), got {cfg.lora.scale}")
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    s = cfg.strategy
    _check(s.name in STRATEGY_NAMES, "strategy.name",
           f"unknown strategy {s.name!r}; choose one of {list(STRATEGY_NAMES)}")
    _check(s.weighting in ("samples", "uniform"), "strategy.weighting",
           f"must be 'samples' or 'uniform', got {s.weighting!r}")
    _check(s.dtype in ("float32", "float64"), "strategy.dtype",
           f"must be 'float32' or 'float64', got {s.dtype!r}")
    _check(s.fedsb_init_examples >= 1 and s.fedsb_init_batches >= 1, "strategy.fedsb_init_examples",
           "fedsb_init_examples and fedsb_init_batches must be >= 1")
    _check(s.fedsb_eta >= 0 and math.isfinite(s.fedsb_eta), "strategy.fedsb_eta",
           f"must be >= 0 (0 means train.lr), got {s.fedsb_eta}")
    c = cfg.clients
    _check(c.num >= 1, "clients.num", f"must be >= 1, got {c.num}")
    _check(len(c.ranks) >= 1 and all(r >= 1 for r in c.ranks), "clients.ranks",
           f"must be a non-empty list of integers >= 1, got {c.ranks}")
    _check(s.r_max == 0 or s.r_max >= max(c.ranks), "strategy.r_max",
           f"must be 0 (= max rank) or >= the largest client rank {max(c.ranks)}, got {s.r_max}")
    _check(0 < c.fraction_train <= 1, "clients.fraction_train", f"must be in (0, 1], got {c.fraction_train}")
    _check(c.min_nodes >= 0, "clients.min_nodes", f"must be >= 0, got {c.min_nodes}")
    _check(c.round_timeout > 0, "clients.round_timeout", f"must be > 0 seconds, got {c.round_timeout}")
    _check(c.min_replies >= 0, "clients.min_replies", f"must be >= 0 (0: wait for all), got {c.min_replies}")
    _check(bool(DEVICE_RE.match(c.device)), "clients.device",
           f"must be 'auto', 'cpu' or 'cuda[:N]', got {c.device!r}")
    _check(c.num_cpus >= 1, "clients.num_cpus", f"must be a whole number >= 1, got {c.num_cpus}")
    _check(c.num_gpus >= 0, "clients.num_gpus", f"must be >= 0, got {c.num_gpus}")
    _check(c.poll_interval > 0, "clients.poll_interval", f"must be > 0, got {c.poll_interval}")
    d = cfg.data
    _check(d.partition in PARTITIONS, "data.partition",
           f"must be one of {list(PARTITIONS)}, got {d.partition!r}")
    _check(d.examples_per_client >= 1, "data.examples_per_client", "must be >= 1")
    _check(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    _check(0 <= d.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _check(d.server_examples >= 1, "data.server_examples", "must be >= 1")
    _check(d.limit >= 0 and d.max_length >= 0, "data.limit", "limit and max_length must be >= 0")
    if cfg.strategy.name == "fedsa":
        _check(d.val_fraction > 0, "data.val_fraction",
               "fedsa evaluates personalised models on each client's own validation shard: set "
               "data.val_fraction > 0 (e.g. 0.2)")
    if d.name not in KNOWN_DATA:
        base = Path(config_path).parent if config_path else Path(".")
        p = Path(d.name) if Path(d.name).is_absolute() else base / d.name
        _check(not check_data or p.is_file() or Path(d.name).is_file(), "data.name",
               f"{d.name!r} is neither one of {list(KNOWN_DATA)} nor an existing CSV/TSV file")
    t = cfg.train
    _check(t.local_steps >= 1, "train.local_steps", f"must be >= 1, got {t.local_steps}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"must be > 0, got {t.lr}")
    _check(t.optimizer in ("adamw", "sgd"), "train.optimizer",
           f"must be 'adamw' or 'sgd', got {t.optimizer!r}")
    _check(cfg.eval.every >= 0, "eval.every", f"must be >= 0 (0: last round only), got {cfg.eval.every}")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    privacy_config(cfg)


def privacy_config(cfg: RunConfig):
    """The run's ``fedlora.privacy.PrivacyConfig`` (validated; clients check δ against their n_i)."""
    from fedlora.privacy import PrivacyConfig

    try:
        pc = PrivacyConfig.from_dict(cfg.privacy)
        pc.validate()
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("privacy") else f"privacy: {msg}") from e
    return pc


def config_from_spec_json(text: str) -> dict:
    return json.loads(text)
