"""An in-process Flower grid: the real ServerApp and ClientApp, in this process, in about a second.

``LoopbackGrid`` is a ``flwr.serverapp.Grid`` that delivers each Message straight to the real
``ClientApp`` of the target node (no Ray, no daemons); a ClientApp that raises becomes an error
reply, as Flower's engines do. ``run_loopback(cfg)`` runs the project's apps over it; the apps are
loaded the way Flower loads them, from the references in ``pyproject.toml``
(``[tool.flwr.app.components]``), or passed in — the library never imports them.

This module is the one place that touches Flower internals, both because Flower builds messages
only inside a running SuperLink/SuperNode: ``TaskIdentity`` (a Message can only be created inside
a run) and ``Metadata._message_id`` (push/pull match replies by message id).
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import tomllib
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.sim import ROOT, prepare_run_dir

#: Flower's error code for an exception raised in a ClientApp
CLIENT_APP_RAISED_EXCEPTION = 2


def ensure_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> None:
    """Messages can only be built inside a run: set an identity when none is set (tests)."""
    for attr, val in (("run_id", run_id), ("node_id", node_id), ("task_id", task_id)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, val)


class LoopbackGrid:
    """In-process Grid: node ``i`` runs ``client_app`` with its own ``Context`` (node config,
    persistent ``state``); replies are produced synchronously on push."""

    def __init__(self, client_app, node_configs: list[dict], run_config: dict | None = None,
                 run_id: int = 1) -> None:
        ensure_task_identity(run_id)
        self.client_app = client_app
        self.run_id = run_id
        self._ids = itertools.count(1)
        self.contexts: dict[int, Context] = {}
        for i, nc in enumerate(node_configs):
            nid = 1000 + 7 * i + run_id  # arbitrary, distinct per run (like Flower's random ids)
            self.contexts[nid] = Context(run_id=run_id, node_id=nid, node_config=dict(nc),
                                         state=RecordDict(), run_config=dict(run_config or {}))
        self._replies: dict[str, Message] = {}
        self.sent = 0
        self.delivered: list[tuple[Message, Message]] = []  # (message, its reply), in order

    # Grid API ------------------------------------------------------------------------------------
    def set_run(self, run) -> None:  # pragma: no cover - not used in process
        pass

    @property
    def run(self):  # pragma: no cover
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            nid = msg.metadata.dst_node_id
            self.sent += 1
            try:
                reply = self.client_app(msg, self.contexts[nid])
            except Exception as e:  # noqa: BLE001 - what Flower's engines do: an error reply
                reply = Message(Error(CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.delivered.append((msg, reply))
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def loopback_nodes(num: int, ranks: list[int] | None = None,
                   extra: dict[int, dict] | None = None) -> list[dict]:
    """Node configs as Flower's simulation sets them (``partition-id``, ``num-partitions``)."""
    out = []
    for i in range(num):
        nc: dict = {"partition-id": i, "num-partitions": num}
        if ranks:
            nc["rank"] = ranks[i % len(ranks)]
        nc.update((extra or {}).get(i, {}))
        out.append(nc)
    return out



def load_apps(project: str | Path = ROOT) -> tuple[Callable, Callable]:
    """``(client_app, server_app)`` named in the project's ``[tool.flwr.app.components]``."""
    comps = tomllib.loads((Path(project) / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]

    def load(ref: str):
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)

    return load(comps["clientapp"]), load(comps["serverapp"])


def run_loopback(cfg, apps: tuple[Callable, Callable] | None = None,
                 node_extra: dict[int, dict] | None = None, stop_after_round: int | None = None,
                 resume: bool = False, grid_out: list | None = None) -> dict:
    """The real ServerApp + ClientApp over a ``LoopbackGrid`` (``cfg.clients.num`` nodes with
    Flower's simulation node config). Returns the run's summary, or ``{"stopped": True, ...}``
    when ``stop_after_round`` (a test hook: the server dies before that round's successor)
    ended it; ``grid_out`` receives the grid (its ``delivered`` messages) for inspection."""
    client_app, server_app = apps or load_apps()
    run_config = {"config-path": str(prepare_run_dir(cfg, resume)), "resume": resume}
    if stop_after_round is not None:
        run_config["stop-after-round"] = int(stop_after_round)
    grid = LoopbackGrid(client_app, loopback_nodes(cfg.clients.num, extra=node_extra), run_config,
                        run_id=2 if resume else 1)
    if grid_out is not None:
        grid_out.append(grid)
    flwr_log = logging.getLogger("flwr")  # Flower's per-round INFO lines repeat metrics.jsonl here
    level = flwr_log.level
    flwr_log.setLevel(max(level, logging.WARNING))
    try:
        server_app(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=dict(run_config)))
    finally:
        flwr_log.setLevel(level)
    run_dir = cfg.resolved_run_dir()
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    metrics = run_dir / "metrics.jsonl"
    rows = metrics.read_text().splitlines() if metrics.exists() else []
    return {"stopped": True, "rounds": len(rows)}
