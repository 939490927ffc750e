"""The site's pin on its coordinator: the trusted-entities file, and the FAB signature check a SuperNode makes.

`fer-server certs` writes `trusted-entities.yaml` (a YAML map of key id -> OpenSSH Ed25519 public key, the format of
Flower's `flower-supernode --trusted-entities`) next to `ca.crt`; a site pins it, and its SuperNode then runs only
app bundles (FABs) that key signed. How the coordinator signs is in server/fab_signing.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from privacy.secagg_identity import read_public_key_map

TRUSTED_ENTITIES = "trusted-entities.yaml"


def load_trusted_entities(path: Path) -> dict[str, str]:
    """A trusted-entities YAML file as {key id: OpenSSH Ed25519 public key}; ValueError (one line) otherwise."""
    entries = read_public_key_map(
        path, what="the trusted entities", expected="a map of key id -> 'ssh-ed25519 ...' public key"
    )
    for name, _, key in entries:
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"{path}: entry {name!r} is not an Ed25519 key")
    return {name: value for name, value, _ in entries}


def verify_fab(content: bytes, verifications: dict[str, str], trusted_entities: dict[str, str]) -> bool:
    """Whether a trusted key signed `content`: exactly the check a Flower SuperNode makes (its `_verify_fab`), so
    the SuperLink refuses at submission what every site would refuse later. Malformed records verify as False."""
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    try:
        return bool(_verify_fab(Fab(hashlib.sha256(content).hexdigest(), content, dict(verifications)),
                                trusted_entities))
    except (ValueError, TypeError, KeyError, AssertionError):
        return False
