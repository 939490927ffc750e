"""Where a node's privacy state lives, and how its DP-SGD client is opened each round."""

from __future__ import annotations

from pathlib import Path

from client.config import RunSettings
from privacy.dp import DPClient, DPSettings
from privacy.ledger import PrivacyLedger, generate_key_file


def open_dp_client(
    *,
    settings: RunSettings,
    client_id: str,
    state_dir: Path,
    dataset_size: int,
    batch_size: int,
    local_epochs: int,
    key_file: Path | None = None,
    anchor_path: Path | None = None,
    create_key: bool = False,
) -> DPClient:
    """Opens the node's ledger and builds its DP-SGD client for this round.

    Args:
        settings: run settings (ε, δ, clip norm, accountant, planned rounds).
        client_id: the node's identity, bound into its ledger.
        state_dir: the node's private directory (ledger, and by default its key and anchor).
        dataset_size: local training-set size (sets the Poisson sample rate).
        batch_size: expected batch size.
        local_epochs: local epochs per round.
        key_file: the operator's ledger key; defaults to `state_dir/ledger.key`.
        anchor_path: the ledger's rollback anchor, ideally on another volume; defaults to `state_dir/ledger.anchor`.
        create_key: generate the key when missing. Only simulations do this: a real node's operator makes the key
            (`fer-client keygen`) so that a wiped state directory cannot silently start a fresh budget.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_file = key_file or state_dir / "ledger.key"
    if create_key and not key_file.exists():
        generate_key_file(key_file)
    ledger = PrivacyLedger.open(
        state_dir / "privacy.ledger",
        key_file=key_file,
        anchor_path=anchor_path or state_dir / "ledger.anchor",
        client_id=client_id,
        budget_epsilon=settings.dp_epsilon,
        delta=settings.dp_delta,
        accountant=settings.accountant,
    )
    return DPClient(
        settings=DPSettings(
            epsilon=settings.dp_epsilon,
            delta=settings.dp_delta,
            max_grad_norm=settings.max_grad_norm,
            accountant=settings.accountant,
        ),
        ledger=ledger,
        dataset_size=dataset_size,
        batch_size=batch_size,
        local_epochs=local_epochs,
        planned_rounds=settings.num_server_rounds,
    )
