"""Where a node's privacy state lives, and how its DP-SGD client is opened each round.

Kept light (no torch at import): the ClientApp asks `LedgerFiles.has_ledger` on every message to decide whether
this node must train under DP-SGD whatever the coordinator asks (client/client_app.py `node_settings`). Which files
they are comes from the node's config (client/node_config.py `NodeSettings.ledger_files`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from client.config import ConfigError, RunSettings
from privacy.atomic import atomic_write
from privacy.ledger import LedgerError, PrivacyLedger, generate_key_file

LEDGER = "privacy.ledger"
LEDGER_KEY = "ledger.key"
LEDGER_ANCHOR = "ledger.anchor"
# Written beside the key the first time it opens a ledger: a key that has served a ledger never starts another,
# so a state folder wiped while the key lives elsewhere (`--ledger-key` on another volume) cannot restart a budget.
KEY_IN_USE_SUFFIX = ".in-use"


@dataclass(frozen=True)
class LedgerFiles:
    """The files of one node's privacy ledger: the ledger, its rollback anchor, its key and the key's in-use mark."""

    ledger: Path
    anchor: Path
    key: Path

    @classmethod
    def of(cls, *, state_dir: Path, key_file: Path | None = None, anchor_path: Path | None = None) -> LedgerFiles:
        """The node's files: `state_dir/privacy.ledger`, and the key and anchor there unless placed elsewhere."""
        return cls(
            ledger=state_dir / LEDGER,
            anchor=anchor_path or state_dir / LEDGER_ANCHOR,
            key=key_file or state_dir / LEDGER_KEY,
        )

    def create_key(self) -> Path:
        """Makes the ledger's key: the one place a ledger key is created (a deployed node's first start,
        `fer-client start --new-privacy-ledger`; a simulated node's first DP round).

        Raises:
            LedgerError: the key already exists (replacing it would orphan its ledger).
        """
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return generate_key_file(self.key)

    @property
    def in_use(self) -> Path:
        """The mark beside the key saying it has served a ledger (holding that ledger's id)."""
        return self.key.with_name(self.key.name + KEY_IN_USE_SUFFIX)

    def has_ledger(self) -> bool:
        """Whether this node has ever kept a privacy ledger (its ledger, anchor, or a key marked in use)."""
        return self.ledger.exists() or self.anchor.exists() or self.in_use.exists()

    def check_not_wiped(self) -> None:
        """Raises LedgerError when the key has served a ledger that is now gone with its anchor (a wiped state).

        The ledger alone catches a deleted ledger *or* a deleted anchor; deleting both (`rm -r STATE_DIR`) would
        otherwise open a fresh, empty ledger: a silent budget reset.
        """
        if self.in_use.exists() and not self.ledger.exists() and not self.anchor.exists():
            raise LedgerError(
                f"privacy ledger {self.ledger} and its anchor {self.anchor} are gone, but the key {self.key} has "
                "served a ledger (state folder wiped?); refusing to start a new budget. A deliberate reset is "
                "`fer-client start --new-privacy-ledger` with a new key (docs/deployment.md)"
            )


def open_ledger(
    *, settings: RunSettings, client_id: str, files: LedgerFiles, simulated: bool = False
) -> PrivacyLedger:
    """Opens the node's ledger under the run's budget terms.

    A deployed node never makes a ledger key here (its operator does, once: `fer-client start
    --new-privacy-ledger`), and a key that has served a ledger never starts another. A simulated node's ledger
    lives in the run directory and its key is made on first use.

    Raises:
        LedgerError: no key, a wiped ledger (see `LedgerFiles.check_not_wiped`), or any ledger failure.
    """
    files.ledger.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if simulated:
        if not files.key.exists():
            files.create_key()
    else:
        if not files.key.exists():
            raise LedgerError(
                f"privacy ledger key {files.key} not found: a node's first start makes it "
                "(`fer-client start --new-privacy-ledger`)"
            )
        files.check_not_wiped()
    ledger = PrivacyLedger.open(
        files.ledger,
        key_file=files.key,
        anchor_path=files.anchor,
        client_id=client_id,
        budget_epsilon=settings.dp_epsilon,
        delta=settings.dp_delta,
        accountant=settings.accountant,
    )
    if not simulated:
        _mark_key_in_use(files, ledger.ledger_id)
    return ledger


def _mark_key_in_use(files: LedgerFiles, ledger_id: str) -> None:
    if files.in_use.exists():
        try:
            recorded = json.loads(files.in_use.read_text()).get("ledger_id")
        except (OSError, ValueError, AttributeError) as err:
            raise LedgerError(f"{files.in_use} is unreadable ({err}); restore it or start a new ledger") from None
        if recorded != ledger_id:
            raise LedgerError(
                f"privacy ledger {files.ledger} (id {ledger_id}) is not the one key {files.key} has served "
                f"(id {recorded}): replaced ledger"
            )
        return
    atomic_write(files.in_use, json.dumps({"ledger_id": ledger_id}) + "\n")


def open_dp_client(
    *,
    settings: RunSettings,
    client_id: str,
    files: LedgerFiles,
    dataset_size: int,
    batch_size: int,
    local_epochs: int,
    simulated: bool = False,
):
    """Opens the node's ledger and builds its DP-SGD client for this round.

    Args:
        settings: run settings (ε, δ, clip norm, accountant, planned rounds).
        client_id: the node's identity, bound into its ledger.
        files: the node's ledger files (`NodeSettings.ledger_files`, client/node_config.py).
        dataset_size: local training-set size (sets the Poisson sample rate).
        batch_size: expected batch size.
        local_epochs: local epochs per round.
        simulated: a node of a simulation: its key is made on first use, and its noise and Poisson sampling come
            from torch's generator, seeded from the run's seed (reproducible, and stated so in privacy.json).
            A deployed node draws both from a CSPRNG keyed from the OS (privacy.noise `_SecureRandom`): the
            coordinator knows the run's seed, and could otherwise regenerate the noise and subtract it.

    Returns:
        The round's `privacy.dp.DPClient`.
    """
    from privacy.dp import DPClient, DPSettings  # torch: only when a DP round actually trains

    ledger = open_ledger(settings=settings, client_id=client_id, files=files, simulated=simulated)
    return DPClient(
        settings=DPSettings(
            epsilon=settings.dp_epsilon,
            delta=settings.dp_delta,
            max_grad_norm=settings.max_grad_norm,
            accountant=settings.accountant,
            secure_mode=not simulated,
        ),
        ledger=ledger,
        dataset_size=dataset_size,
        batch_size=batch_size,
        local_epochs=local_epochs,
        planned_rounds=settings.num_server_rounds,
    )


def check_model_dp_options(settings: RunSettings) -> None:
    """Refuses, in one line naming the key, DP options the run's model cannot train with (checked where a run
    starts, before anything is written, instead of failing every site's every round).

    aug-mult > 1 needs the book-keeping engine: it alone averages a sample's views before clipping (Opacus's
    engines would clip every view as a sample of its own, a K-times weaker bound than the accountant assumes).
    """
    if settings.aug_mult == 1:
        return
    from models import model_info  # torch: imported only when a check needs it

    engine = model_info(settings.model)["dp_engine"]
    if engine != "bk":
        raise ConfigError(f"aug-mult {settings.aug_mult} needs a model with the book-keeping DP engine; "
                          f"{settings.model} uses {engine!r}")
    if settings.augment == "none":
        raise ConfigError(f"aug-mult {settings.aug_mult} averages augmented views: augment 'none' gives K copies")
