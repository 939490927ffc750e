"""One masked vector per round identity: what this node remembers of the SecAgg+ rounds it contributed to.

A node that masked an update for a round (its round number and global weights) declines to mask another for the
same round, in this run (its Context) and across runs and restarts (a file in its state directory), so that two
SecAgg+ sums over different participants can never differ by its update alone. Digests only, never an update.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import cast

from flwr.app import ConfigRecord, Context, Message
from flwr.compat.common import recorddict_compat as compat

from privacy.atomic import atomic_write

# Round identities this node has masked an update for: in its Context (one run) and in its state directory (across
# runs and restarts, e.g. after `fer-server resume`). They hold digests only, never an update.
CONTRIBUTED_RECORD = "fer-fl:secagg-contributed"
CONTRIBUTED_FILE = "secagg-contributed.json"
_MAX_CONTRIBUTED = 10_000


class RoundAlreadyMasked(PermissionError):
    """This node already masked an update for this round identity; a second one would allow differencing."""


def round_identity(msg: Message) -> str:
    """What makes two rounds the same for this node: the fit config's round number and the global weights.

    The same pair is what `client.replay` keys a re-sent update on (and what seeds deterministic training), so a
    node that refuses a second masked vector for it can never put a replayed update into a second sum.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round = fitins.config.get("server-round", msg.metadata.group_id)
    digest = hashlib.sha256()
    for tensor in fitins.parameters.tensors:
        digest.update(len(tensor).to_bytes(8, "big"))
        digest.update(tensor)
    return f"{server_round}:{digest.hexdigest()}"


def _record_contribution(ctxt: Context, identity: str, *, state_dir: Path | None) -> None:
    """Records that this node masks an update for `identity`, or refuses if it already did.

    Raises:
        RoundAlreadyMasked: a repeated round (same round number and global weights), e.g. a resumed or replayed
            round with another set of participants, whose sum minus the first would be this node's update.
    """
    record = ctxt.state.config_records.get(CONTRIBUTED_RECORD)
    in_context = cast(list[str], record["identities"]) if record is not None else []
    path = state_dir / CONTRIBUTED_FILE if state_dir is not None else None
    on_disk = _read_contributed(path) if path is not None else []
    seen = list(dict.fromkeys([*on_disk, *in_context]))  # oldest first, so trimming forgets the oldest
    if identity in seen:
        raise RoundAlreadyMasked(
            f"this node already sent a masked update for round {identity.split(':')[0]} from these global weights; "
            "declining the repeated round (a second SecAgg+ sum over other participants would reveal its update)"
        )
    identities = [*seen, identity][-_MAX_CONTRIBUTED:]
    if path is not None:
        _write_contributed(path, identities)
    ctxt.state.config_records[CONTRIBUTED_RECORD] = ConfigRecord({"identities": identities})


def _read_contributed(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        # Unreadable means unknown: refusing every round is safer than forgetting what was sent.
        raise RoundAlreadyMasked(f"{path}: cannot read this node's SecAgg+ contributions ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("identities", []), list):
        raise RoundAlreadyMasked(f"{path}: not a record of this node's SecAgg+ contributions")
    return [str(item) for item in data.get("identities", [])]


def _write_contributed(path: Path, identities: list[str]) -> None:
    """Atomically, and synced before the masked vector can leave: a crash must not forget a contribution."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps({"identities": identities}))
