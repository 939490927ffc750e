"""The privacy ledger's files on disk: the operator's key file, the sealed JSON document, the lock.

Each file (ledger or anchor, `privacy.ledger`) is one JSON document sealed with AES-256-GCM under a key derived from
the operator's key file; the header (format, key id, nonce) is authenticated data, and the plaintext is padded so
that the size shows roughly how many rounds were charged and nothing else. What the files protect against and how
the ledger uses them is in `privacy.ledger`'s threat table.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_FORMAT = 1
_MAGIC = {"ledger": b"FERFLLDG", "anchor": b"FERFLANC"}
_VERSION = b"\x01"
_KEY_ID_LEN = 8
_NONCE_LEN = 12
_HEADER_LEN = len(b"FERFLLDG") + len(_VERSION) + _KEY_ID_LEN + _NONCE_LEN
_PAD_TO = 512


class LedgerError(RuntimeError):
    """The ledger or its anchor is missing, tampered with, rolled back, unreadable, or of another key.

    The client must not train when this is raised: failing closed is the point.
    """


def generate_key_file(path: str | os.PathLike[str]) -> Path:
    """Writes a new random 256-bit ledger key, readable by its owner only (mode 0600).

    Refuses to overwrite: replacing a key orphans every ledger written with the old one.

    Args:
        path: Where to write the key (URL-safe base64 of 32 random bytes, the format of a Fernet key).

    Returns:
        The path written.

    Raises:
        LedgerError: ``path`` already exists.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise LedgerError(f"key file {target} already exists; refusing to overwrite it") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(base64.urlsafe_b64encode(os.urandom(32)) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(target, 0o600)
    return target


def _read_key(key_file: Path) -> bytes:
    try:
        mode = key_file.stat().st_mode
        raw = key_file.read_bytes()
    except FileNotFoundError as exc:
        raise LedgerError(f"ledger key file {key_file} not found") from exc
    except OSError as exc:
        raise LedgerError(f"ledger key file {key_file} cannot be read: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LedgerError(
            f"ledger key file {key_file} is accessible to group or others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {key_file}"
        )
    try:
        key = base64.urlsafe_b64decode(raw.strip())
    except ValueError as exc:
        raise LedgerError(f"ledger key file {key_file} is not base64") from exc
    if len(key) != 32:
        raise LedgerError(f"ledger key file {key_file} must hold 32 bytes of base64, holds {len(key)}")
    return key


def _derive(key: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fer-fl ledger " + purpose).derive(key)


class _Box:
    """AES-256-GCM sealing of one JSON document, with the purpose bound into the header."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(_derive(key, b"aes-256-gcm"))
        self.key_id = _derive(key, b"key id")[:_KEY_ID_LEN]

    def seal(self, document: dict, *, purpose: str) -> bytes:
        plain = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        plain += b" " * (-len(plain) % _PAD_TO)
        header = _MAGIC[purpose] + _VERSION + self.key_id + os.urandom(_NONCE_LEN)
        return header + self._aead.encrypt(header[-_NONCE_LEN:], plain, header)

    def open(self, blob: bytes, *, purpose: str, where: Path) -> dict:
        magic = _MAGIC[purpose]
        if len(blob) < _HEADER_LEN + 16 or blob[: len(magic)] != magic or blob[len(magic) : len(magic) + 1] != _VERSION:
            raise LedgerError(f"{where} is not a fer-fl privacy {purpose} (bad header): tampered or replaced")
        key_id = blob[len(magic) + 1 : len(magic) + 1 + _KEY_ID_LEN]
        if key_id != self.key_id:
            raise LedgerError(
                f"{where} was written with a different key (key id {key_id.hex()}, the key file gives "
                f"{self.key_id.hex()}): wrong key file, or the header was tampered with"
            )
        header = blob[:_HEADER_LEN]
        try:
            plain = self._aead.decrypt(header[-_NONCE_LEN:], blob[_HEADER_LEN:], header)
        except InvalidTag as exc:
            raise LedgerError(f"{where} failed authentication: the {purpose} was tampered with or corrupted") from exc
        try:
            document = json.loads(plain)
        except ValueError as exc:  # only reachable with a forged key; still fail closed
            raise LedgerError(f"{where} decrypted to malformed content") from exc
        if not isinstance(document, dict) or document.get("format") != _FORMAT or document.get("kind") != purpose:
            raise LedgerError(f"{where} holds an unknown {purpose} format")
        return document


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(f"{path} cannot be read: {exc.strerror}") from exc


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # A sidecar lock so a restarted client and a still-running old one never interleave writes.
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
