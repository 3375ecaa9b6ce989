"""Checkpoints and adapter exports in the versioned schema of ``proto/fedlora/v1/checkpoint.proto``.

- ``save_checkpoint`` / ``load_checkpoint``: the server state after a round (strategy state,
  round, ranks, scale, base version, config, metrics, RNG), written atomically (temp file in the
  same folder, fsync, ``os.replace``) so a crash never leaves a half-written checkpoint.
- Integrity: a checkpoint file is the serialized ``Checkpoint`` message followed by a 46-byte
  **SHA-256 footer** (:data:`FOOTER_SIZE`): the protobuf tag of field 536870911, wire type 2,
  length 40 (``fa ff ff ff 0f 28``), the magic ``SHA256v1`` and the 32-byte SHA-256 of every byte
  before the footer. A footer rather than a ``.sha256`` sidecar: one file is written by one atomic
  rename, so the data and its check can never come from two different saves (a crash between two
  renames, a copied ``.ckpt`` without its sidecar), and there is nothing to keep in step when
  files are copied, moved or deleted. The footer is itself a well-formed protobuf field (unknown
  to the schema), so a reader that does not know about it still parses the file.
  ``load_checkpoint`` verifies the footer before decoding anything and raises ``ValueError``
  naming the file ("corrupt": checksum mismatch, broken structure; "truncated or corrupt": no
  footer). **Files written before the footer existed** are indistinguishable from a truncated
  new file (a protobuf cut at a field boundary still parses), so they are refused by default; a
  caller who trusts such a file passes ``allow_unverified=True`` (loaded with a logged warning,
  after the structural checks). Re-saving it gives a file with a footer.
- ``latest_valid_checkpoint``: the newest ``checkpoints/round-NNNN.ckpt`` of a run that verifies
  and loads, with the newer ones skipped and why (``--resume`` must report them, and fail when
  there is none). ``latest_checkpoint`` is the newest by name only, unverified.
  A strategy's ``state_dict`` (nested dicts / lists / tuples of tensors and scalars) is flattened:
  tensors go to ``Checkpoint.tensors`` under their path, the skeleton to ``state_json`` with
  ``{"__tensor__": path}`` and ``{"__tuple__": [...]}`` placeholders, so loading gives back the
  same structure, dtypes, shapes and values.
(Exports of the global model — the PEFT adapter, the merged model — are ``fedlora.export``.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError

import fedlora
from fedlora.node_cache import atomic_write_bytes
from fedlora.proto.fedlora.v1 import checkpoint_pb2 as pb

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: the footer: protobuf tag of field 536870911 (wire type 2), length 40, magic, SHA-256 (32 bytes)
_FOOTER_PREFIX = bytes.fromhex("faffffff0f28") + b"SHA256v1"
FOOTER_SIZE = len(_FOOTER_PREFIX) + 32
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
           "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


# ---- tensors ------------------------------------------------------------------------------------

def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    """``Tensor{shape, dtype, data}``: C-contiguous little-endian bytes (bfloat16 as its int16 bits)."""
    if t.dtype not in _NAMES:
        raise TypeError(f"dtype {t.dtype} cannot be stored; use one of {sorted(_DTYPES)}")
    t = t.detach().cpu().contiguous()
    arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return pb.Tensor(shape=list(t.shape), dtype=_NAMES[t.dtype], data=data)


def tensor_from_pb(m: pb.Tensor) -> torch.Tensor:
    """Inverse of :func:`tensor_to_pb`; ValueError on an unknown dtype or a size/shape mismatch."""
    if m.dtype not in _DTYPES:
        raise ValueError(f"unknown tensor dtype {m.dtype!r}")
    dt = _DTYPES[m.dtype]
    carrier = torch.int16 if dt == torch.bfloat16 else dt
    np_dt = torch.empty(0, dtype=carrier).numpy().dtype
    shape = tuple(int(d) for d in m.shape)
    if len(m.data) != int(np.prod(shape, dtype=np.int64)) * np_dt.itemsize:
        raise ValueError(f"tensor data has {len(m.data)} bytes, shape {list(shape)} of {m.dtype} needs "
                         f"{int(np.prod(shape, dtype=np.int64)) * np_dt.itemsize}")
    arr = np.frombuffer(m.data, dtype=np_dt.newbyteorder("<")).astype(np_dt).reshape(shape)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dt == torch.bfloat16 else t


# ---- nested state <-> (skeleton, tensors) -----------------------------------------------------------

_RESERVED = ({"__tensor__"}, {"__tuple__"})


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON skeleton of ``obj``; its tensors are added to ``tensors`` under their (unique) path.

    Tensors become ``{"__tensor__": key}``, tuples ``{"__tuple__": [...]}``; dicts (str keys), lists,
    None, bool, int, float and str stay as they are. Anything else is a TypeError naming the path.
    """
    if isinstance(obj, torch.Tensor):
        key, n = path, 1
        while key in tensors:  # "a/b" as one key and as a nested path must not collide
            key, n = f"{path}#{n}", n + 1
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if set(obj) in _RESERVED:
            raise TypeError(f"state dict at {path or '<root>'} uses the reserved key "
                            f"{next(iter(obj))!r} alone")
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"state key {k!r} at {path or '<root>'} is not a string")
            out[k] = flatten(v, tensors, f"{path}/{k}" if path else k)
        return out
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"state value at {path or '<root>'} has unsupported type {type(obj).__name__}")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten` (KeyError when a referenced tensor is missing)."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


# ---- files ----------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    strategy: str
    round: int
    state: dict
    scale: float
    r_max: int
    ranks: dict[str, int] = field(default_factory=dict)
    base_version: int = 0
    config: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    rng_state: bytes = b""
    schema_version: int = SCHEMA_VERSION
    created_at: str = ""
    fedlora_version: str = ""


def save_checkpoint(path: str | os.PathLike, *, strategy: str, round: int, state: dict, scale: float,
                    r_max: int, ranks: dict[str, int] | None = None, base_version: int = 0,
                    config: dict | None = None, metrics: list[dict] | None = None,
                    rng_state: bytes | None = None) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    msg = pb.Checkpoint(
        schema_version=SCHEMA_VERSION, strategy=strategy, round=int(round), scale=float(scale),
        r_max=int(r_max), ranks={str(k): int(v) for k, v in (ranks or {}).items()},
        base_version=int(base_version), state_json=json.dumps(skeleton),
        config_json=json.dumps(config or {}), metrics_json=json.dumps(metrics or []),
        rng_state=rng_state or b"", created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        fedlora_version=fedlora.__version__)
    for k, t in tensors.items():
        msg.tensors[k].CopyFrom(tensor_to_pb(t))
    payload = msg.SerializeToString()
    return atomic_write_bytes(Path(path), payload + _FOOTER_PREFIX + hashlib.sha256(payload).digest())


def _unseal(path: Path, data: bytes) -> bytes | None:
    """The bytes before a verified footer; ``None`` when the file has no footer; ValueError when
    the footer is there and the SHA-256 does not match."""
    if len(data) < FOOTER_SIZE or data[-FOOTER_SIZE:-32] != _FOOTER_PREFIX:
        return None
    payload, stored = data[:-FOOTER_SIZE], data[-32:]
    computed = hashlib.sha256(payload).digest()
    if computed != stored:
        raise ValueError(f"checkpoint {path} is corrupt: SHA-256 mismatch (footer {stored.hex()[:16]}…, "
                         f"content {computed.hex()[:16]}…)")
    return payload


def load_checkpoint(path: str | os.PathLike, *, allow_unverified: bool = False) -> Checkpoint:
    """The checkpoint in ``path``, after its SHA-256 footer is verified (see the module docstring).

    ValueError naming the file on a checksum mismatch, a missing footer (truncated, or written
    before footers existed), a broken structure, or a newer schema. ``allow_unverified=True``
    loads a footerless file after the structural checks (a warning is logged): only for a
    pre-footer file you trust.
    """
    path = Path(path)
    data = path.read_bytes()
    payload = _unseal(path, data)
    if payload is not None:
        return _decode(path, payload)
    ck = _decode(path, data)  # the most precise diagnosis first (newer schema, broken structure)
    if not allow_unverified:
        raise ValueError(f"checkpoint {path} is truncated or corrupt: it does not end with a valid "
                         f"SHA-256 footer (a file written before checkpoints had one is refused "
                         f"too: load it with allow_unverified=True only if you trust it)")
    log.warning("checkpoint %s has no SHA-256 footer: loaded UNVERIFIED (allow_unverified=True)", path)
    return ck


def _decode(path: Path, payload: bytes) -> Checkpoint:
    msg = pb.Checkpoint()
    try:
        msg.ParseFromString(payload)
        state_skeleton = json.loads(msg.state_json) if msg.state_json else None
    except (DecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {e}") from e
    if msg.schema_version > SCHEMA_VERSION:
        raise ValueError(f"checkpoint {path} has schema version {msg.schema_version}; this fedlora "
                         f"reads up to {SCHEMA_VERSION}: upgrade fedlora")
    if msg.schema_version == 0 or state_skeleton is None:
        raise ValueError(f"checkpoint {path} is corrupt or truncated (no schema version or state)")
    try:
        tensors = {}
        for k, v in msg.tensors.items():
            try:
                tensors[k] = tensor_from_pb(v)
            except ValueError as e:
                raise ValueError(f"tensor {k!r}: {e}") from e
        state = unflatten(state_skeleton, tensors)
        config = json.loads(msg.config_json or "{}")
        metrics = json.loads(msg.metrics_json or "[]")
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {e}") from e
    return Checkpoint(msg.strategy, int(msg.round), state, msg.scale, int(msg.r_max), dict(msg.ranks),
                      int(msg.base_version), config, metrics, bytes(msg.rng_state),
                      int(msg.schema_version), msg.created_at, msg.fedlora_version)


def checkpoint_path(run_dir: str | os.PathLike, round: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round-{int(round):04d}.ckpt"


def _round_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(round, path)`` of a run's ``checkpoints/round-NNNN.ckpt`` files, newest first."""
    files = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("round-*.ckpt")
             if (m := re.fullmatch(r"round-(\d+)\.ckpt", p.name))]
    return sorted(files, reverse=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run **by file name**, not opened nor verified (``None``: none).

    To resume, use :func:`latest_valid_checkpoint`: the newest file may be corrupt or truncated.
    """
    files = _round_files(run_dir)
    return files[0][1] if files else None


def latest_valid_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(path, skipped)``: the newest checkpoint of a run that verifies and loads (``None`` when
    none does), and the newer files passed over, newest first, each with the reason.

    A file is passed over when :func:`load_checkpoint` fails on it (checksum, truncation, no
    footer, structure, newer schema, unreadable) or when the round it holds is not the round in
    its name. The caller must tell the user about every skipped file, and must fail (not start
    from scratch) when there are checkpoint files and none is valid; the returned path is then
    loaded with :func:`load_checkpoint` (it is read twice: verification here, use there).
    """
    skipped: list[tuple[Path, str]] = []
    for rnd, path in _round_files(run_dir):
        try:
            ck = load_checkpoint(path)
        except (ValueError, OSError) as e:
            skipped.append((path, str(e)))
            continue
        if ck.round != rnd:
            skipped.append((path, f"checkpoint {path} holds round {ck.round}, its name says round {rnd}"))
            continue
        return path, skipped
    return None, skipped


def rng_snapshot() -> bytes:
    """Python ``random``, numpy's global and torch's CPU RNG states as JSON bytes (no pickle, so
    loading a checkpoint from elsewhere cannot run code)."""
    pv, pstate, pgauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [pv, list(pstate), pgauss],
          "numpy": [name, base64.b64encode(np.asarray(keys, dtype="<u4").tobytes()).decode(), int(pos),
                    int(has_gauss), float(cached)],
          "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    return json.dumps(st).encode()


def rng_restore(b: bytes) -> None:
    """Restore the states saved by :func:`rng_snapshot` (empty bytes: no-op)."""
    if not b:
        return
    try:
        st = json.loads(b)
        pv, pstate, pgauss = st["python"]
        name, keys, pos, has_gauss, cached = st["numpy"]
        keys_arr = np.frombuffer(base64.b64decode(keys), dtype="<u4").astype(np.uint32)
        torch_state = torch.frombuffer(bytearray(base64.b64decode(st["torch"])), dtype=torch.uint8)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"rng_state is not a fedlora RNG snapshot: {e}") from e
    random.setstate((pv, tuple(pstate), pgauss))
    np.random.set_state((name, keys_arr, pos, has_gauss, cached))
    torch.set_rng_state(torch_state)
