"""The coordinator's record of every node's privacy ledger, kept on disk across `fer-server resume` and runs.

A node's ledger catches a deleted ledger or anchor by itself, but not both files restored together from an old
backup, nor a node whose state was wiped and started again with a new ledger (`fer-client start
--new-privacy-ledger`): both restart or lower the recorded spend. Every DP update carries the node's ledger id and
sequence number; a ledger only moves forward, so the coordinator keeps the last pair it accepted from each node and
refuses an update whose ledger went back or was replaced. In memory only, that record died with the ServerApp
process: a resumed run or the next run accepted a rolled-back ledger. `fer-server start` and `resume` now keep it
in their state folder (`STATE_DIR/node-ledgers.json`, run-config key `ledger-registry`); simulations, whose nodes'
ledgers live in each run's own directory, keep it in memory.

A deliberate reset (a site lost its state and told its coordinator) is accepted with `fer-server forget-ledger
CLIENT_ID`, which drops that node's record and says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from privacy.atomic import atomic_write

REGISTRY_FILE = "node-ledgers.json"
_SCHEMA = "fer-fl/node-ledgers/1"


@dataclass(frozen=True)
class LedgerMark:
    """The last ledger state the coordinator accepted from one node, and the round it came with."""

    ledger_id: str
    ledger_seq: int
    server_round: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LedgerMark:
        return cls(ledger_id=str(data["ledger_id"]), ledger_seq=int(data["ledger_seq"]),
                   server_round=int(data["server_round"]))


class LedgerRegistryError(ValueError):
    """The registry file is unreadable or malformed; the message names the file."""


class NodeLedgers:
    """Per-node ledger marks, checked and advanced by the guard (server/strategy.py), saved to `path` if given.

    Args:
        path: the JSON file to keep the marks in (created on first save); None keeps them in memory.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.marks: dict[str, LedgerMark] = {}
        if self.path is not None and self.path.exists():
            try:
                document = json.loads(self.path.read_text())
                self.marks = {cid: LedgerMark.from_json(m) for cid, m in document["nodes"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                # Failing open here would silently forget every node's ledger: refuse to run instead.
                raise LedgerRegistryError(f"{self.path}: unreadable node-ledger registry ({err})") from None

    def check(self, client_id: str, privacy: dict[str, Any], *, server_round: int) -> str | None:
        """Why this node's update must be refused (a replaced or rolled-back ledger), or None.

        The same sequence number again is accepted only for the round it first came with: a round repeated after
        a resume gets the update the node already released for it (client/replay.py), ledger unchanged.
        """
        if not privacy or "ledger_id" not in privacy:
            return None
        try:
            seq = int(privacy["ledger_seq"])
        except (KeyError, TypeError, ValueError):
            return f"its privacy ledger sequence {privacy.get('ledger_seq')!r} is not an integer"
        mark = self.marks.get(client_id)
        if mark is None:
            return None
        if str(privacy["ledger_id"]) != mark.ledger_id:
            return (f"its privacy ledger was replaced since the update the coordinator last accepted (ledger "
                    f"{mark.ledger_id} -> {privacy['ledger_id']}): possible budget reset; if the site reset it on "
                    f"purpose, accept it with `fer-server forget-ledger {client_id}`")
        if seq < mark.ledger_seq or (seq == mark.ledger_seq and server_round != mark.server_round):
            return (f"its privacy ledger went back from sequence {mark.ledger_seq} (round {mark.server_round}) "
                    f"to {seq} (round {server_round}): possible rollback")
        return None

    def accept(self, client_id: str, privacy: dict[str, Any], *, server_round: int) -> None:
        """Records the ledger state of an accepted update (call `save` once the round's updates are in)."""
        if privacy and "ledger_id" in privacy:
            self.marks[client_id] = LedgerMark(ledger_id=str(privacy["ledger_id"]),
                                               ledger_seq=int(privacy["ledger_seq"]), server_round=server_round)

    def forget(self, client_id: str) -> LedgerMark | None:
        """Drops one node's mark (a reset its site announced); returns what was dropped."""
        return self.marks.pop(client_id, None)

    def save(self) -> None:
        """Writes the marks atomically (temporary file, fsync, rename): a crash leaves the old or the new file."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"schema": _SCHEMA, "nodes": {cid: m.to_json() for cid, m in sorted(self.marks.items())}}
        atomic_write(self.path, (json.dumps(document, indent=2) + "\n").encode())
