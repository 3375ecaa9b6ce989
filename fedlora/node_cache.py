"""Per-node cache: the node's current frozen base, kept on disk between ClientApp processes.

In a Flower deployment a ClientApp process serves one message and exits, so a node keeps what it
must not recompute or re-download every round in its ``cache-dir`` (node config):

- ``weights.safetensors``: the pretrained weights ``W0`` of the model (built once from the model
  registry, then memory-mapped on every later load: no rebuild, no copy until a page is touched);
- ``base.safetensors``: the node's **base delta** ``{layer: D}`` (``LoRALinear.base_delta``: FedEx
  residuals, FLoRA stacks, rank tails folded so far) and the **base version** it corresponds to.
- ``state-<name>.safetensors``: other tensors a client must keep across processes (optional).

Layout: ``<cache-dir>/<model key>/<file>``; the model key names the model (e.g. ``tiny-seed0``), so a
node running two experiments on different models keeps two caches.

Every file is written atomically: a temporary file in the same folder, ``fsync``, ``os.replace``,
then ``fsync`` of the folder. A crash mid-write leaves the previous version intact.

Integrity: every file the cache reads back carries a SHA-256 in itself (not a sidecar, so the check
and the data are renamed into place together and cannot come from two different writes):

- safetensors files (base, weights, state): the ``sha256`` metadata entry is the SHA-256 of all the
  other metadata entries (version, model key, kind, ...; canonical JSON) and of every tensor's name,
  dtype, shape and bytes (:func:`_digest`). A flipped byte anywhere in the values or the metadata
  that matter, or a truncation (safetensors checks the sizes), is caught on every load;
- records (JSON): a ``sha256`` entry over the canonical JSON of the rest of the document.

A missing, truncated, foreign or corrupt file reads as **no cache**, with a logged warning: the
base as ``None`` (the client then reports base version 0 so the server sends the full delta since
``W0``: a re-sync, no manual step), the weights are rebuilt from ``build_fn``, a state or record is
``None``. Files of the previous cache format (``fedlora-node-cache/1``, whose checksum did not cover
the metadata, and weights and records that had none) read as no cache too: one re-sync / rebuild
after the upgrade. Checking the weights reads the whole file once per load (SHA-256 runs at about
1-2 GB/s); the pages are then in the page cache for the memory-mapped tensors.

Usage (ClientApp)::

    cache = NodeCache(context.node_config["cache-dir"])
    state = cache.load_weights(key, lambda: build_model())       # W0, mmapped after the first time
    hit = cache.load_base(key)                                    # (version, {layer: D}) or None
    version, deltas = hit if hit else (0, {})
    ... apply payload (fold deltas the server sent for version -> new_version) ...
    cache.save_base(key, new_version, base_deltas(model))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

FORMAT = "fedlora-node-cache/2"  # /2: the checksum covers the metadata; weights and records have one
BASE_FILE = "base.safetensors"
WEIGHTS_FILE = "weights.safetensors"
_KEY_RE = re.compile(r"[^A-Za-z0-9._+-]+")


def _safe_key(model_key: str) -> str:
    k = _KEY_RE.sub("_", str(model_key)).strip("._")
    if not k:
        raise ValueError(f"model key {model_key!r} gives an empty folder name")
    return k


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """SHA-256 over the metadata (without its ``sha256`` entry, canonical JSON), then the tensors'
    names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    if metadata is not None:
        h.update(b"meta|" + _canonical({k: v for k, v in metadata.items() if k != "sha256"}) + b"|")
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.hexdigest()


def _sealed(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``metadata`` (strings) with its ``sha256`` entry over itself and ``tensors``."""
    meta = {str(k): str(v) for k, v in metadata.items() if k != "sha256"}
    return {**meta, "sha256": _digest(tensors, meta)}


def _check(meta: Mapping[str, str], kind: str, model_key: str) -> None:
    """ValueError unless the file's metadata says this format, kind and model key."""
    fmt = meta.get("format")
    if fmt != FORMAT:
        old = isinstance(fmt, str) and fmt.startswith("fedlora-node-cache/")
        raise ValueError(f"written in cache format {fmt}, this fedlora reads {FORMAT}" if old
                         else f"not a fedlora node cache file (metadata {dict(meta)})")
    if meta.get("kind") != kind:
        raise ValueError(f"holds {meta.get('kind')!r}, not {kind!r}")
    if meta.get("model_key") != str(model_key):
        raise ValueError(f"cache is for model {meta.get('model_key')!r}")
    if not meta.get("sha256"):
        raise ValueError("no sha256 in its metadata")


def _read_verified(path: str | os.PathLike, kind: str, model_key: str, verify: bool = True
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a cache file written by :class:`NodeCache`, after checking its
    format, kind, model key and (``verify``) SHA-256: ValueError saying "corrupt" on a mismatch;
    a truncated or malformed file raises from safetensors."""
    tensors, meta = read_safetensors(path)
    _check(meta, kind, model_key)
    if verify and _digest(tensors, meta) != meta["sha256"]:
        raise ValueError("corrupt: SHA-256 mismatch")
    return tensors, meta


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``
    (then the folder fsynced), so readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with _atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` atomically, as safetensors (streamed to the file: a model's
    weights are not held twice in memory)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with _atomic_file(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)``, memory-mapped (CPU). Raises on a missing or malformed file."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return tensors, meta


class NodeCache:
    """The cache folder of one node (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().absolute()

    def dir(self, model_key: str) -> Path:
        return self.root / _safe_key(model_key)

    # ---- base delta -----------------------------------------------------------------------------
    def save_base(self, model_key: str, version: int, deltas: Mapping[str, torch.Tensor | None]
                  ) -> Path:
        """Store base ``version`` with its deltas ``{layer: D}`` (``None``/absent layers mean 0)."""
        version = int(version)
        if version < 0:
            raise ValueError(f"base version must be >= 0, got {version}")
        tensors = {k: v for k, v in deltas.items() if v is not None}
        meta = _sealed({"format": FORMAT, "kind": "base", "model_key": str(model_key),
                        "version": str(version), "time": f"{time.time():.3f}"}, tensors)
        return atomic_save_safetensors(self.dir(model_key) / BASE_FILE, tensors, meta)

    def load_base(self, model_key: str, verify: bool = True
                  ) -> tuple[int, dict[str, torch.Tensor]] | None:
        """``(version, {layer: D})`` of the stored base, or ``None`` when missing or unusable
        (truncated, corrupt, foreign, older format: a warning is logged). ``verify=False`` skips
        the SHA-256 (only the format, kind and model key are checked)."""
        path = self.dir(model_key) / BASE_FILE
        if not path.exists():
            return None
        try:
            tensors, meta = _read_verified(path, "base", model_key, verify)
            version = int(meta["version"])
            if version < 0:
                raise ValueError(f"negative base version {version}")
        except Exception as e:  # noqa: BLE001 - any damage means: no cache, resync
            log.warning("node cache %s unusable (%s): starting from base version 0", path, e)
            return None
        return version, tensors

    def base_version(self, model_key: str) -> int:
        """The stored base version (0 when there is no usable cache)."""
        hit = self.load_base(model_key)
        return 0 if hit is None else hit[0]

    # ---- pretrained weights W0 ----------------------------------------------------------------------
    def load_weights(self, model_key: str, build_fn: Callable[[], object]) -> dict[str, torch.Tensor]:
        """The model's ``W0`` state dict: memory-mapped from the cache, or built once and cached.

        ``build_fn()`` returns an ``nn.Module`` or a state dict; it is called only on a miss (first
        use, or an unreadable, truncated, corrupt or foreign file: a warning is logged). The
        cached file's SHA-256 is checked on every load. The returned tensors are read-only views
        of the file when they come from the cache: load them with ``model.load_state_dict(state)``
        (copies).
        """
        path = self.dir(model_key) / WEIGHTS_FILE
        if path.exists():
            try:
                return _read_verified(path, "weights", model_key)[0]
            except Exception as e:  # noqa: BLE001
                log.warning("cached weights %s unusable (%s): rebuilding", path, e)
        built = build_fn()
        state = built.state_dict() if hasattr(built, "state_dict") else dict(built)
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        atomic_save_safetensors(path, state, _sealed({"format": FORMAT, "kind": "weights",
                                                      "model_key": str(model_key)}, state))
        return state

    def load_model(self, model_key: str, build_fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The model with its ``W0``, fast: on a cache hit the skeleton is built with weight
        initialisation switched off and the memory-mapped tensors are assigned to it.

        ``build_fn()`` must build the same architecture every time (weights may differ: they are
        replaced). The assigned tensors are copy-on-write mappings of the cache file, so training
        never writes into the cache. Falls back to ``build_fn()`` + ``load_state_dict`` if the
        state dict does not fit. (Not the meta device: in a fresh process its first use imports
        torch's reference ops, ~1.5 s, more than the whole tiny-model build.)
        """
        path = self.dir(model_key) / WEIGHTS_FILE
        if not path.exists():
            model = build_fn()
            self.load_weights(model_key, lambda: model)
            return model
        state = self.load_weights(model_key, build_fn)
        try:
            with no_weight_init():
                model = build_fn()
            model.load_state_dict(state, strict=True, assign=True)
            for m in model.modules():  # LoRALinear caches W0+D: drop anything cached
                if hasattr(m, "_w_eff"):
                    m._w_eff = None
            return model
        except Exception as e:  # noqa: BLE001
            log.info("fast load of %s failed (%s); building normally", model_key, e)
        model = build_fn()
        model.load_state_dict(state, strict=True)
        return model

    # ---- other per-node tensors ---------------------------------------------------------------------
    def save_state(self, model_key: str, name: str, tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str] | None = None) -> Path:
        """Store named client tensors (e.g. FedSA's B and head) atomically, with a checksum over
        them and ``metadata`` (string values)."""
        meta = _sealed({**(metadata or {}), "format": FORMAT, "kind": f"state:{name}",
                        "model_key": str(model_key)}, tensors)
        return atomic_save_safetensors(self.dir(model_key) / f"state-{_safe_key(name)}.safetensors",
                                       tensors, meta)

    def load_state(self, model_key: str, name: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """``(tensors, metadata)`` stored by ``save_state``, or ``None`` when missing or unusable
        (truncated, corrupt, foreign, older format: a warning is logged)."""
        path = self.dir(model_key) / f"state-{_safe_key(name)}.safetensors"
        if not path.exists():
            return None
        try:
            tensors, meta = _read_verified(path, f"state:{name}", model_key)
        except Exception as e:  # noqa: BLE001
            log.warning("node state %s unusable (%s)", path, e)
            return None
        return tensors, meta

    # ---- small JSON records (a DP client's accountant history) --------------------------------------
    def save_record(self, name: str, record: Mapping) -> Path:
        """Store a JSON-serialisable mapping as ``<cache>/records/<name>.json``, atomically, with
        a SHA-256 of its canonical JSON."""
        doc = json.loads(json.dumps({"format": FORMAT, "name": name, "record": dict(record)}))
        doc["sha256"] = hashlib.sha256(_canonical(doc)).hexdigest()
        return atomic_write_bytes(self.root / "records" / f"{_safe_key(name)}.json",
                                  json.dumps(doc).encode())

    def load_record(self, name: str) -> dict | None:
        """The mapping stored by ``save_record``, or ``None`` when missing or unusable (truncated,
        corrupt, foreign, older format: a warning is logged)."""
        path = self.root / "records" / f"{_safe_key(name)}.json"
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("name") != name:
                raise ValueError("foreign record file or older format")
            stored = doc.pop("sha256", None)
            if stored != hashlib.sha256(_canonical(doc)).hexdigest():
                raise ValueError("corrupt: SHA-256 mismatch" if stored else "no sha256")
            return dict(doc["record"])
        except Exception as e:  # noqa: BLE001
            log.warning("node record %s unusable (%s)", path, e)
            return None

    def clear(self, model_key: str | None = None) -> None:
        """Remove one model's cache (or all of it): the next load is a miss."""
        import shutil

        target = self.root if model_key is None else self.dir(model_key)
        shutil.rmtree(target, ignore_errors=True)


_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
             "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
             "orthogonal_", "sparse_")


@contextlib.contextmanager
def no_weight_init():
    """Switch ``torch.nn.init`` off while a model skeleton is built (its weights get replaced)."""
    saved = {n: getattr(torch.nn.init, n) for n in _INIT_FNS if hasattr(torch.nn.init, n)}

    def skip(tensor, *a, **k):
        return tensor

    try:
        for n in saved:
            setattr(torch.nn.init, n, skip)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def base_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{layer: D}`` of a model's adapted layers (layers with no delta are left out)."""
    from fedlora.lora import lora_layers

    return {n: m.base_delta.detach().cpu() for n, m in lora_layers(model).items()
            if m.base_delta is not None}


def set_base_deltas(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """Set every adapted layer's ``D`` from ``deltas`` (absent layers back to ``W0``)."""
    from fedlora.lora import lora_layers

    layers = lora_layers(model)
    unknown = set(deltas) - set(layers)
    if unknown:
        raise ValueError(f"base deltas name unknown layers: {sorted(unknown)}")
    for n, m in layers.items():
        m.set_base_delta_(deltas.get(n))


_IMPORT_TIME = time.time()


def process_age_s() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since this module's import).

    A deployed ClientApp calls it on entry to its handler: that is the process-start part of the
    per-round client overhead (interpreter start + imports), which the SuperNode pays per message.
    """
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 (starttime), counted after "pid (comm)"
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        age = time.time() - (btime + start_ticks / os.sysconf("SC_CLK_TCK"))
        if 0 <= age < 86400 * 365:
            return age
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return time.time() - _IMPORT_TIME
