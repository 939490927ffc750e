"""A site's privacy budget cannot be reset by wiping its state: `fer-client start` refuses a node without its
ledger key unless told `--new-privacy-ledger` (loudly), and the coordinator keeps each node's ledger record in its
state folder, so a rolled-back or replaced ledger is refused across `fer-server resume` and across runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_proxy import ClientProxy

from client.config import RunSettings
from server.ledger_registry import REGISTRY_FILE, NodeLedgers
from server.server_app import build_strategy, initial_weights

BIN = Path(sys.executable).parent
SETTINGS = RunSettings(dataset="synthetic=20", model="cnn_am", dp_epsilon=8.0, out_dir="unused")


class _Proxy(ClientProxy):
    """A ClientProxy is only an identity for strategies; the transport methods are never called here."""

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - not used by aggregation
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def _make_reply(weights: list[np.ndarray], *, ledger_id: str, ledger_seq: int) -> tuple[ClientProxy, FitRes]:
    """A DP node's reply: a small delta and the ledger status its DPClient reports."""
    delta = [np.full_like(w, 1e-4) for w in weights]
    metrics = {"client-id": "site-a", "train-loss": 1.0, "dp-ledger-id": ledger_id, "dp-ledger-seq": ledger_seq,
               "dp-epsilon-spent": 1.0, "dp-epsilon-budget": 8.0}
    return _Proxy("site-a"), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), 100, metrics)


def _make_coordinator(registry: Path):
    """The ServerApp's strategy as a (resumed) `fer-server` builds it: a fresh process, the same state folder."""
    settings = SETTINGS.replace(ledger_registry=str(registry))
    weights = initial_weights(settings)
    strategy = build_strategy(settings, weights)
    strategy._global = weights  # configure_fit would set it from the round's global model
    return strategy, weights


def _rejections(strategy, server_round: int, reply) -> list[str]:
    strategy.aggregate_fit(server_round, [reply], [])
    return [r["reason"] for r in strategy.report(server_round).rejected]


@pytest.mark.parametrize(
    ("ledger_id", "ledger_seq", "server_round", "reason"),
    [
        ("L1", 4, 4, "went back from sequence 5"),          # an older copy of ledger and anchor restored
        ("L1", 5, 4, "went back from sequence 5"),          # the same charge re-used for another round
        ("L2", 9, 4, "was replaced"),                       # state wiped, a new ledger started
        ("L1", 5, 3, None),                                 # round 3 repeated: the update already released
        ("L1", 6, 4, None),                                 # honest progress
    ],
)
def test_a_resumed_coordinator_refuses_a_rolled_back_or_replaced_ledger(tmp_path, ledger_id, ledger_seq,
                                                                        server_round, reason):
    """Attack: after `fer-server resume` (a new ServerApp process) a node reports a ledger behind the one the
    coordinator accepted before; the record kept in the state folder catches it."""
    # Prepare: the first ServerApp accepted site-a's ledger L1 at sequence 5 in round 3, then died
    registry = tmp_path / "srv" / REGISTRY_FILE
    first, weights = _make_coordinator(registry)
    assert _rejections(first, 3, _make_reply(weights, ledger_id="L1", ledger_seq=5)) == []

    # Execute
    resumed, _ = _make_coordinator(registry)
    rejected = _rejections(resumed, server_round, _make_reply(weights, ledger_id=ledger_id, ledger_seq=ledger_seq))

    # Assert
    if reason is None:
        assert rejected == []
    else:
        assert len(rejected) == 1 and reason in rejected[0]
        assert resumed.report(server_round).num_accepted == 0


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_forget_ledger_accepts_an_announced_reset(tmp_path):
    """`fer-server forget-ledger` drops one node's record (and says so); the node's new ledger is then accepted."""
    # Prepare
    registry = NodeLedgers(tmp_path / REGISTRY_FILE)
    registry.accept("site-a", {"ledger_id": "L1", "ledger_seq": 5}, server_round=3)
    registry.accept("site-b", {"ledger_id": "B1", "ledger_seq": 2}, server_round=3)
    registry.save()

    # Execute
    done = _cli("fer-server", "forget-ledger", "site-a", "--state-dir", str(tmp_path), cwd=tmp_path)

    # Assert
    assert done.returncode == 0, done.stderr
    assert "L1" in done.stdout
    after = NodeLedgers(tmp_path / REGISTRY_FILE)
    assert after.check("site-a", {"ledger_id": "L2", "ledger_seq": 2}, server_round=1) is None
    assert set(json.loads((tmp_path / REGISTRY_FILE).read_text())["nodes"]) == {"site-b"}


def _start(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("fer-client", "start", "--server", "127.0.0.1:1", "--dataset", "synthetic=10", "--insecure",
                "--state-dir", "node", "--max-retries", "1", *extra, cwd=cwd)


@pytest.mark.slow
def test_a_wiped_node_is_refused_at_start_and_a_new_ledger_is_loud(tmp_path):
    """Attack: `rm -r STATE_DIR` then the usual start command: refused in one line, no key made. Starting a new
    ledger takes `--new-privacy-ledger`, says so on stderr, and is refused where a ledger key exists."""
    # Execute
    wiped = _start(tmp_path)
    new = _start(tmp_path, "--new-privacy-ledger")  # the SuperNode then fails on the closed port, after the key
    again = _start(tmp_path, "--new-privacy-ledger")

    # Assert
    assert wiped.returncode == 1
    assert "--new-privacy-ledger" in wiped.stderr.splitlines()[-1] and "Traceback" not in wiped.stderr
    assert "NEW PRIVACY LEDGER" in new.stderr
    assert (tmp_path / "node" / "ledger.key").is_file()
    assert again.returncode == 1 and "already has a privacy ledger" in again.stderr.splitlines()[-1]


def test_an_unreadable_registry_is_refused_not_forgotten(tmp_path):
    """A corrupt node-ledgers.json stops the coordinator with the file's name; it is never read as empty."""
    from server.ledger_registry import LedgerRegistryError

    # Prepare
    path = tmp_path / REGISTRY_FILE
    path.write_text('{"nodes": {"site-a": {"ledger_id": "L1"}}}')

    # Execute / Assert
    with pytest.raises(LedgerRegistryError, match=REGISTRY_FILE):
        NodeLedgers(path)
