"""Launch and tear down a local Flower deployment: one SuperLink + N SuperNodes, TLS + node auth.

This drives Flower's own daemons (``flower-superlink``, ``flower-supernode``, ``flwr``); it is the
engine behind ``deploy/run_local_tls.sh``'s Python twin and the loopback deployment tests. It is a
*local* launcher (every process on this machine); for several machines, run the same commands by
hand as deploy/README.md shows.

    from fedlora.deploy import LocalDeployment, NodeSpec

    nodes = [NodeSpec({"rank": r, "partition-id": i, "num-partitions": 3}) for i, r in enumerate((2, 4, 8))]
    with LocalDeployment(workdir, nodes, tls=True, node_auth=True) as dep:
        dep.start()                                   # certs, SuperLink, register keys, SuperNodes
        res = dep.run(app_dir=".", run_config={"num-server-rounds": 2})   # `flwr run . <conn> --stream`
        print(res.returncode, res.wall_s)
    # every process started is gone here (process groups, SIGTERM then SIGKILL)

Every daemon runs in its own process group (``start_new_session``), with its output in
``workdir/logs/<name>.log``; ``FLWR_HOME`` is ``workdir/flwr-home`` (the CLI connection
``fedlora-local`` lives in its ``config.toml``). Telemetry, update checks and the runtime
``uv sync`` of app dependencies are off. Ports are free ports on 127.0.0.1 unless given.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

CONNECTION = "fedlora-local"

#: Environment for every Flower process: no telemetry, no update check, no runtime `uv sync`.
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


class DeploymentError(RuntimeError):
    """A daemon failed to start, exited early, or a command failed (the message names its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None,
                  what: str = "") -> None:
    """Block until ``host:port`` accepts TCP connections (or ``proc`` exits, or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeploymentError(f"{what or 'process'} exited with code {proc.returncode} "
                                  f"before listening on {host}:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise DeploymentError(f"{what or 'process'}: nothing listening on {host}:{port} after {timeout:.0f} s")


def format_node_config(cfg: dict) -> str:
    """``{"rank": 4, "device": "cpu"}`` → ``rank=4 device="cpu"`` (TOML values, for --node-config)."""
    parts = []
    for k, v in cfg.items():
        if isinstance(v, bool):
            val = "true" if v else "false"
        elif isinstance(v, int | float):
            val = repr(v)
        else:
            val = json.dumps(str(v))  # a TOML basic string
        parts.append(f"{k}={val}")
    return " ".join(parts)


def _bin(name: str) -> str:
    """The console script ``name`` next to this Python (the venv's), else from PATH."""
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else name


REAPER = Path(__file__).with_name("reaper.py")


def reaped(cmd: list[str]) -> list[str]:
    """``cmd`` under ``fedlora/reaper.py``: its whole process tree ends with it, or when this process
    dies (even by ``kill -9``), however its children detach."""
    return [sys.executable, str(REAPER), "--parent", str(os.getpid()), "--", *cmd]


class ManagedProcess:
    """A daemon under the reaper (``fedlora/reaper.py``), in its own process group, with its output
    in a log file. Whatever it starts — Flower detaches its ServerApp, simulation and Ray processes
    into new sessions — ends when it is stopped or killed, or when this Python process dies."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: Path, cwd: Path) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self._log.write(f"\n$ {shlex.join(cmd)}\n".encode())
        self._log.flush()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(reaped(cmd), env=env, cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group id is the leader's pid (start_new_session)

    def kill(self) -> None:
        """Hard kill, no clean-up by the process (simulates a crash / power loss): the reaper
        SIGKILLs the whole tree at once."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGUSR1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the reaper (which ends the whole tree: SIGTERM, SIGKILL after its own grace),
        then SIGKILL to the group if it has not gone after ``grace`` + its grace seconds."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace + 5)
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if not self._log.closed:
            self._log.close()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class NodeSpec:
    """One SuperNode: its ``--node-config`` values (``rank``, ``device``, ``partition-id`` ...)."""

    node_config: dict = field(default_factory=dict)
    name: str = ""
    port: int | None = None  # its local Runtime API port (free port if None)


@dataclass
class RunResult:
    returncode: int
    wall_s: float
    log_path: Path
    output: str


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:  # pragma: no cover - safety net for crashed callers
    for dep in list(_LIVE):
        with contextlib.suppress(Exception):
            dep.stop()


class LocalDeployment:
    """A SuperLink and SuperNodes on one machine (see the module docstring).

    ``tls``: HTTPS with a local CA (``fedlora.certs``), else ``--insecure`` (local experiments
    only). ``node_auth``: ``--enable-supernode-auth`` + one registered ECDSA key per node (needs
    TLS). ``cache_root``: when set, each node gets ``cache-dir=<cache_root>/<node name>`` in its
    node config unless it has one.
    """

    def __init__(self, workdir: str | os.PathLike, nodes: list[NodeSpec], *, tls: bool = True,
                 node_auth: bool = True, host: str = "127.0.0.1", superlink_port: int | None = None,
                 cache_root: str | os.PathLike | None = None, extra_env: dict | None = None,
                 certs_dir: str | os.PathLike | None = None) -> None:
        if node_auth and not tls:
            raise ValueError("node authentication needs TLS (flower-superlink refuses "
                             "--enable-supernode-auth with --insecure)")
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = list(nodes)
        for i, n in enumerate(self.nodes):
            n.name = n.name or f"node{i}"
            if cache_root is not None:
                n.node_config.setdefault("cache-dir", str(Path(cache_root).absolute() / n.name))
        self.tls, self.node_auth, self.host = tls, node_auth, host
        self.superlink_port = superlink_port
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.certs_dir = Path(certs_dir).absolute() if certs_dir else self.workdir / "certs"
        self.certs = None
        self.env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(self.flwr_home), **(extra_env or {})}
        # the venv's bin first, so `flwr-serverapp`/`flwr-clientapp` subprocesses are found
        self.env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + self.env.get("PATH", "")
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[int, ManagedProcess] = {}
        self.timings: dict[str, float] = {}
        _LIVE.add(self)

    # ---- context manager --------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- pieces -----------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.superlink_port}"

    def make_certs(self) -> None:
        from fedlora.certs import make_certs

        hosts = [self.host] + (["localhost"] if self.host != "localhost" else [])
        self.certs = make_certs(self.certs_dir, hosts=hosts, nodes=len(self.nodes) if self.node_auth else 0)

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` with the connection ``fedlora-local`` (the default)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        if self.tls:
            lines.append(f'root-certificates = "{self.certs.ca_cert}"')
        else:
            lines.append("insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _cli(self, args: list[str], timeout: float = 60, check: bool = True,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
        cmd = [_bin("flwr"), *args]
        res = subprocess.run(cmd, env=self.env, cwd=cwd or self.workdir, capture_output=True,
                             text=True, timeout=timeout)
        with open(self.logs / "flwr-cli.log", "a") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n[rc={res.returncode}]\n{res.stdout}{res.stderr}")
        if check and res.returncode != 0:
            raise DeploymentError(f"`flwr {' '.join(args)}` failed (rc={res.returncode}):\n"
                                  f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
        return res

    def start_superlink(self, timeout: float = 60) -> None:
        self.superlink_port = self.superlink_port or free_port(self.host)
        cmd = [_bin("flower-superlink"), "--host", self.host, "--port", str(self.superlink_port),
               "--disable-runtime-dependency-installation",
               "--database", str(self.workdir / "superlink.db")]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile",
                    str(self.certs.server_cert), "--ssl-keyfile", str(self.certs.server_key)]
        else:
            cmd += ["--insecure"]
        if self.node_auth:
            cmd += ["--enable-supernode-auth"]
        t0 = time.monotonic()
        self.superlink = ManagedProcess("superlink", cmd, self.env, self.logs / "superlink.log",
                                        self.workdir)
        try:
            wait_for_port(self.host, self.superlink_port, timeout, self.superlink.proc, "flower-superlink")
        except DeploymentError as e:
            raise DeploymentError(f"{e}\n--- {self.superlink.log_path} ---\n{self.superlink.tail()}") from e
        self.timings["superlink_start_s"] = time.monotonic() - t0

    def register_nodes(self) -> None:
        """``flwr supernode register <node key>.pub fedlora-local`` for every node (in parallel)."""
        t0 = time.monotonic()
        pending = {i: 0 for i in range(len(self.nodes))}
        deadline = time.monotonic() + 60
        while pending:
            procs = {}
            for i in pending:
                cmd = [_bin("flwr"), "supernode", "register", str(self.certs.node_pub(i)), CONNECTION,
                       "--name", self.nodes[i].name]
                procs[i] = (cmd, subprocess.Popen(cmd, env=self.env, cwd=self.workdir, text=True,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            for i, (cmd, pr) in procs.items():
                out, _ = pr.communicate(timeout=60)
                with open(self.logs / "flwr-cli.log", "a") as f:
                    f.write(f"\n$ {shlex.join(cmd)}\n[rc={pr.returncode}]\n{out}")
                if pr.returncode == 0:
                    del pending[i]
                elif time.monotonic() > deadline:
                    raise DeploymentError(f"registering {self.nodes[i].name}'s key failed:\n{out}")
            if pending:  # the Control API may need a moment after the port opens
                time.sleep(0.5)
        self.timings["register_s"] = time.monotonic() - t0

    def start_node(self, i: int) -> ManagedProcess:
        """Start (or restart) SuperNode ``i``."""
        n = self.nodes[i]
        old = self.supernodes.get(i)
        if old is not None and old.alive():
            raise DeploymentError(f"{n.name} is already running (pid {old.pid})")
        n.port = n.port or free_port(self.host)
        cmd = [_bin("flower-supernode"), "--superlink", self.address, "--host", self.host,
               "--port", str(n.port)]
        cmd += ["--root-certificates", str(self.certs.ca_cert)] if self.tls else ["--insecure"]
        if self.node_auth:
            cmd += ["--auth-supernode-private-key", str(self.certs.node_keys[i])]
        if n.node_config:
            cmd += ["--node-config", format_node_config(n.node_config)]
        proc = ManagedProcess(n.name, cmd, self.env, self.logs / f"{n.name}.log", self.workdir)
        self.supernodes[i] = proc
        return proc

    def restart_node(self, i: int, timeout: float = 120) -> ManagedProcess:
        """Start SuperNode ``i`` again after a crash, once the SuperLink has let its old session go.

        With node authentication a node's id is its key's, and Flower keeps a crashed node ONLINE
        until two heartbeats (2 × 30 s) are missed; a node that comes back sooner is refused
        ("Failed to activate SuperNode", exit code 305). So wait until the SuperLink shows no more
        online nodes than there are live SuperNode processes, then start it.
        """
        t0 = time.monotonic()
        while True:
            alive = sum(1 for j, p in self.supernodes.items() if j != i and p.alive())
            online = [r for r in self.node_ids() if str(r.get("status", "")).lower() == "online"]
            if len(online) <= alive:
                break
            if time.monotonic() - t0 > timeout:
                raise DeploymentError(f"the SuperLink still lists {len(online)} online nodes for {alive} "
                                      f"running after {timeout:.0f} s")
            time.sleep(1.0)
        self.timings[f"restart_wait_s.{i}"] = time.monotonic() - t0
        return self.start_node(i)

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and its ClientApp (a crash: nothing is cleaned up)."""
        self.supernodes[i].kill()

    def stop_node(self, i: int) -> None:
        self.supernodes[i].stop()

    def node_ids(self) -> list[dict]:
        """``flwr supernode list`` as JSON rows (node id, status ...)."""
        res = self._cli(["supernode", "list", CONNECTION, "--format", "json"], check=False)
        try:
            data = json.loads(res.stdout)
        except ValueError:
            return []
        return data.get("nodes", []) if isinstance(data, dict) else []

    def wait_nodes_online(self, timeout: float = 60) -> None:
        """Wait until every started SuperNode shows as online in the SuperLink."""
        t0 = time.monotonic()
        want = sum(1 for p in self.supernodes.values() if p.alive())
        while True:
            for p in self.supernodes.values():
                if not p.alive():
                    raise DeploymentError(f"{p.name} exited with code {p.proc.returncode}:\n{p.tail()}")
            rows = self.node_ids()
            online = [r for r in rows if str(r.get("status", "")).lower() == "online"]
            if len(online) >= want:
                break
            if time.monotonic() - t0 > timeout:
                raise DeploymentError(
                    f"only {len(online)}/{want} SuperNodes online after {timeout:.0f} s: {rows}")
            time.sleep(0.5)
        self.timings["nodes_online_s"] = time.monotonic() - t0

    def start(self, timeout: float = 90) -> LocalDeployment:
        """Certificates (if TLS), the SuperLink, node keys registered, SuperNodes online."""
        t0 = time.monotonic()
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.tls and self.certs is None:
            self.make_certs()
        self.start_superlink(timeout)
        self.write_connection()
        if self.node_auth:
            self.register_nodes()
        for i in range(len(self.nodes)):
            self.start_node(i)
        self.wait_nodes_online(timeout)
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def run(self, app_dir: str | os.PathLike = ".", run_config: dict | None = None, stream: bool = True,
            timeout: float = 600, background: bool = False):
        """``flwr run <app_dir> fedlora-local [--stream] [-c k=v ...]``.

        Returns a ``RunResult`` (or, with ``background=True``, the ``ManagedProcess`` to wait on).
        """
        cmd = [_bin("flwr"), "run", str(Path(app_dir).absolute()), CONNECTION]
        if stream:
            cmd.append("--stream")
        if run_config:
            cmd += ["--run-config", format_node_config(run_config)]
        log_path = self.logs / "flwr-run.log"
        proc = ManagedProcess("flwr-run", cmd, self.env, log_path, Path(app_dir).absolute())
        if background:
            return proc
        return self.wait_run(proc, timeout)

    def wait_run(self, proc: ManagedProcess, timeout: float = 600) -> RunResult:
        try:
            proc.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc.stop()
            raise DeploymentError(f"`flwr run` still running after {timeout:.0f} s:\n{proc.tail()}") from e
        finally:
            if not proc._log.closed:
                proc._log.close()
        wall = time.monotonic() - proc.started
        self.timings["run_s"] = wall
        return RunResult(proc.proc.returncode, wall, proc.log_path, proc.log_path.read_text(errors="replace"))

    def logs_text(self) -> dict[str, str]:
        """Every captured log by file name (for test failure messages)."""
        return {p.name: p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log"))}

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink (idempotent)."""
        for p in list(self.supernodes.values()):
            p.stop()
        if self.superlink is not None:
            self.superlink.stop()
        _LIVE.discard(self)


def node_configs(ranks: list[int], device: str = "auto", data_path: str = "") -> list[dict]:
    """One node config per rank: node ``i`` is ``partition-id`` i and, with ``data_path``, reads
    ``data_path`` with ``{i}`` replaced by its index (``data/node{i}.jsonl``)."""
    out = []
    for i, r in enumerate(ranks):
        cfg = {"rank": r, "device": device, "partition-id": i, "num-partitions": len(ranks)}
        if data_path:
            cfg["data-path"] = data_path.replace("{i}", str(i))
        out.append(cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m fedlora.deploy``: a local SuperLink + SuperNodes, then ``flwr run`` (see --help)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fedlora.deploy", description=(
        "Start a local Flower deployment (SuperLink + one SuperNode per rank, TLS and node auth "
        "by default), run the fedlora app on it, and tear everything down."))
    p.add_argument("--app", default=".", help="Flower app folder (default: .)")
    p.add_argument("--workdir", default="runs/deploy-local", help="certs, logs, FLWR_HOME, caches")
    p.add_argument("--ranks", default="2,4,8", help="one SuperNode per rank (default 2,4,8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-path", default="", help="node config data-path, {i} the node's index, e.g. "
                   "data/node{i}.jsonl (empty: each node trains on its partition of the run's data)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no node auth: local experiments only")
    p.add_argument("--no-auth", action="store_true", help="TLS without node authentication")
    p.add_argument("--run-config", "-c", action="append", default=[], metavar="K=V")
    p.add_argument("--keep", action="store_true", help="leave the daemons up after the run (Ctrl-C stops)")
    a = p.parse_args(argv)
    import tomllib

    ranks = [int(r) for r in a.ranks.split(",") if r.strip()]
    nodes = [NodeSpec(c) for c in node_configs(ranks, a.device, a.data_path)]
    run_config = {"min-nodes": len(ranks)}  # the ServerApp waits for the nodes started here
    for kv in a.run_config:
        run_config.update(tomllib.loads(kv))
    work = Path(a.workdir)
    dep = LocalDeployment(work, nodes, tls=not a.insecure, node_auth=not (a.insecure or a.no_auth),
                          cache_root=work / "node-cache")
    try:
        dep.start()
        print(f"SuperLink on {dep.address} ({'TLS' if dep.tls else 'INSECURE'}"
              f"{', node auth' if dep.node_auth else ''}); {len(nodes)} SuperNodes online in "
              f"{dep.timings['start_s']:.1f} s; logs in {dep.logs}", flush=True)
        res = dep.run(a.app, run_config, stream=True)
        print(res.output[res.output.find("$ "):][-20000:])
        print(f"flwr run: rc={res.returncode} in {res.wall_s:.1f} s")
        if a.keep:
            print("daemons still up; Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return res.returncode
    finally:
        dep.stop()


if __name__ == "__main__":
    raise SystemExit(main())
