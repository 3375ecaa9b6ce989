"""Simulation launchers: Flower's engine through ``flwr run``, and an in-process grid for tests.

``run_flower(...)``: starts a SuperLink in simulation mode (``flower-superlink --simulation``) on
free local ports under a project-local ``FLWR_HOME`` (``$FLWR_HOME`` if set, else
``<project>/.flwr``), points a connection at it in ``$FLWR_HOME/config.toml`` (no
``[tool.flwr.federations]`` in pyproject, so ``flwr run`` never rewrites a tracked file), runs
``flwr run <project> fedlora-sim --stream --federation-config "num-supernodes=N
client-resources-num-cpus=C" -c "config-path='…' …"`` and stops the SuperLink it started (whole
process group) when the run ends, fails or is interrupted. Telemetry, update checks and runtime
dependency installation are off (``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``,
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``).

``LoopbackGrid``: a ``flwr.serverapp.Grid`` that delivers each Message straight to the real
``ClientApp`` of the target node, in this process (no Ray, no daemons): the same ServerApp
strategy loop and ClientApp code, in about a second. A ClientApp that raises becomes an error reply,
as Flower's engines do.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedlora-sim"
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
#: Flower's error code for an exception raised in a ClientApp
CLIENT_APP_RAISED_EXCEPTION = 2


# ---- the in-process grid ------------------------------------------------------------------------

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


def write_run_config(cfg) -> Path:
    """``<run_dir>/config.toml``: the resolved run (what the ServerApp reads through config-path)."""
    run_dir = cfg.resolved_run_dir()
    cfg.run_dir = str(run_dir)  # absolute: the ServerApp runs from Flower's app folder, not here
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.toml"
    path.write_text(cfg.to_toml())
    return path


def prepare_run_dir(cfg, resume: bool = False) -> Path:
    """Write ``config.toml``; a fresh (not resumed) run drops checkpoints of an older run there."""
    import shutil

    if not resume:
        shutil.rmtree(cfg.resolved_run_dir() / "checkpoints", ignore_errors=True)
    if cfg.data.name != "synthetic" and not cfg.data.root:
        # the apps run from Flower's copy of the project (FLWR_HOME/apps/...): pin the data root
        # found from here, so the server and the simulated clients read the same files
        from fedlora.data import resolve_data_root

        cfg.data.root = str(resolve_data_root())
    return write_run_config(cfg)


def run_inprocess(cfg, node_extra: dict[int, dict] | None = None, stop_after_round: int | None = None,
                  resume: bool = False, grid_out: list | None = None) -> dict:
    """The real ServerApp strategy loop + the real ClientApp over a LoopbackGrid
    (``cfg.clients.num`` nodes with Flower's simulation node config); ``grid_out`` receives the
    grid (its ``delivered`` messages) for inspection."""
    from clients.app import app as client_app
    from server.app import run_server

    run_config = {"config-path": str(prepare_run_dir(cfg, resume)), "resume": resume}
    grid = LoopbackGrid(client_app, loopback_nodes(cfg.clients.num, extra=node_extra), run_config,
                        run_id=2 if resume else 1)
    if grid_out is not None:
        grid_out.append(grid)
    return run_server(grid, run_config, stop_after_round=stop_after_round)


# ---- Flower's simulation engine through `flwr run` -----------------------------------------------

def _bin(name: str) -> str:
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else name


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or ROOT / ".flwr").absolute()


def run_config_arg(run_config: dict) -> str:
    """``{"config-path": "/x.toml", "resume": True}`` → ``config-path="/x.toml" resume=true``."""
    from fedlora.config import _toml_value

    return " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())


@dataclass
class FlowerRun:
    returncode: int
    wall_s: float
    log_path: Path
    superlink_log: Path

    def tail(self, n: int = 60) -> str:
        lines = []
        for p in (self.log_path, self.superlink_log):
            if p.exists():
                lines += [f"--- {p.name} ---"] + p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)


def run_flower(run_config: dict, num_supernodes: int, num_cpus: int = 1, num_gpus: float = 0.0,
               app_dir: str | os.PathLike = ROOT, log_dir: str | os.PathLike | None = None,
               timeout: float = 3600, on_start=None) -> FlowerRun:
    """Run the fedlora apps on Flower's simulation engine (see the module docstring)."""
    from fedlora.deploy import ManagedProcess, free_port, wait_for_port

    port, control = free_port(), free_port()
    # one FLWR_HOME per run: its config.toml names this run's SuperLink, so concurrent runs
    # (a compare next to a test, two users) never talk to each other's SuperLink
    home = flwr_home() / f"sim-{os.getpid()}-{port}"
    home.mkdir(parents=True, exist_ok=True)
    logs = Path(log_dir or home / "logs").absolute()
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(home)}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    link = ManagedProcess("superlink", [
        _bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
        "--control-api-address", f"127.0.0.1:{control}", "--disable-runtime-dependency-installation"],
        env, logs / "superlink.log", home)
    t0 = time.monotonic()
    run_log = logs / "flwr-run.log"
    try:
        wait_for_port("127.0.0.1", port, 60, link.proc, "flower-superlink")
        fed = f"num-supernodes={num_supernodes} client-resources-num-cpus={int(num_cpus)}"
        if num_gpus:
            fed += f" client-resources-num-gpus={float(num_gpus)}"
        cmd = [_bin("flwr"), "run", str(Path(app_dir).absolute()), CONNECTION, "--stream",
               "--federation-config", fed, "--run-config", run_config_arg(run_config)]
        with open(run_log, "wb") as f:
            proc = subprocess.Popen(cmd, env=env, cwd=str(Path(app_dir).absolute()), stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if on_start is not None:
                on_start(proc)
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
    finally:
        link.stop()
        if log_dir is not None:  # logs live elsewhere: this run's FLWR_HOME is disposable
            import shutil

            shutil.rmtree(home, ignore_errors=True)
    return FlowerRun(rc, time.monotonic() - t0, run_log, logs / "superlink.log")
