"""TLS material for a deployment: a private certificate authority and a server certificate it signs, plus the
coordinator's FAB signing key.

The SuperLink presents the server certificate; every SuperNode (and the `flwr` CLI `fer-server` drives) verifies it
against the CA certificate. Keys are EC P-384 (what Flower's own node-authentication keys use too), and private
keys are written with mode 0600 before any byte lands in them. The FAB signing key is Ed25519 (the only kind
Flower's SuperNode verifies FABs with; see server/fab_signing.py). The coordinator hands every site exactly two
files: ca.crt and trusted-entities.yaml.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.atomic import atomic_write

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


@dataclass(frozen=True)
class CertificateFiles:
    """Where `make_certificates` wrote its files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    signing_key: Path
    trusted_entities: Path


def make_certificates(
    *, out_dir: Path, hosts: list[str], days: int = 365, organisation: str = "fer-fl", overwrite: bool = False
) -> CertificateFiles:
    """Creates a CA and a server certificate valid for `hosts` (DNS names and/or IP addresses), and the FAB
    signing key with its trusted-entities.yaml, in `out_dir`.

    Args:
        out_dir: folder for ca.crt, ca.key, server.pem, server.key, fab-signing.key, trusted-entities.yaml
            (created if missing).
        hosts: every name or address SuperNodes will dial; each becomes a subjectAltName (IP or DNS entry),
            because TLS clients check SANs, not the common name.
        days: validity of both certificates.
        organisation: the subject's O= field.
        overwrite: replace existing files; by default an existing CA or signing key is never silently replaced,
            since every site's copy of the old ca.crt (trusted-entities.yaml) would stop verifying the server (its
            FABs).

    Raises:
        ValueError: no hosts, a non-positive `days`, or files already there without `overwrite`.
    """
    if not hosts:
        raise ValueError("give at least one host name or IP address for the server certificate")
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    from server.fab_signing import SigningFiles, make_signing_key

    out_dir = Path(out_dir)
    signing = SigningFiles.in_dir(out_dir)
    files = CertificateFiles(
        ca_cert=out_dir / CA_CERT, ca_key=out_dir / CA_KEY, server_cert=out_dir / SERVER_CERT,
        server_key=out_dir / SERVER_KEY, signing_key=signing.private_key, trusted_entities=signing.trusted_entities,
    )
    existing = [p for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key, files.signing_key,
                            files.trusted_entities) if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} already exists; use --overwrite to replace the certificates")
    out_dir.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew between machines
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} federation CA"),
    ])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    sans = [_san(host) for host in dict.fromkeys(hosts)]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
        ]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    write_private(files.ca_key, _pem_key(ca_key))
    write_private(files.server_key, _pem_key(server_key))
    write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_public(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    make_signing_key(out_dir=out_dir)
    return files


def certificate_hosts(path: Path) -> list[str]:
    """The subjectAltName entries of a PEM certificate, as strings (what a client may dial)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in sans.get_values_for_type(x509.DNSName)] + [
        str(v) for v in sans.get_values_for_type(x509.IPAddress)
    ]


def write_private(path: Path, data: bytes) -> None:
    """Writes a secret file readable by its owner only, atomically (never world-readable, not even briefly)."""
    atomic_write(path, data, mode=0o600)


def write_public(path: Path, data: bytes) -> None:
    """Writes a non-secret file atomically."""
    atomic_write(path, data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
