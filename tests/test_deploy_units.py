"""Deployment pieces that need no running federation: certificates, node keys, command lines, CLI errors."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from client.deploy import SuperNodeSettings, generate_node_keys
from server.certs import certificate_hosts, make_certificates
from server.deploy import SuperLinkSettings, TlsFiles

BIN = Path(sys.executable).parent


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_server_certificate_chains_to_the_ca_and_names_every_host(tmp_path):
    """The server certificate is signed by the CA, carries every host as a SAN, and the keys are owner-only."""
    # Execute
    files = make_certificates(out_dir=tmp_path, hosts=["fer.example.org", "10.0.0.7", "127.0.0.1"])

    # Assert
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert sorted(certificate_hosts(files.server_cert)) == sorted(["fer.example.org", "10.0.0.7", "127.0.0.1"])
    for key in (files.ca_key, files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_certificates_are_never_silently_replaced(tmp_path):
    """A second `certs` into the same folder is refused: sites' copies of the old CA would stop verifying."""
    # Prepare
    first = make_certificates(out_dir=tmp_path, hosts=["localhost"])
    before = first.ca_cert.read_bytes()

    # Execute / Assert
    with pytest.raises(ValueError, match="already exists"):
        make_certificates(out_dir=tmp_path, hosts=["localhost"])
    assert first.ca_cert.read_bytes() == before


def test_node_keys_are_p384_openssh_as_flower_reads_them(tmp_path):
    """keygen writes an OpenSSH EC P-384 pair (what flower-supernode and `flwr supernode register` load)."""
    # Execute
    keys = generate_node_keys(out_dir=tmp_path, name="site-a")

    # Assert
    private = load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="already exists"):
        generate_node_keys(out_dir=tmp_path, name="site-a")


def test_superlink_command_is_secure_by_default(tmp_path):
    """TLS files, node authentication, SQLite state and no runtime installs unless insecure is asked for."""
    # Prepare
    make_certificates(out_dir=tmp_path / "certs", hosts=["127.0.0.1"])
    tls = TlsFiles.from_dir(tmp_path / "certs")

    # Execute
    secure = SuperLinkSettings(state_dir=tmp_path / "srv", tls=tls).command()
    insecure = SuperLinkSettings(state_dir=tmp_path / "srv", insecure=True).command()

    # Assert
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert secure[secure.index("--ssl-ca-certfile") + 1] == str(tls.ca_cert)
    assert secure[secure.index("--database") + 1] == str((tmp_path / "srv" / "superlink.db").resolve())
    assert "--disable-runtime-dependency-installation" in secure and "--disable-runtime-dependency-installation" in insecure
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_supernode_command_carries_node_config_and_credentials(tmp_path):
    """The SuperNode gets the CA, the node key and the node config; no CA or key without insecure is an error."""
    # Prepare
    settings = SuperNodeSettings(superlink="h:1", node_config={"dataset": "folder=/data/a b", "profile": "iot"},
                                 state_dir=tmp_path, ca_cert=Path("/c/ca.crt"), private_key=Path("/k/n.key"))

    # Execute
    command = settings.command()

    # Assert
    assert command[command.index("--node-config") + 1] == 'dataset="folder=/data/a b" profile="iot"'
    assert command[command.index("--root-certificates") + 1] == "/c/ca.crt"
    assert command[command.index("--auth-supernode-private-key") + 1] == "/k/n.key"
    with pytest.raises(ValueError, match="CA certificate"):
        SuperNodeSettings(superlink="h:1", node_config={}, state_dir=tmp_path).command()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fer-client", "start", "--server", "127.0.0.1:1", "--dataset", "folder=missing", "--ca-cert", "ca.crt",
          "--key", "n.key"), "--ca-cert file ca.crt does not exist"),
        (("fer-server", "--certs", "nocerts", "--out", "run"), "not found; create certificates"),
        (("fer-server", "resume", "."), "is not a run directory"),
        (("fer-server", "nodes", "--state-dir", "nostate"), "holds no fer-server state"),
        (("fer-server", "certs", "--days", "0"), "days must be positive"),
        (("fer-client", "start", "--server", "127.0.0.1:1", "--dataset", "synthetic=10", "--insecure",
          "--dp-epsilon", "0"), "--dp-epsilon must be positive"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_1(tmp_path, args, message):
    """Bad input is one stderr line naming the problem, exit code 1, no traceback."""
    # Execute
    done = _cli(*args, cwd=tmp_path)

    # Assert
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_client_refuses_unreadable_data_before_joining(tmp_path):
    """The pre-join check opens the data as the ClientApp would; a missing folder stops fer-client at once."""
    # Prepare
    keys = generate_node_keys(out_dir=tmp_path, name="n")
    (tmp_path / "ca.crt").write_text("unused")

    # Execute
    done = _cli("fer-client", "start", "--server", "127.0.0.1:1", "--dataset", "folder=no-such-dir",
                "--ca-cert", "ca.crt", "--key", str(keys.private_key), cwd=tmp_path)

    # Assert
    assert done.returncode == 1
    assert "no-such-dir" in done.stderr and "joining" not in done.stdout


@pytest.mark.slow
def test_insecure_is_loud(tmp_path):
    """--insecure prints a warning on stderr before anything else happens."""
    # Execute
    done = _cli("fer-client", "start", "--server", "127.0.0.1:1", "--dataset", "folder=no-such-dir", "--insecure",
                cwd=tmp_path)

    # Assert
    assert done.stderr.startswith("WARNING: --insecure")
    assert done.returncode == 1


@pytest.mark.slow
def test_resume_refuses_a_finished_run(tmp_path):
    """A run whose last checkpoint is its last round has nothing to resume."""
    # Prepare
    from server.rundir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.write_config({"num-server-rounds": 1, "out-dir": str(tmp_path / "run")})
    run.save_model({}, model_name="cnn_am", model_cfg={}, round=1, checkpoint=True)

    # Execute
    done = _cli("fer-server", "resume", "run", cwd=tmp_path)

    # Assert
    assert done.returncode == 1
    assert "already completed all 1 rounds" in done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num-server-rounds"] == 1


def test_superlink_entry_point_raises_flowers_sqlite_lock_wait(monkeypatch):
    """Our SuperLink entry point makes Flower's own pragma hook set busy_timeout to 120 s on a real connection."""
    import sqlite3

    import flwr.supercore.sql_mixin as sql_mixin

    from server import superlink_main

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # restored after the test
    superlink_main.raise_busy_timeout()
    connection = sqlite3.connect(":memory:")

    sql_mixin._set_sqlite_pragmas(connection, None)

    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == 120_000
    assert SuperLinkSettings(state_dir=Path("/s"), insecure=True).command()[1:3] == ["-m", "server.superlink_main"]
