"""Strategies by name: the built-in ones and any a user registers.

``@register_strategy`` on a ``Strategy`` subclass (or ``register_strategy(cls)``) makes it known to
``create_strategy``, the config validator and the CLI under ``cls.name``. A strategy defined
outside the package is loaded with ``load_plugin("my_pkg.my_rule")`` or
``load_plugin("path/to/rule.py")`` — what the config key ``strategy.plugins`` does, in the CLI and
in the ServerApp, before the name is looked up.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlora.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Register ``cls`` under ``cls.name`` (usable as a class decorator)."""
    from fedlora.strategies.base import Strategy

    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"register_strategy takes a Strategy subclass, got {cls!r}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name or name == "base" or not name.replace("-", "_").isidentifier():
        raise ValueError(f"{cls.__qualname__}.name must be a short identifier (e.g. 'ffa'), got {name!r}")
    missing = [h for h in required_hooks(cls) if getattr(cls, h) is getattr(Strategy, h)]
    if missing:
        raise TypeError(f"strategy {name!r} ({cls.__qualname__}) does not implement {', '.join(missing)}: "
                        "a rule implements the hooks of fedlora.strategies.base.Strategy (README: "
                        "'Your own strategy'; tests/test_strategy_plugin.py is a complete example)")
    old = _REGISTRY.get(name)
    if old is not None and _origin(old) != _origin(cls):  # the same class imported twice is fine
        raise ValueError(f"strategy name {name!r} is taken by {old.__module__}.{old.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def required_hooks(cls: type[Strategy]) -> list[str]:
    """The hooks ``cls`` must implement: payloads, the rule and its checkpoint state; with a global
    model, its delta (evaluation, exports), the clients' changes (the exactness diagnostic collects
    them) and, unless the rule measures its own aggregation error, the global change."""
    from fedlora.strategies.base import Strategy

    hooks = ["_payload", "_aggregate", "_state", "_load_state"]
    if cls.has_global_model:
        hooks += ["global_delta", "client_change"]
        if cls._aggregation_error is Strategy._aggregation_error:
            hooks.append("global_change")
    return hooks


def _origin(cls: type) -> tuple[str, str]:
    try:
        where = str(Path(inspect.getfile(cls)).resolve())
    except (TypeError, OSError):
        where = cls.__module__
    return where, cls.__qualname__


def strategy_names() -> list[str]:
    return list(_REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose one of {strategy_names()} (a plugin's "
                         "strategy: list its file in strategy.plugins; README 'Your own strategy')")
    return _REGISTRY[name]


def load_plugin(ref: str, base_dir: str | Path | None = None):
    """Import a module that registers strategies: a dotted module name or a ``.py`` file path
    (relative paths against ``base_dir``, else the working directory)."""
    before = set(_REGISTRY)
    module = _load_module(ref, base_dir)
    found = _PLUGIN_NAMES.setdefault(module.__name__, set(_REGISTRY) - before)

    def registered(v) -> bool:  # (a module imported before this call: its own registered classes)
        cls = _REGISTRY.get(getattr(v, "name", None)) if isinstance(v, type) else None
        return cls is not None and _origin(cls) == _origin(v) and not v.__module__.startswith("fedlora.")

    if not found and not any(registered(v) for v in vars(module).values()):
        raise ValueError(f"strategy plugin {ref!r} registers no strategy: decorate its Strategy "
                         "subclass with @register_strategy")
    return module


#: the strategy names each plugin module registered when it was loaded
_PLUGIN_NAMES: dict[str, set[str]] = {}


def _load_module(ref: str, base_dir: str | Path | None):
    if ref.endswith(".py"):
        path = Path(ref).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or ".") / path
        path = path.resolve()
        if not path.is_file():
            raise ValueError(f"strategy plugin {ref!r}: no such file {str(path)!r}")
        mod_name = f"fedlora_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception:
                del sys.modules[mod_name]
                raise
    else:
        try:
            module = importlib.import_module(ref)
        except ImportError as e:
            raise ValueError(f"strategy plugin {ref!r} cannot be imported ({e}); give a module on the "
                             "Python path or a path to a .py file") from e
    return module
