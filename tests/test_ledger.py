"""Privacy ledger: budget exhaustion, crash safety with real SIGKILLs, tamper/rollback/deletion fail closed."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from opacus.accountants.analysis import rdp as rdp_analysis

from privacy.dp import BudgetExhausted, DPClient, DPSettings
from privacy.ledger import LedgerError, PrivacyLedger, generate_key_file

DELTA = 1e-5
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_opacus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _paths(tmp_path: Path) -> dict[str, Path]:
    """Where the key, ledger and anchor of one client live (anchor in a separate directory)."""
    return {
        "key": tmp_path / "keys" / "ledger.key",
        "ledger": tmp_path / "client" / "ledger.bin",
        "anchor": tmp_path / "operator" / "ledger.anchor",
    }


def _open(tmp_path: Path, *, budget: float = 3.0, client_id: str = "hospital-a", key: Path | None = None):
    """Opens the client's ledger, generating its key on first use."""
    paths = _paths(tmp_path)
    if key is None:
        key = paths["key"]
        if not key.exists():
            generate_key_file(key)
    return PrivacyLedger.open(
        paths["ledger"],
        key_file=key,
        anchor_path=paths["anchor"],
        client_id=client_id,
        budget_epsilon=budget,
        delta=DELTA,
    )


def _charge(ledger: PrivacyLedger, server_round: int, epsilon_after: float) -> None:
    """Charges a round with fixed mechanism parameters."""
    ledger.charge(server_round=server_round, noise_multiplier=1.1, sample_rate=0.05, steps=20, epsilon_after=epsilon_after)


def _client(ledger: PrivacyLedger, *, rounds: int = 3) -> DPClient:
    """A DP client over 300 examples, batch 30, 2 local epochs."""
    return DPClient(
        settings=DPSettings(epsilon=ledger.budget_epsilon, delta=DELTA),
        ledger=ledger,
        dataset_size=300,
        batch_size=30,
        local_epochs=2,
        planned_rounds=rounds,
    )


def _independent_rounds_until_exhausted(*, sigma: float, rate: float, steps: int, budget: float) -> int:
    """Rounds that fit the budget, from Opacus's RDP analysis functions directly (no project code)."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rounds = 0
    while True:
        rdp = rdp_analysis.compute_rdp(q=rate, noise_multiplier=sigma, steps=steps * (rounds + 1), orders=orders)
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
        if epsilon > budget:
            return rounds
        rounds += 1


def _run_child(script: str, *args: str) -> subprocess.Popen:
    """Starts a Python child in the repository with the project importable."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_budget_runs_out_after_the_independently_expected_rounds(tmp_path):
    """begin_round succeeds exactly as many times as an independent RDP computation allows, then declines."""
    # Prepare
    ledger = _open(tmp_path, budget=2.0)
    client = _client(ledger, rounds=3)

    # Execute
    granted = []
    with pytest.raises(BudgetExhausted) as refusal:
        for server_round in range(1, 10):
            granted.append(client.begin_round(server_round=server_round))

    # Assert
    expected = _independent_rounds_until_exhausted(
        sigma=client.noise_multiplier, rate=0.1, steps=20, budget=2.0
    )
    assert expected == 3
    assert len(granted) == expected
    assert granted[-1].epsilon_after <= 2.0
    declined = refusal.value
    assert declined.server_round == 4
    assert declined.epsilon_spent == granted[-1].epsilon_after
    assert declined.epsilon_projected > declined.epsilon_budget == 2.0
    assert "round 4" in str(declined) and "over the budget of 2.0000" in str(declined)
    assert _open(tmp_path, budget=2.0).seq == ledger.seq == 1 + expected


def test_ledger_survives_restart_with_full_history(tmp_path):
    """Reopening returns the same spend, history, id and sequence number."""
    # Prepare
    ledger = _open(tmp_path)
    _charge(ledger, 1, 1.0)
    _charge(ledger, 2, 1.5)

    # Execute
    reopened = _open(tmp_path)

    # Assert
    assert reopened.spent_epsilon == 1.5
    assert reopened.history == [(1.1, 0.05, 20), (1.1, 0.05, 20)]
    assert [r.server_round for r in reopened.rounds] == [1, 2]
    assert (reopened.ledger_id, reopened.seq) == (ledger.ledger_id, 3)


@pytest.mark.slow
def test_sigkill_while_training_never_lowers_the_spend(tmp_path):
    """A client SIGKILLed mid-round has been charged for it; restarting and retrying charges again."""
    # Prepare
    paths = _paths(tmp_path)
    generate_key_file(paths["key"])
    child = _run_child(
        """
        import sys, time
        from privacy.dp import DPClient, DPSettings
        from privacy.ledger import PrivacyLedger
        key, ledger_path, anchor = sys.argv[1:4]
        ledger = PrivacyLedger.open(ledger_path, key_file=key, anchor_path=anchor, client_id="hospital-a",
                                    budget_epsilon=3.0, delta=1e-5)
        client = DPClient(settings=DPSettings(epsilon=3.0), ledger=ledger, dataset_size=300, batch_size=30,
                          local_epochs=2, planned_rounds=3)
        plan = client.begin_round(server_round=1)
        print("training", repr(plan.epsilon_after), flush=True)
        while True:
            time.sleep(0.05)
        """,
        str(paths["key"]),
        str(paths["ledger"]),
        str(paths["anchor"]),
    )

    # Execute
    line = child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert line.startswith("training"), child.stderr.read()
    charged = float(line.split()[1])
    restarted = _open(tmp_path)
    spent_after_restart = restarted.spent_epsilon
    retry = _client(restarted).begin_round(server_round=1)

    # Assert
    assert child.returncode == -signal.SIGKILL
    assert spent_after_restart == charged > 0
    assert retry.epsilon_before == charged and retry.epsilon_after > charged
    assert [r.server_round for r in _open(tmp_path).rounds] == [1, 1]


@pytest.mark.slow
def test_sigkill_during_ledger_writes_leaves_a_valid_ledger_at_least_as_high(tmp_path):
    """Killing a client that charges continuously never tears the files or loses an acknowledged charge."""
    # Prepare
    paths = _paths(tmp_path)
    generate_key_file(paths["key"])
    script = """
        import sys
        from privacy.ledger import PrivacyLedger
        key, ledger_path, anchor = sys.argv[1:4]
        ledger = PrivacyLedger.open(ledger_path, key_file=key, anchor_path=anchor, client_id="hospital-a",
                                    budget_epsilon=1e9, delta=1e-5)
        while True:
            seq = ledger.seq
            ledger.charge(server_round=seq, noise_multiplier=1.0, sample_rate=0.1, steps=1, epsilon_after=seq / 1000)
            print(ledger.seq, ledger.spent_epsilon, flush=True)
        """
    acknowledged_seq, acknowledged_epsilon = 0, 0.0

    for kill_after in (3, 17, 40):
        # Execute
        child = _run_child(script, str(paths["key"]), str(paths["ledger"]), str(paths["anchor"]))
        for _ in range(kill_after):
            acknowledged_seq, acknowledged_epsilon = (float(v) for v in child.stdout.readline().split())
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        reopened = PrivacyLedger.open(
            paths["ledger"],
            key_file=paths["key"],
            anchor_path=paths["anchor"],
            client_id="hospital-a",
            budget_epsilon=1e9,
            delta=DELTA,
        )

        # Assert
        assert reopened.seq >= acknowledged_seq
        assert reopened.spent_epsilon >= acknowledged_epsilon
        assert not list(paths["ledger"].parent.glob("*.tmp")) and not list(paths["anchor"].parent.glob("*.tmp"))


@pytest.mark.parametrize("offset", [0, 9, 20, 40, -1, -20])
def test_bit_flip_anywhere_fails_closed(tmp_path, offset):
    """Flipping one bit of the ledger (header, nonce, ciphertext or tag) raises LedgerError on open."""
    # Prepare
    ledger = _open(tmp_path)
    _charge(ledger, 1, 1.0)
    blob = bytearray(_paths(tmp_path)["ledger"].read_bytes())
    blob[offset] ^= 0x04
    _paths(tmp_path)["ledger"].write_bytes(bytes(blob))

    # Execute / Assert
    with pytest.raises(LedgerError):
        _open(tmp_path)


def test_flipped_anchor_fails_closed(tmp_path):
    """A bit flip in the anchor raises LedgerError as well."""
    # Prepare
    _charge(_open(tmp_path), 1, 1.0)
    anchor = _paths(tmp_path)["anchor"]
    blob = bytearray(anchor.read_bytes())
    blob[-5] ^= 0x80
    anchor.write_bytes(bytes(blob))

    # Execute / Assert
    with pytest.raises(LedgerError, match="failed authentication"):
        _open(tmp_path)


def _restore_backup(tmp_path: Path, *files: str) -> PrivacyLedger:
    """Charges rounds 1 and 2, then puts back the copies of `files` ("ledger", "anchor") taken between them."""
    paths = _paths(tmp_path)
    ledger = _open(tmp_path)
    _charge(ledger, 1, 1.0)
    for name in files:
        shutil.copy2(paths[name], tmp_path / f"old-{name}")
    _charge(ledger, 2, 2.0)
    for name in files:
        shutil.copy2(tmp_path / f"old-{name}", paths[name])
    return ledger


def test_restored_older_ledger_is_detected_as_rollback(tmp_path):
    """Restoring a copy of the ledger taken before the last charge raises LedgerError (rolled back)."""
    # Prepare
    _restore_backup(tmp_path, "ledger")

    # Execute / Assert
    with pytest.raises(LedgerError, match="rolled-back ledger"):
        _open(tmp_path)


def test_restoring_both_files_is_invisible_locally_but_lowers_the_reported_sequence(tmp_path):
    """The documented limit: restoring ledger AND anchor opens, with a lower seq the server can flag."""
    # Prepare
    ledger = _restore_backup(tmp_path, "ledger", "anchor")
    latest_seq = ledger.seq

    # Execute
    restored = _open(tmp_path)

    # Assert
    assert restored.ledger_id == ledger.ledger_id
    assert restored.seq < latest_seq and restored.spent_epsilon == 1.0


@pytest.mark.parametrize(("deleted", "message"), [("ledger", "deleted ledger"), ("anchor", "deleted anchor")])
def test_deleted_ledger_or_anchor_fails_closed(tmp_path, deleted, message):
    """Deleting either file, while the other remains, raises LedgerError."""
    # Prepare
    _charge(_open(tmp_path), 1, 1.0)
    _paths(tmp_path)[deleted].unlink()

    # Execute / Assert
    with pytest.raises(LedgerError, match=message):
        _open(tmp_path)


def test_deleting_both_files_starts_a_new_ledger_with_a_new_id(tmp_path):
    """The documented limit: deleting both files resets locally, but the ledger id changes for the server."""
    # Prepare
    ledger = _open(tmp_path)
    _charge(ledger, 1, 1.0)
    _paths(tmp_path)["ledger"].unlink()
    _paths(tmp_path)["anchor"].unlink()

    # Execute
    fresh = _open(tmp_path)

    # Assert
    assert fresh.spent_epsilon == 0.0
    assert fresh.ledger_id != ledger.ledger_id


def test_wrong_key_is_reported_as_a_key_mismatch(tmp_path):
    """Opening with another key file raises LedgerError saying the key differs."""
    # Prepare
    _charge(_open(tmp_path), 1, 1.0)
    other_key = generate_key_file(tmp_path / "other.key")

    # Execute / Assert
    with pytest.raises(LedgerError, match="different key"):
        _open(tmp_path, key=other_key)


def test_files_hold_no_plaintext(tmp_path):
    """Neither the ledger nor the anchor contains any number, field name or client id in the clear."""
    # Prepare
    ledger = _open(tmp_path, budget=3.0)
    plan = _client(ledger).begin_round(server_round=7)
    secrets = [
        "3.0", "1e-05", repr(plan.noise_multiplier), repr(plan.sample_rate), repr(plan.epsilon_after)[:6],
        "epsilon", "history", "rounds", "hospital-a", ledger.ledger_id, "rdp",
    ]

    # Execute
    contents = [_paths(tmp_path)[name].read_bytes() for name in ("ledger", "anchor")]

    # Assert
    for blob in contents:
        for secret in secrets:
            assert secret.encode() not in blob, secret
        # Not a JSON document: a single "{" byte may occur anywhere in a random nonce or ciphertext (the old
        # check on the first 32 bytes failed about once in twenty runs), but plaintext JSON starts with one.
        assert blob.startswith(b"FERFL") and not blob.lstrip().startswith(b"{")


def test_key_file_is_owner_only_and_never_overwritten(tmp_path):
    """generate_key_file writes mode 0600 and refuses to replace an existing key."""
    # Execute
    key = generate_key_file(tmp_path / "k" / "ledger.key")
    first = key.read_bytes()

    # Assert
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(LedgerError, match="already exists"):
        generate_key_file(key)
    assert key.read_bytes() == first


def test_key_readable_by_others_is_refused(tmp_path):
    """A key file readable by group or others raises LedgerError naming chmod 600."""
    # Prepare
    key = generate_key_file(tmp_path / "ledger.key")
    key.chmod(0o644)

    # Execute / Assert
    with pytest.raises(LedgerError, match="chmod 600"):
        _open(tmp_path, key=key)


def test_crash_between_ledger_and_anchor_write_is_repaired(tmp_path):
    """A ledger one write ahead of its anchor opens (and repairs the anchor); two ahead fails closed."""
    # Prepare
    paths = _paths(tmp_path)
    ledger = _open(tmp_path)
    _charge(ledger, 1, 1.0)
    shutil.copy2(paths["anchor"], tmp_path / "anchor.1")
    _charge(ledger, 2, 1.5)
    shutil.copy2(tmp_path / "anchor.1", paths["anchor"])

    # Execute
    repaired = _open(tmp_path)
    _charge(repaired, 3, 2.0)
    shutil.copy2(tmp_path / "anchor.1", paths["anchor"])

    # Assert
    assert repaired.spent_epsilon == 2.0
    with pytest.raises(LedgerError, match="rolled-back anchor"):
        _open(tmp_path)


def test_budget_cannot_be_changed_after_creation(tmp_path):
    """Reopening with another budget raises LedgerError instead of silently raising the budget."""
    # Prepare
    _open(tmp_path, budget=3.0)

    # Execute / Assert
    with pytest.raises(LedgerError, match="budget_epsilon=3.0"):
        _open(tmp_path, budget=8.0)


def test_second_writer_makes_the_stale_one_fail_closed(tmp_path):
    """Two processes' handles on one ledger: after one charges, the other's charge raises LedgerError."""
    # Prepare
    first, second = _open(tmp_path), _open(tmp_path)
    _charge(first, 1, 1.0)

    # Execute / Assert
    with pytest.raises(LedgerError, match="changed on disk"):
        _charge(second, 1, 1.0)
    assert _open(tmp_path).spent_epsilon == 1.0


def test_another_clients_ledger_is_refused(tmp_path):
    """A ledger and anchor of client A opened as client B raise LedgerError naming the owner."""
    # Prepare
    _open(tmp_path, client_id="hospital-a")

    # Execute / Assert
    with pytest.raises(LedgerError, match="belongs to client 'hospital-a'"):
        _open(tmp_path, client_id="hospital-b")


def test_over_budget_charge_is_refused_by_the_ledger_itself(tmp_path):
    """The ledger refuses a charge past its budget even when the caller skipped the check."""
    # Prepare
    ledger = _open(tmp_path, budget=3.0)

    # Execute / Assert
    with pytest.raises(BudgetExhausted):
        _charge(ledger, 1, 3.5)
    assert _open(tmp_path).spent_epsilon == 0.0
