"""Re-sending the update of a round this node has already paid for, instead of training (and paying) again.

When a coordinator dies mid-round and `fer-server resume` runs that round again, it sends the same global weights
(the previous round's checkpoint) with the same round number. A DP node that already trained on them has released
that update once; sending the same update again is post-processing and costs no privacy, while training again
would be a second release charged to its budget. So the node keeps the last update it produced under DP, keyed by
round and by a digest of the global weights it started from, and answers a repeat from it.

Under SecAgg+ a re-sent update would be dangerous: a server that repeats the round with one site fewer gets that
site's update as the difference of the two sums. The SecAgg+ mod therefore declines a second masked vector for the
same (round, global weights) before this client is even asked (`privacy.secagg_contributions.round_identity`), so
a re-send happens only in plain rounds, where the server saw the update itself the first time.

The file sits in the node's own state directory, beside its privacy ledger: it holds nothing the node's disk does
not already hold in a stronger form (the faces). It is read with `allow_pickle=False`, and anything unreadable or
not matching is ignored (the node then trains and pays as usual).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from privacy.atomic import atomic_write_with

RELEASED_UPDATE = "released-update.npz"


def global_digest(parameters: list[np.ndarray]) -> str:
    """sha256 over the dtypes, shapes and bytes of the global weights a round starts from."""
    digest = hashlib.sha256()
    for array in parameters:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_released(
    state_dir: Path, *, server_round: int, digest: str, delta: list[np.ndarray], num_examples: int, metrics: dict
) -> None:
    """Records the update about to leave the node (atomically: a crash leaves the previous record or this one)."""
    meta = {"server_round": int(server_round), "digest": digest, "num_examples": int(num_examples),
            "metrics": metrics}
    arrays = {f"a{i}": np.asarray(a) for i, a in enumerate(delta)}
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_with(state_dir / RELEASED_UPDATE, lambda handle: np.savez(handle, meta=np.array(json.dumps(meta)),
                                                                           **arrays))


def load_released(state_dir: Path, *, server_round: int, digest: str) -> tuple[list[np.ndarray], int, dict] | None:
    """The update released for (`server_round`, `digest`), with its num_examples and metrics; None if there is none."""
    path = state_dir / RELEASED_UPDATE
    try:
        with np.load(path, allow_pickle=False) as data:
            meta: dict[str, Any] = json.loads(str(data["meta"]))
            if meta.get("server_round") != server_round or meta.get("digest") != digest:
                return None
            count = len([k for k in data.files if k.startswith("a")])
            delta = [data[f"a{i}"] for i in range(count)]
    except (OSError, ValueError, KeyError):
        return None
    return delta, int(meta["num_examples"]), dict(meta["metrics"])
