"""The per-client privacy ledger: every round's privacy spend, encrypted at rest, rollback-evident.

Why it exists: ε only means something if it is cumulative over the whole federation and survives the
client process. The ledger is the client's own record of every DP-SGD round it has been charged for
(σ, q, steps and the ε after the round). A round is charged *before* training starts, so no update can
leave the client uncharged and killing the client mid-round can never lower the recorded spend (a
retried round is charged again: the spend is an upper bound on what was used).

Files and what each one catches:

* **Ledger** (``path``): AES-256-GCM with a key derived from the operator's key file; the header
  (format, key id, nonce) is authenticated data. A bit flip anywhere fails authentication; a ledger
  written with another key is reported as such. The plaintext is padded, so the size shows roughly how
  many rounds were charged and nothing else. Written by fsync + atomic rename + directory fsync, so a
  kill leaves either the old or the new file, never a torn one.
* **Anchor** (``anchor_path``, an operator-chosen second location, ideally another volume or a
  directory the training process cannot delete): encrypted the same way; holds the ledger's random id,
  its latest sequence number and the SHA-256 of its bytes. Written *after* the ledger, so a crash
  between the two writes leaves the ledger exactly one sequence number ahead, which is accepted and
  repaired. Detected, failing closed with :class:`LedgerError`: a deleted ledger (anchor present), a
  deleted anchor (ledger present), an older copy of the ledger restored (its sequence number is behind
  the anchor's), a different ledger of the same sequence number, an anchor rolled back further than one
  write, files swapped between clients or between ledger and anchor, another process writing the same
  ledger concurrently.
* **Not detectable by the ledger alone**: deleting *both* files (the next open starts a new, empty
  ledger) or restoring old copies of *both* together. A deployed node closes the first (client/dp_training.py:
  its key is made only on purpose, and a key that has served a ledger never opens a fresh one); for both,
  :attr:`PrivacyLedger.ledger_id` and :attr:`PrivacyLedger.seq` go with every update, and the coordinator
  refuses a node whose ledger id changes or whose sequence number goes down, remembering them across resumes
  and runs (server/ledger_registry.py). Someone who holds the key file can
  forge anything; the key must be readable by the client process only (0600, checked on every open).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from privacy.atomic import atomic_write
from privacy.ledger_file import _FORMAT, LedgerError, _Box, _locked, _read_key, _read_or_none, generate_key_file

__all__ = ["BudgetExhausted", "LedgerError", "LedgerRound", "PrivacyLedger", "generate_key_file", "read_ledger"]

_ACCOUNTANTS = ("rdp", "prv")  # mirrors privacy.accounting without importing torch


class BudgetExhausted(RuntimeError):
    """The next round would take the client's ε past its budget; the client declines to train.

    Attributes:
        server_round: The round that was declined.
        epsilon_spent: ε already charged.
        epsilon_projected: ε the round would have brought the client to.
        epsilon_budget: The client's budget for the whole federation.
        delta: δ of all three figures.
    """

    def __init__(
        self,
        *,
        server_round: int,
        epsilon_spent: float,
        epsilon_projected: float,
        epsilon_budget: float,
        delta: float,
    ) -> None:
        self.server_round = server_round
        self.epsilon_spent = epsilon_spent
        self.epsilon_projected = epsilon_projected
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        super().__init__(
            f"privacy budget exhausted: round {server_round} would bring epsilon from {epsilon_spent:.4f} "
            f"to {epsilon_projected:.4f}, over the budget of {epsilon_budget:.4f} (delta={delta:g}); "
            "declining to train"
        )


@dataclass(frozen=True)
class LedgerRound:
    """One charged round: the DP-SGD mechanism it was allowed to run and the ε after it."""

    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    charged_at: str


def _rounds_of(document: dict, where: Path) -> tuple[LedgerRound, ...]:
    try:
        return tuple(LedgerRound(**entry) for entry in document["rounds"])
    except (KeyError, TypeError) as exc:
        raise LedgerError(f"{where} holds malformed round entries") from exc


class PrivacyLedger:
    """One client's encrypted, append-only record of charged DP-SGD rounds.

    Open with :meth:`open`; read :attr:`spent_epsilon` and :attr:`history`; charge a round with
    :meth:`charge` before training for it. Not thread-safe; safe against concurrent processes (a second
    writer makes the first one's next :meth:`charge` fail closed).
    """

    def __init__(
        self,
        *,
        path: Path,
        anchor_path: Path,
        box: _Box,
        document: dict,
        digest: str,
    ) -> None:
        self._path = path
        self._anchor_path = anchor_path
        self._box = box
        self._document = document
        self._digest = digest
        self._rounds = _rounds_of(document, path)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        key_file: str | os.PathLike[str],
        anchor_path: str | os.PathLike[str],
        client_id: str,
        budget_epsilon: float,
        delta: float,
        accountant: str = "rdp",
    ) -> PrivacyLedger:
        """Opens (creating on first use) and verifies a client's ledger against its anchor.

        Args:
            path: The ledger file on the client's disk.
            key_file: The operator's key file (see :func:`generate_key_file`); must be mode 0600.
            anchor_path: The anchor file, in a second operator-chosen location (another volume, or a
                directory the training process cannot delete); must differ from ``path``.
            client_id: The client this ledger belongs to; a ledger of another client is refused.
            budget_epsilon: The client's ε budget for the whole federation. Fixed when the ledger is
                created: a different value later is refused rather than silently raising the budget.
            delta: δ of the budget; fixed at creation likewise.
            accountant: ``"rdp"`` or ``"prv"``; fixed at creation likewise.

        Returns:
            The verified ledger.

        Raises:
            LedgerError: Missing, tampered, rolled-back or mismatched ledger or anchor, wrong or
                unreadable key file, or a budget/δ/accountant different from the ledger's.
            ValueError: ``budget_epsilon`` or ``delta`` out of range, or ``path`` equal to ``anchor_path``.
        """
        ledger_path, anchor = Path(path), Path(anchor_path)
        if not (isinstance(budget_epsilon, (int, float)) and math.isfinite(budget_epsilon) and budget_epsilon > 0):
            raise ValueError(f"budget_epsilon must be a positive finite number, got {budget_epsilon!r}")
        if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
            raise ValueError(f"delta must lie strictly between 0 and 1, got {delta!r}")
        if ledger_path.resolve() == anchor.resolve():
            raise ValueError(f"anchor_path must differ from the ledger path, both are {ledger_path}")
        if not client_id:
            raise ValueError("client_id must be a non-empty string")
        if accountant not in _ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(_ACCOUNTANTS)}, got {accountant!r}")
        box = _Box(_read_key(Path(key_file)))
        for directory in (ledger_path.parent, anchor.parent):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(ledger_path):
            ledger = cls._open_locked(ledger_path, anchor, box, client_id, float(budget_epsilon), float(delta), accountant)
        ledger._check_terms(budget_epsilon=float(budget_epsilon), delta=float(delta), accountant=accountant)
        return ledger

    @classmethod
    def open_existing(
        cls,
        path: str | os.PathLike[str],
        *,
        key_file: str | os.PathLike[str],
        anchor_path: str | os.PathLike[str],
        client_id: str,
    ) -> PrivacyLedger:
        """Opens and verifies an existing ledger under the budget, δ and accountant it was created with.

        For a node that must train under its own budget whatever a run asks for (a run without DP-SGD).

        Raises:
            LedgerError: No ledger at ``path``, or anything :meth:`open` refuses.
        """
        terms, _ = read_ledger(path, key_file=key_file)
        return cls.open(
            path,
            key_file=key_file,
            anchor_path=anchor_path,
            client_id=client_id,
            budget_epsilon=terms["budget_epsilon"],
            delta=terms["delta"],
            accountant=terms["accountant"],
        )

    @classmethod
    def _open_locked(
        cls,
        path: Path,
        anchor_path: Path,
        box: _Box,
        client_id: str,
        budget_epsilon: float,
        delta: float,
        accountant: str,
    ) -> PrivacyLedger:
        for target in (path, anchor_path):
            # Leftovers of writes killed before their rename; never read, removed under the lock.
            for stray in target.parent.glob(f".{target.name}.*.tmp"):
                stray.unlink(missing_ok=True)
        ledger_blob, anchor_blob = _read_or_none(path), _read_or_none(anchor_path)
        if ledger_blob is None and anchor_blob is None:
            document = {
                "format": _FORMAT,
                "kind": "ledger",
                "client_id": client_id,
                "ledger_id": uuid.uuid4().hex,
                "seq": 1,
                "created_at": _now(),
                "budget_epsilon": budget_epsilon,
                "delta": delta,
                "accountant": accountant,
                "rounds": [],
            }
            ledger = cls(path=path, anchor_path=anchor_path, box=box, document=document, digest="")
            ledger._write(document)
            return ledger
        if ledger_blob is None:
            raise LedgerError(f"privacy ledger {path} is missing but its anchor {anchor_path} exists: deleted ledger")
        if anchor_blob is None:
            raise LedgerError(f"anchor {anchor_path} of privacy ledger {path} is missing: deleted anchor")
        document = box.open(ledger_blob, purpose="ledger", where=path)
        anchor = box.open(anchor_blob, purpose="anchor", where=anchor_path)
        for name, doc, where in (("ledger", document, path), ("anchor", anchor, anchor_path)):
            if doc.get("client_id") != client_id:
                raise LedgerError(f"{name} {where} belongs to client {doc.get('client_id')!r}, not {client_id!r}")
        if anchor.get("ledger_id") != document.get("ledger_id"):
            raise LedgerError(f"anchor {anchor_path} belongs to another ledger than {path}: replaced ledger or anchor")
        digest = hashlib.sha256(ledger_blob).hexdigest()
        ledger_seq, anchor_seq = document["seq"], anchor["seq"]
        ledger = cls(path=path, anchor_path=anchor_path, box=box, document=document, digest=digest)
        if ledger_seq == anchor_seq:
            if anchor.get("ledger_sha256") != digest:
                raise LedgerError(f"privacy ledger {path} differs from the one its anchor records: replaced ledger")
        elif ledger_seq == anchor_seq + 1:
            # The process died between the ledger write and the anchor write: the ledger is authentic and
            # records more spend, never less, so completing the anchor write is safe.
            ledger._write_anchor()
        elif ledger_seq < anchor_seq:
            raise LedgerError(
                f"privacy ledger {path} is at sequence {ledger_seq} but its anchor records {anchor_seq}: "
                "rolled-back ledger (an older copy was restored)"
            )
        else:
            raise LedgerError(
                f"anchor {anchor_path} is at sequence {anchor_seq} but the ledger is at {ledger_seq}: "
                "rolled-back anchor"
            )
        return ledger

    def _check_terms(self, *, budget_epsilon: float, delta: float, accountant: str) -> None:
        for name, wanted in (("budget_epsilon", budget_epsilon), ("delta", delta), ("accountant", accountant)):
            recorded = self._document[name]
            if recorded != wanted:
                raise LedgerError(
                    f"privacy ledger {self._path} was created with {name}={recorded!r}, the configuration "
                    f"asks for {wanted!r}; a budget is fixed for the life of the federation"
                )

    def _write(self, document: dict) -> None:
        blob = self._box.seal(document, purpose="ledger")
        atomic_write(self._path, blob)
        self._document = document
        self._digest = hashlib.sha256(blob).hexdigest()
        self._rounds = _rounds_of(document, self._path)
        self._write_anchor()

    def _write_anchor(self) -> None:
        anchor = {
            "format": _FORMAT,
            "kind": "anchor",
            "client_id": self.client_id,
            "ledger_id": self.ledger_id,
            "seq": self.seq,
            "ledger_sha256": self._digest,
        }
        atomic_write(self._anchor_path, self._box.seal(anchor, purpose="anchor"))

    def charge(
        self,
        *,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        epsilon_after: float,
    ) -> LedgerRound:
        """Durably records a round's spend; call before the round trains.

        The write is fsynced and atomically renamed before this returns, so once it returns no crash can
        lose the charge.

        Args:
            server_round: The server's round number (a retried round is charged again).
            noise_multiplier: σ of the round's DP-SGD steps.
            sample_rate: Poisson sampling rate q of each step.
            steps: Number of steps the round may take.
            epsilon_after: ε of the whole history including this round (computed by the caller with
                the ledger's accountant and δ).

        Returns:
            The recorded round.

        Raises:
            BudgetExhausted: ``epsilon_after`` exceeds the budget; nothing is written.
            LedgerError: The ledger changed on disk since it was read (another process), or
                ``epsilon_after`` is below the ε already spent.
        """
        if epsilon_after > self.budget_epsilon:
            raise BudgetExhausted(
                server_round=server_round,
                epsilon_spent=self.spent_epsilon,
                epsilon_projected=epsilon_after,
                epsilon_budget=self.budget_epsilon,
                delta=self.delta,
            )
        if not epsilon_after >= self.spent_epsilon:
            raise LedgerError(f"epsilon_after={epsilon_after!r} is below the epsilon already spent, {self.spent_epsilon!r}")
        entry = LedgerRound(
            server_round=int(server_round),
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            steps=int(steps),
            epsilon_after=float(epsilon_after),
            charged_at=_now(),
        )
        with _locked(self._path):
            on_disk = _read_or_none(self._path)
            if on_disk is None or hashlib.sha256(on_disk).hexdigest() != self._digest:
                raise LedgerError(
                    f"privacy ledger {self._path} changed on disk since it was opened (another process, "
                    "a deletion or a restore); reopen it"
                )
            document = dict(self._document)
            document["rounds"] = [*self._document["rounds"], dataclasses.asdict(entry)]
            document["seq"] = self.seq + 1
            self._write(document)
        return entry

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def client_id(self) -> str:
        """The client the ledger belongs to."""
        return self._document["client_id"]

    @property
    def ledger_id(self) -> str:
        """Random id fixed at creation; the server flags a node whose ledger id changes (a reset ledger)."""
        return self._document["ledger_id"]

    @property
    def seq(self) -> int:
        """Write sequence number; the server flags a node whose sequence number goes down (a rollback)."""
        return self._document["seq"]

    @property
    def budget_epsilon(self) -> float:
        """ε budget for the whole federation."""
        return self._document["budget_epsilon"]

    @property
    def delta(self) -> float:
        """δ of the budget."""
        return self._document["delta"]

    @property
    def accountant(self) -> str:
        """Accountant the ε figures were computed with."""
        return self._document["accountant"]

    @property
    def rounds(self) -> tuple[LedgerRound, ...]:
        """Every charged round, oldest first."""
        return self._rounds

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history ``(σ, q, steps)`` of every charged round, oldest first."""
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self._rounds]

    @property
    def spent_epsilon(self) -> float:
        """ε charged so far (0.0 before the first round)."""
        return self._rounds[-1].epsilon_after if self._rounds else 0.0


def read_ledger(path: str | os.PathLike[str], *, key_file: str | os.PathLike[str]) -> tuple[dict, tuple[LedgerRound, ...]]:
    """Reads a ledger without opening it for charging (no anchor check, nothing written), for a status line such as
    the one `fer-client` prints when it stops. Returns its terms (client_id, budget_epsilon, delta, accountant) and
    its rounds.

    Raises:
        LedgerError: the file or key cannot be read, or the ledger does not authenticate under the key.
    """
    path = Path(path)
    if not path.exists():
        raise LedgerError(f"privacy ledger {path} does not exist")
    box = _Box(_read_key(Path(key_file)))
    with _locked(path):
        blob = _read_or_none(path)
    if blob is None:
        raise LedgerError(f"privacy ledger {path} does not exist")
    document = box.open(blob, purpose="ledger", where=path)
    terms = {name: document.get(name) for name in ("client_id", "budget_epsilon", "delta", "accountant")}
    return terms, _rounds_of(document, path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
