from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("schema_version", "strategy", "round", "scale", "r_max", "ranks", "base_version", "tensors", "state_json", "config_json", "metrics_json", "rng_state", "created_at", "fedlora_version")
    class RanksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    R_MAX_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    RNG_STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FEDLORA_VERSION_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    strategy: str
    round: int
    scale: float
    r_max: int
    ranks: _containers.ScalarMap[str, int]
    base_version: int
    tensors: _containers.MessageMap[str, Tensor]
    state_json: str
    config_json: str
    metrics_json: str
    rng_state: bytes
    created_at: str
    fedlora_version: str
    def __init__(self, schema_version: _Optional[int] = ..., strategy: _Optional[str] = ..., round: _Optional[int] = ..., scale: _Optional[float] = ..., r_max: _Optional[int] = ..., ranks: _Optional[_Mapping[str, int]] = ..., base_version: _Optional[int] = ..., tensors: _Optional[_Mapping[str, Tensor]] = ..., state_json: _Optional[str] = ..., config_json: _Optional[str] = ..., metrics_json: _Optional[str] = ..., rng_state: _Optional[bytes] = ..., created_at: _Optional[str] = ..., fedlora_version: _Optional[str] = ...) -> None: ...

class AdapterExport(_message.Message):
    __slots__ = ("schema_version", "strategy", "round", "scale", "target_modules", "tensors", "meta_json")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    strategy: str
    round: int
    scale: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.MessageMap[str, Tensor]
    meta_json: str
    def __init__(self, schema_version: _Optional[int] = ..., strategy: _Optional[str] = ..., round: _Optional[int] = ..., scale: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Mapping[str, Tensor]] = ..., meta_json: _Optional[str] = ...) -> None: ...
