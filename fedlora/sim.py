"""The launcher of Flower's simulation engine (``flwr run``), and the run folder it writes first.

``run_flower(...)``: starts a SuperLink in simulation mode (``flower-superlink --simulation``) on
free local ports under a project-local ``FLWR_HOME`` (``$FLWR_HOME`` if set, else
``<project>/.flwr``), points a connection at it in ``$FLWR_HOME/config.toml`` (no
``[tool.flwr.federations]`` in pyproject, so ``flwr run`` never rewrites a tracked file), runs
``flwr run <project> fedlora-sim --stream --federation-config "num-supernodes=N
client-resources-num-cpus=C" -c "config-path='…' …"`` and stops the SuperLink it started when
the run ends, fails or is interrupted. Both run under ``fedlora/reaper.py``
(``deploy.ManagedProcess``): the superexec, simulation and Ray processes Flower detaches from the
SuperLink end with it, and all of them end when this process dies, even by ``kill -9``.
Telemetry, update checks and runtime dependency installation are off
(``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``,
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``).

Ray: Flower's Ray backend calls ``ray.init()`` without an address (Flower 1.42's backend config —
``--federation-config`` / ``SimulationConfig`` — carries only client resources and ``init_args``
``num_cpus``/``num_gpus``/``logging_level``/``log_to_driver``), so Ray takes its cluster from the
``RAY_ADDRESS`` environment variable, which the SuperLink passes down to the simulation process.
``ray_address`` (``clients.ray_address``) sets it: ``""`` → ``RAY_ADDRESS=local`` (a private Ray
instance for this run, ended with it: a cluster someone started with ``ray start`` on this machine
is never joined by accident), ``"auto"`` or ``"host:port"`` → that existing cluster: the virtual
clients run as actors there, and the run ends only its own driver (the cluster stays up).

The in-process grid (no Ray, no daemons) is ``fedlora.loopback``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedlora-sim"
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def write_run_config(cfg) -> Path:
    """``<run_dir>/config.toml``: the resolved run (what the ServerApp reads through config-path)."""
    run_dir = cfg.resolved_run_dir()
    cfg.run_dir = str(run_dir)  # absolute: the ServerApp runs from Flower's app folder, not here
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.toml"
    path.write_text(cfg.to_toml())
    return path


def earlier_run(run_dir: Path) -> str | None:
    """What a fresh run in ``run_dir`` replaces (``None``: nothing): "a finished 5-round fedex run"."""
    from fedlora.runlog import METRICS_FILE, SUMMARY_FILE

    summary, metrics = run_dir / SUMMARY_FILE, run_dir / METRICS_FILE
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            return f"a finished {s['rounds']}-round {s['strategy']} run"
        except Exception:  # noqa: BLE001 - whatever the file holds, it is a finished run's
            return "a finished run"
    if metrics.is_file() and metrics.stat().st_size or any((run_dir / "checkpoints").glob("*.ckpt")):
        return "a stopped run"
    return None


def prepare_run_dir(cfg, resume: bool = False) -> Path:
    """Write ``config.toml``; a fresh (not resumed) run drops checkpoints of an older run there."""
    import shutil

    if not resume:
        shutil.rmtree(cfg.resolved_run_dir() / "checkpoints", ignore_errors=True)
        (cfg.resolved_run_dir() / "generations.jsonl").unlink(missing_ok=True)  # appended per round
        # (the server starts its own; an older run's rounds must not show while this one starts)
        (cfg.resolved_run_dir() / "metrics.jsonl").unlink(missing_ok=True)
    (cfg.resolved_run_dir() / "summary.json").unlink(missing_ok=True)  # the run writes its own
    from fedlora.data import KNOWN_DATASETS

    if cfg.data.name in KNOWN_DATASETS and not cfg.data.root:
        # the apps run from Flower's copy of the project (FLWR_HOME/apps/...): pin the data root
        # found from here, so the server and the simulated clients read the same files
        from fedlora.data import resolve_data_root

        cfg.data.root = str(resolve_data_root())
    return write_run_config(cfg)


# ---- Flower's simulation engine through `flwr run` -----------------------------------------------

def _bin(name: str) -> str:
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else name


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or ROOT / ".flwr").absolute()


def run_config_arg(run_config: dict) -> str:
    """``{"config-path": "/x.toml", "resume": True}`` → ``config-path="/x.toml" resume=true``."""
    # each value as its TOML text: tomli-w writes one `k = v` line per key
    return " ".join(tomli_w.dumps({k: v}).strip().replace(" = ", "=", 1) for k, v in run_config.items())


@dataclass
class FlowerRun:
    returncode: int
    wall_s: float
    log_path: Path
    superlink_log: Path

    def cause(self) -> str | None:
        """The error that ended the run, as the apps logged it: the last Python traceback in the
        run's log (its final lines: the exception and its message), else the last ERROR line."""
        if not self.log_path.exists():
            return None
        return error_cause(self.log_path.read_text(errors="replace"))

    def tail(self, n: int = 60) -> str:
        lines = []
        for p in (self.log_path, self.superlink_log):
            if p.exists():
                lines += [f"--- {p.name} ---"] + p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)


def error_cause(log: str) -> str | None:
    """The last traceback's exception lines in ``log`` (a ServerApp/ClientApp log), or the last
    line that reports an error; ``None`` when there is neither."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    if starts:
        block = lines[starts[-1] + 1:]
        # the exception follows the indented frames: the first non-indented, non-empty lines
        out = []
        for line in block:
            text = line.split("] ", 1)[-1] if line.startswith(("INFO", "ERROR", "WARNING")) else line
            if out and (not text.strip() or text.startswith(("INFO", "DEBUG"))):
                break
            if text.strip() and not text.startswith((" ", "\t")):
                out.append(text.strip())
            elif out:
                break
        if out:
            return "\n".join(out)
    errors = [line.strip() for line in lines if "ERROR" in line or "Exception" in line]
    return errors[-1] if errors else None


def run_flower(run_config: dict, num_supernodes: int, num_cpus: int = 1, num_gpus: float = 0.0,
               app_dir: str | os.PathLike = ROOT, log_dir: str | os.PathLike | None = None,
               timeout: float = 3600, on_start=None, ray_address: str = "") -> FlowerRun:
    """Run the fedlora apps on Flower's simulation engine (see the module docstring);
    ``ray_address``: ``clients.ray_address`` ('' = a private Ray instance)."""
    from fedlora.deploy import ManagedProcess, free_port, wait_for_port

    port, control = free_port(), free_port()
    # one FLWR_HOME per run: its config.toml names this run's SuperLink, so concurrent runs
    # (a compare next to a test, two users) never talk to each other's SuperLink
    home = flwr_home() / f"sim-{os.getpid()}-{port}"
    home.mkdir(parents=True, exist_ok=True)
    logs = Path(log_dir or home / "logs").absolute()
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(home), "RAY_ADDRESS": ray_address or "local"}
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
        run_log.unlink(missing_ok=True)
        run = ManagedProcess("flwr-run", cmd, env, run_log, Path(app_dir).absolute())
        if on_start is not None:
            on_start(run.proc)
        try:
            rc = run.proc.wait(timeout=timeout)
        finally:
            run.stop()
    finally:
        link.stop()
        if log_dir is not None:  # logs live elsewhere: this run's FLWR_HOME is disposable
            import shutil

            shutil.rmtree(home, ignore_errors=True)
    return FlowerRun(rc, time.monotonic() - t0, run_log, logs / "superlink.log")
