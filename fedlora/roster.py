"""The server's view of its clients: node ↔ client id, rank, held base version, privacy state.

Client ids are ``client-<partition-id>`` (stable across runs and restarts, unlike Flower node ids),
so a resumed run and a restarted node map to the same fedlora client; when two nodes announce the
same client, the one discovered last wins (a restarted node outranks its dead predecessor).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NodeCaps:
    client_id: str
    rank: int
    device: str
    num_examples: int
    discovered: int  # order of discovery


@dataclass
class ClientRoster:
    nodes: dict[int, NodeCaps] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)  # base version a client holds (0: W0/unknown)
    ranks: dict[str, int] = field(default_factory=dict)
    privacy: dict[str, dict] = field(default_factory=dict)  # DP accountant history, as last reported

    def unknown(self, node_ids: list[int]) -> list[int]:
        return [n for n in node_ids if n not in self.nodes]

    def add(self, node_id: int, client_id: str, rank: int, device: str, num_examples: int) -> None:
        self.nodes[node_id] = NodeCaps(client_id, int(rank), device, int(num_examples), len(self.nodes))

    def by_client(self, node_ids: list[int]) -> dict[str, int]:
        """``{client id: node id}`` over the connected, known nodes (the latest node of a client)."""
        known = sorted((n for n in node_ids if n in self.nodes), key=lambda n: self.nodes[n].discovered)
        return {self.nodes[n].client_id: n for n in known}

    def examples_reason(self, node_id: int, num_examples: int) -> str | None:
        """Why a reply's sample count cannot be its weight: more than the node declared when it
        joined (a client cannot inflate its weight after the capability query)."""
        declared = self.nodes[node_id].num_examples
        if num_examples > declared:
            return (f"num-examples {num_examples} exceeds the {declared} this client declared when it "
                    "joined: its weight cannot grow after the capability query")
        return None

    def sync_point(self, client_id: str, rank: int) -> int:
        """The base version to send ``client_id`` deltas from (a client that changed rank: W0)."""
        if self.ranks.get(client_id, rank) != rank:
            self.held[client_id] = 0
        self.ranks[client_id] = rank
        return self.held.get(client_id, 0)

    def trained(self, client_id: str, version: int) -> None:
        self.held[client_id] = version

    def lost(self, client_id: str) -> None:
        """Its state is unknown (an error, no reply): it re-syncs from W0 next time."""
        self.held[client_id] = 0

    def state(self) -> dict:
        """What a checkpoint keeps (node ids are per run: a resumed run discovers nodes again)."""
        return {"held": dict(self.held), "ranks": dict(self.ranks), "privacy": dict(self.privacy)}

    @classmethod
    def from_state(cls, st: dict) -> ClientRoster:
        # a resumed run's clients are fresh processes: what they hold is unknown, so W0
        return cls(ranks=dict(st.get("ranks", {})), privacy=dict(st.get("privacy", {})))
