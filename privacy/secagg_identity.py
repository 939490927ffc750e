"""Binding each node's SecAgg+ public keys to its enrolled identity, so a coordinator cannot substitute its own.

In Flower 1.41's SecAgg+ the server relays every node's two fresh public keys (pk1 for pairwise masks, pk2 for
encrypting key shares) to its neighbours, and nothing ties them to the node that is supposed to own them: a
malicious server can hand a node its own pk2 in place of a neighbour's, decrypt the Shamir shares that node sends
"to the neighbour", and rebuild that node's masks. Flower's node authentication does not help here: the SuperNode
keeps the node's private key and the ClientApp never sees it (Context carries only node_id, node_config, run_config
and state).

So a node signs its SecAgg+ keys with its enrolled node key (the `fer-client keygen` key, whose path `fer-client
start` puts in the node config as `node-key`), and a node that has the coordinator's roster of enrolled public keys
(`secagg-roster.yaml`, handed out with `ca.crt` and pinned by the site like `trusted-entities.yaml`) refuses to share
its secrets with any neighbour whose keys are not signed by a distinct roster member. The statement signed names the
run, the round, the node ID and both keys, so a signature cannot be moved to another node, round or key pair.

What stays open is written down in docs/deployment.md ("SecAgg+ against a malicious coordinator"): the roster's
contents are the coordinator's word (a site must check the entries out of band), and the ClientApp code itself
comes from the coordinator.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from privacy.atomic import atomic_write

SECAGG_ROSTER = "secagg-roster.yaml"
# Config-record keys the hardened mod and workflow add to Flower's SecAgg+ messages.
ATTESTATION_KEY = "fer-fl:key-attestation"  # setup reply: this node's attestation
ATTESTATIONS_KEY = "fer-fl:key-attestations"  # share-keys message: the neighbours' attestations
_STATEMENT_PREFIX = b"fer-fl secagg+ keys v1"


class NeighbourKeysRefused(ValueError):
    """A neighbour's SecAgg+ public keys are not signed by a distinct member of the pinned roster."""


@dataclass(frozen=True)
class KeyAttestation:
    """A node's signature over its SecAgg+ public keys for one round.

    Attributes:
        node_id: The Flower node ID the keys belong to.
        identity: The signer's enrolled public key, one OpenSSH line without comment.
        signature: Signature by that key over `key_statement(...)`.
    """

    node_id: int
    identity: str
    signature: bytes

    def to_json(self) -> bytes:
        return json.dumps(
            {"node_id": self.node_id, "identity": self.identity,
             "signature": base64.b64encode(self.signature).decode()}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> KeyAttestation:
        """Parses a peer's attestation; ValueError for anything malformed (never unpickled)."""
        try:
            raw = json.loads(data.decode())
            attestation = cls(
                node_id=int(raw["node_id"]), identity=str(raw["identity"]),
                signature=base64.b64decode(raw["signature"], validate=True),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"malformed key attestation ({type(err).__name__})") from None
        if isinstance(raw["node_id"], bool) or not isinstance(raw["node_id"], int):
            raise ValueError("malformed key attestation (node_id)")
        return attestation


def key_statement(*, run_id: int, group_id: str, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    """What a node signs: the run, round (group ID), its node ID and both SecAgg+ public keys, unambiguously."""
    digest = hashlib.sha256(_STATEMENT_PREFIX)
    for part in (str(int(run_id)).encode(), str(group_id).encode(), str(int(node_id)).encode(), pk1, pk2):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def sign_keys(
    key_file: Path, *, run_id: int, group_id: str, node_id: int, pk1: bytes, pk2: bytes
) -> KeyAttestation:
    """Signs this node's SecAgg+ keys with its enrolled node key (OpenSSH EC P-384 or Ed25519 private key file).

    Raises:
        ValueError: the key file cannot be read or holds another kind of key.
    """
    private = _load_private(key_file)
    statement = key_statement(run_id=run_id, group_id=group_id, node_id=node_id, pk1=pk1, pk2=pk2)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        signature = private.sign(statement, ec.ECDSA(hashes.SHA384()))
    else:
        signature = private.sign(statement)
    return KeyAttestation(node_id=node_id, identity=_openssh_line(private.public_key()), signature=signature)


def identity_of(key_file: Path) -> str:
    """The OpenSSH public key line of a node's private key file: its entry in a roster."""
    return _openssh_line(_load_private(key_file).public_key())


def write_roster(path: Path, public_keys: Mapping[str, Path]) -> Path:
    """Writes the roster sites pin: a YAML map of site name -> the OpenSSH public key in that site's `.pub` file.

    Raises:
        ValueError: a file is not an OpenSSH public key, or two sites share a key (one line naming the file).
    """
    entries: dict[str, str] = {}
    for name, key_file in public_keys.items():
        try:
            key = serialization.load_ssh_public_key(Path(key_file).read_bytes().strip())
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(f"{key_file}: not an OpenSSH public key (a site's node.pub)") from None
        entries[str(name)] = _openssh_line(key)
    if len(set(entries.values())) != len(entries):
        raise ValueError("two sites have the same public key; each site needs its own `fer-client keygen` pair")
    target = Path(path)
    atomic_write(target, yaml.safe_dump(entries, sort_keys=True, width=1000))
    load_roster(target)  # what we write, we can read
    return target


def _load_private(key_file: Path):
    try:
        private = serialization.load_ssh_private_key(Path(key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"node-key {key_file}: cannot read the node's private key ({type(err).__name__})") from None
    if not isinstance(private, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError(f"node-key {key_file}: expected an EC or Ed25519 key, got {type(private).__name__}")
    return private


def read_public_key_map(path: Path, *, what: str, expected: str) -> list[tuple[str, str, PublicKeyTypes]]:
    """A YAML map of name -> OpenSSH public key, as (name, value as written, parsed key) in file order.

    The one reader of both such files: the SecAgg+ roster (below) and the site's trusted-entities.yaml
    (client/trusted_entities.py).

    Raises:
        ValueError: one line naming the file: unreadable, not a non-empty map (`expected` says what it should be),
            or an entry that is not an OpenSSH public key. `what` names the file's role in the message.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read {what} ({err})".replace("\n", " ")) from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected {expected}")
    entries = []
    for name, value in data.items():
        try:
            key = serialization.load_ssh_public_key(str(value).strip().encode())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(f"{path}: entry {name!r} is not an OpenSSH public key") from None
        entries.append((str(name), str(value), key))
    return entries


def load_roster(path: Path) -> dict[str, str]:
    """The pinned roster as {OpenSSH public key line: name}; ValueError with one line naming the file otherwise.

    The file is a YAML map of name -> enrolled public key (the contents of each site's `node.pub`), the same shape
    as `trusted-entities.yaml`.
    """
    roster: dict[str, str] = {}
    for name, _, key in read_public_key_map(
        path, what="the SecAgg+ roster", expected="a map of site name -> enrolled OpenSSH public key"
    ):
        line = _openssh_line(key)
        if line in roster:
            raise ValueError(f"{path}: entries {roster[line]!r} and {name!r} hold the same key")
        roster[line] = str(name)
    return roster


def verify_neighbour_keys(
    *,
    roster: Mapping[str, str],
    public_keys: Mapping[int, tuple[bytes, bytes]],
    attestations: Mapping[int, KeyAttestation],
    own_node_id: int,
    run_id: int,
    group_id: str,
) -> None:
    """Checks that every neighbour's keys are signed, for this run and round, by its own roster member.

    Raises:
        NeighbourKeysRefused: naming the first neighbour that fails and why.
    """
    seen: dict[str, int] = {}
    for node_id, (pk1, pk2) in sorted(public_keys.items()):
        if node_id == own_node_id:
            continue
        attestation = attestations.get(node_id)
        if attestation is None:
            raise NeighbourKeysRefused(f"neighbour {node_id} sent no signature over its SecAgg+ keys")
        if attestation.node_id != node_id:
            raise NeighbourKeysRefused(
                f"neighbour {node_id}'s keys carry a signature for node {attestation.node_id}"
            )
        name = roster.get(attestation.identity)
        if name is None:
            raise NeighbourKeysRefused(f"neighbour {node_id}'s keys are signed by a key not in the pinned roster")
        if attestation.identity in seen:
            raise NeighbourKeysRefused(
                f"neighbours {seen[attestation.identity]} and {node_id} are both signed by roster member {name!r}"
            )
        seen[attestation.identity] = node_id
        statement = key_statement(run_id=run_id, group_id=group_id, node_id=node_id, pk1=pk1, pk2=pk2)
        if not _verifies(attestation, statement):
            raise NeighbourKeysRefused(
                f"neighbour {node_id}'s SecAgg+ keys do not match the signature of roster member {name!r} "
                "(keys substituted?)"
            )


def _verifies(attestation: KeyAttestation, statement: bytes) -> bool:
    key = serialization.load_ssh_public_key(attestation.identity.encode())
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(attestation.signature, statement, ec.ECDSA(hashes.SHA384()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(attestation.signature, statement)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _openssh_line(key) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
