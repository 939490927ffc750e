"""Signing the app bundle (FAB) the coordinator submits, so that sites run only code their coordinator shipped.

A site runs whatever FAB a run names, next to its patients' faces. Flower 1.41's SuperNode can refuse FABs that no
trusted key signed (`flower-supernode --trusted-entities FILE`, a YAML map of key id -> OpenSSH Ed25519 public key),
but its open-source SuperLink never attaches a signature to a FAB uploaded with `flwr run` (only Flower Hub FABs
carry one; `control_handlers.start_run` stores an uploaded FAB with `verifications={}`), and the `flwr` CLI cannot
sign. So:

- `fer-server certs` creates the coordinator's Ed25519 signing key (`fab-signing.key`, mode 0600) and the public
  `trusted-entities.yaml` that every site gets with `ca.crt`;
- fer-server submits through `python -m server.flwr_cli` (Flower's own CLI), which signs the FAB it builds in the
  exact record format Flower's SuperNode verifies (`sign_fab`);
- the SuperLink (server/control_guard.py) refuses a run whose FAB that key did not sign and keeps the signature
  with the stored FAB, which is where a SuperNode reads it from;
- `fer-client start` passes `--trusted-entities`, so the site's SuperNode checks the signature itself (Flower's
  `_verify_fab`) and answers a run with an unsigned or foreign-signed FAB with an error, without running it.

The site's check does not depend on the SuperLink being honest: only the holder of `fab-signing.key` can make a
signature that verifies. What the signature does NOT cover: the run config a run carries (dp-epsilon, rounds, ...),
which travels beside the FAB and is protected only by who may use the Control API (server/control_guard.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

# The site's side (pinning and checking) lives with the client; both sides use the same file and check.
from client.trusted_entities import TRUSTED_ENTITIES

SIGNING_KEY = "fab-signing.key"
# The environment variable naming the signing key for `python -m server.flwr_cli run` (set by SuperLink.flwr).
SIGNING_KEY_ENV = "FER_FAB_SIGNING_KEY"
# Flower's SuperNode refuses a FAB whose record lacks a truthy "valid_license" entry before it looks at signatures
# (it marks FABs that came from Flower Hub); the SuperLink sets it on a FAB whose signature it checked.
VALID_LICENSE = "valid_license"
KEY_ID_PREFIX = "fer-coordinator-"


@dataclass(frozen=True)
class SigningFiles:
    """The coordinator's FAB signing key and the public trusted-entities file sites pin."""

    private_key: Path
    trusted_entities: Path

    @classmethod
    def in_dir(cls, certs_dir: Path) -> SigningFiles:
        """Where `fer-server certs` writes them in `certs_dir` (they may not exist yet)."""
        certs_dir = Path(certs_dir)
        return cls(certs_dir / SIGNING_KEY, certs_dir / TRUSTED_ENTITIES)


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """A stable id for a public key: the prefix plus 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:16]


def make_signing_key(*, out_dir: Path) -> SigningFiles:
    """Writes a new Ed25519 key as `fab-signing.key` (OpenSSH, mode 0600) and `trusted-entities.yaml`.

    Callers decide about overwriting (server.certs.make_certificates refuses to replace files without
    `overwrite`): a new key makes every site's pinned trusted-entities.yaml refuse the coordinator's FABs.
    """
    from server.certs import write_private, write_public

    files = SigningFiles.in_dir(out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    write_private(files.private_key, private)
    write_public(files.trusted_entities, trusted_entities_yaml(key.public_key()).encode())
    return files


def trusted_entities_yaml(public_key: ed25519.Ed25519PublicKey) -> str:
    """The `--trusted-entities` file for one key, as Flower's SuperNode reads it."""
    openssh = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return (
        "# fer-fl: the coordinator's FAB signing key. Sites run only app bundles it signed\n"
        "# (fer-client start --trusted-entities; flower-supernode --trusted-entities).\n"
        + yaml.safe_dump({key_id(public_key): openssh}, default_flow_style=False)
    )


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The coordinator's private signing key; ValueError (one line, naming the file) if it is not one."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable OpenSSH private key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: the FAB signing key must be Ed25519, got {type(key).__name__}")
    return key


def sign_fab(content: bytes, private_key: ed25519.Ed25519PrivateKey, *, signed_at: int | None = None) -> dict[str, str]:
    """The FAB verification record for `content`: {key id: JSON {"signature", "signed_at"}}.

    The signed message is Flower's (`create_message_to_sign`: 8-byte big-endian timestamp + SHA-256 of the FAB),
    the signature base64url without padding, so Flower's SuperNode verifies it unchanged.
    """
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    signed_at = int(time.time()) if signed_at is None else int(signed_at)
    message = create_message_to_sign(hashlib.sha256(content).digest(), signed_at)
    signature = base64.urlsafe_b64encode(private_key.sign(message)).rstrip(b"=").decode()
    return {key_id(private_key.public_key()): json.dumps({"signature": signature, "signed_at": signed_at})}


def signing_key_from_env() -> ed25519.Ed25519PrivateKey | None:
    """The key `SIGNING_KEY_ENV` names, or None when it is unset."""
    path = os.environ.get(SIGNING_KEY_ENV)
    return load_signing_key(Path(path)) if path else None
