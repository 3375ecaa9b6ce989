"""One round's record: what was sent to whom, what came back, what the strategy made of it.

``RoundLedger`` collects a round's per-client rows and failures as the ServerApp sees them and
builds the round's ``metrics.jsonl`` line once (``close``), from the strategy's ``RoundReport``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fedlora.runlog import number
from fedlora.strategies import RoundReport


@dataclass
class Pending:
    client_id: str
    node_id: int
    rank: int
    version: int  # the base version the payload brings the client to
    bytes_down: int  # the whole message as Flower pushes it (flower_io.wire_bytes)
    tensor_bytes_down: int  # the payload's tensors (and 8 bytes per factor sent as its seed)


#: what the run's files keep of a reply's metrics: they are untrusted, and one reply must not bloat
#: every line and checkpoint after it
MAX_METRICS, MAX_KEY, MAX_ERROR = 64, 100, 500


def client_metrics(met) -> dict:
    """A reply's metrics as the run records them: at most ``MAX_METRICS`` scalar numbers under
    short keys (a list, a bool or a long key is dropped; a non-finite number becomes ``None``)."""
    out: dict = {}
    for k, v in met.items():
        if len(out) == MAX_METRICS:
            break
        if isinstance(k, str) and len(k) <= MAX_KEY and isinstance(v, int | float) \
                and not isinstance(v, bool):
            out[k] = v if isinstance(v, int) else number(v)
    return out


def _client_order(cid: str) -> tuple[int, str]:
    tail = cid.rpartition("-")[2]
    return (int(tail), cid) if tail.isdigit() else (1 << 62, cid)


@dataclass
class RoundLedger:
    round: int
    started: float = field(default_factory=time.perf_counter)
    pending: dict[int, Pending] = field(default_factory=dict)
    rows: dict[str, dict] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    query_bytes: list[int] = field(default_factory=lambda: [0, 0])  # (down, up) of capability queries

    def expect(self, p: Pending) -> None:
        self.pending[p.node_id] = p

    def reply(self, node_id: int, bytes_up: int) -> Pending | None:
        """The pending entry a reply answers (``None``: nobody was waiting for that node)."""
        p = self.pending.pop(node_id, None)
        if p is not None:
            self.rows[p.client_id] = {"id": p.client_id, "node": node_id, "rank": p.rank,
                                      "bytes_down": p.bytes_down, "bytes_up": bytes_up,
                                      "tensor_bytes_down": p.tensor_bytes_down, "accepted": False}
        return p

    def fail(self, stage: str, error: str, node: int, client: str | None = None) -> None:
        if len(error) > MAX_ERROR:  # (an error reply's text, or one quoting a reply, is a client's word)
            error = error[:MAX_ERROR] + f"... ({len(error) - MAX_ERROR} more characters)"
        entry = {"node": node, "stage": stage, "error": error}
        if client is not None:
            entry = {"client": client, **entry}
            if client in self.rows:
                self.rows[client]["error"] = error
        self.failures.append(entry)

    def trained(self, client_id: str, update, privacy_state: dict | None) -> None:
        met = update.metrics
        row = self.rows[client_id]
        row |= {"loss": number(met.get("loss")), "examples": update.num_examples,
                "train_seconds": number(met.get("train-time-s")),
                "peak_memory": number(met.get("peak-memory-bytes")), "metrics": client_metrics(met)}
        if privacy_state is not None:
            row["privacy_state"] = privacy_state

    def unanswered(self) -> list[Pending]:
        """Sampled clients that never replied (recorded as such)."""
        out = list(self.pending.values())
        for p in out:
            self.reply(p.node_id, 0)
            self.fail("train", "no reply within round_timeout", p.node_id, p.client_id)
        return out

    def record(self, report: RoundReport) -> list[dict]:
        """Each client's outcome from the strategy's report; the rows, for evaluation."""
        for cid in report.accepted:
            self.rows[cid]["accepted"] = True
            self.rows[cid]["weight"] = report.weights.get(cid)
        for cid, reason in report.rejected.items():
            if cid in self.rows:
                self.rows[cid]["rejected"] = reason
        return list(self.rows.values())

    def close(self, strategy: str, report: RoundReport, evaluation: dict) -> dict:
        """The round's metrics line (built once, after ``record``)."""
        rows = sorted(self.rows.values(), key=lambda r: _client_order(r["id"]))
        ok = [r for r in rows if r["accepted"]]
        down, up = self.query_bytes
        return {"round": self.round, "strategy": strategy, "version": report.version,
                "clients": rows, "failures": self.failures,
                "train_loss": (sum(losses) / len(losses)) if (losses := [r["loss"] for r in ok
                                                                         if r["loss"] is not None]) else None,
                "aggregation_error": report.aggregation_error, "agg_seconds": report.agg_seconds,
                "diagnostic_seconds": report.diagnostic_seconds,
                # capability queries (once per node) are part of this round's traffic
                "query_bytes_up": up, "query_bytes_down": down,
                "bytes_up": sum(r["bytes_up"] for r in rows) + up,
                "bytes_down": sum(r["bytes_down"] for r in rows) + down,
                "tensor_bytes_up": sum(report.bytes_up.values()),
                "tensor_bytes_down": sum(report.bytes_down.values()),
                **evaluation, "round_seconds": time.perf_counter() - self.started}
