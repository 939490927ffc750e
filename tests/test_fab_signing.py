"""Sites run only app bundles (FABs) their coordinator signed (server/fab_signing.py, client/trusted_entities.py).

The signature check is Flower's own (`flower-supernode --trusted-entities`), fed by fer-server's signing and the
SuperLink's pass-through. The real-process test plays a SuperLink that no longer protects the sites (compromised,
or told to trust an attacker's key too): it accepts FABs the attacker signed, and the site's own check must still
refuse them while running the coordinator's.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from client.deploy import flower_env, free_port, generate_node_keys, stop_tree
from client.trusted_entities import load_trusted_entities, verify_fab
from server.certs import make_certificates
from server.control_guard import TOKEN_FILE
from server.deploy import SuperLink, SuperLinkSettings, TlsFiles
from server.fab_signing import key_id, load_signing_key, make_signing_key, sign_fab
from tests.control_client import control_client

PROBE = Path(__file__).parent / "apps" / "probe"
BIN = Path(sys.executable).parent


def _probe_fab(label: str) -> bytes:
    """The probe app as a FAB whose config label (and so whose hash) is `label`."""
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.utils import collect_files

    files: dict[str, bytes | Path] = dict(collect_files(PROBE))
    files.pop("__pycache__", None)
    pyproject = (PROBE / "pyproject.toml").read_text().replace('label = "probe"', f'label = "{label}"')
    files["pyproject.toml"] = pyproject.encode()
    return build_fab_from_files(files)[0]


def _keys(tmp_path: Path):
    """The coordinator's signing files (from `make_certificates`) and an attacker's key."""
    make_certificates(out_dir=tmp_path / "certs", hosts=["127.0.0.1"])
    coordinator = load_signing_key(tmp_path / "certs" / "fab-signing.key")
    attacker = load_signing_key(make_signing_key(out_dir=tmp_path / "attacker").private_key)
    return coordinator, attacker


def test_signature_verifies_exactly_the_signed_bytes_with_the_pinned_key(tmp_path):
    """Flower's SuperNode check accepts the coordinator's signature on its FAB and nothing else."""
    # Prepare
    coordinator, attacker = _keys(tmp_path)
    pinned = load_trusted_entities(tmp_path / "certs" / "trusted-entities.yaml")
    fab = _probe_fab("probe")
    forged = sign_fab(fab, attacker)
    forged_as_coordinator = {key_id(coordinator.public_key()): next(iter(forged.values()))}

    # Execute
    verdicts = {
        "signed": verify_fab(fab, sign_fab(fab, coordinator), pinned),
        "other-bytes": verify_fab(fab + b"\0", sign_fab(fab, coordinator), pinned),
        "unsigned": verify_fab(fab, {}, pinned),
        "foreign": verify_fab(fab, forged, pinned),
        "foreign-under-our-id": verify_fab(fab, forged_as_coordinator, pinned),
        "garbage": verify_fab(fab, {key_id(coordinator.public_key()): "not json"}, pinned),
    }

    # Assert
    assert verdicts == {"signed": True, "other-bytes": False, "unsigned": False, "foreign": False,
                        "foreign-under-our-id": False, "garbage": False}


def test_certs_hand_out_an_ed25519_pin_and_keep_the_key_private(tmp_path):
    """`make_certificates` writes the signing key 0600 and a trusted-entities file naming its public half."""
    # Execute
    files = make_certificates(out_dir=tmp_path, hosts=["127.0.0.1"])

    # Assert
    key = load_signing_key(files.signing_key)
    assert files.signing_key.stat().st_mode & 0o777 == 0o600
    assert list(load_trusted_entities(files.trusted_entities)) == [key_id(key.public_key())]
    assert TlsFiles.from_dir(tmp_path).trusted_entities == files.trusted_entities.resolve()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup", "message"),
    [("missing", "no trusted-entities.yaml next to --ca-cert"), ("not-a-key", "is not an OpenSSH public key")],
)
def test_fer_client_will_not_join_without_a_pinned_coordinator_key(tmp_path, setup, message):
    """`fer-client start` stops with one line when the trusted-entities file is missing or holds no key."""
    # Prepare
    make_certificates(out_dir=tmp_path / "certs", hosts=["127.0.0.1"])
    keys = generate_node_keys(out_dir=tmp_path, name="n")
    pin = tmp_path / "certs" / "trusted-entities.yaml"
    if setup == "missing":
        pin.unlink()
    else:
        pin.write_text(yaml.safe_dump({"fer-coordinator-x": "ssh-ed25519 nonsense"}))

    # Execute
    done = subprocess.run(
        [str(BIN / "fer-client"), "start", "--server", "127.0.0.1:1", "--dataset", "synthetic=20",
         "--ca-cert", "certs/ca.crt", "--key", str(keys.private_key), "--state-dir", "node"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=flower_env(), stdin=subprocess.DEVNULL,
    )

    # Assert
    assert done.returncode == 1
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _wait_until_online(client, *, timeout: float) -> None:
    from flwr.proto.control_pb2 import ListNodesRequest

    deadline = time.monotonic() + timeout
    while not any(node.status == "online" for node in client.ListNodes(ListNodesRequest()).nodes_info):
        if time.monotonic() > deadline:
            raise AssertionError(f"the site did not come online within {timeout} s")
        time.sleep(0.5)


def _wait_until_finished(client, run_ids: list[int], *, timeout: float) -> dict[int, str]:
    from flwr.proto.control_pb2 import ListRunsRequest

    deadline = time.monotonic() + timeout
    while True:
        runs = client.ListRuns(ListRunsRequest()).run_dict
        statuses = {run_id: runs[run_id].status.status for run_id in run_ids}
        if all(status == "finished" for status in statuses.values()) or time.monotonic() > deadline:
            return statuses
        time.sleep(1.0)


@pytest.mark.slow
def test_a_site_refuses_fabs_its_coordinator_did_not_sign(tmp_path):
    """A real fer-client runs the coordinator's signed FAB and refuses one an attacker signed (under the
    attacker's key id and under the coordinator's), although the SuperLink, made to trust the attacker's key too,
    accepted both."""
    # Prepare
    from flwr.proto.control_pb2 import RegisterNodeRequest, StartRunRequest
    from flwr.proto.fab_pb2 import Fab
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    coordinator, attacker = _keys(tmp_path)
    certs = tmp_path / "certs"
    hostile_trust = tmp_path / "superlink-trusts.yaml"
    hostile_trust.write_text(yaml.safe_dump({**load_trusted_entities(certs / "trusted-entities.yaml"),
                                             **load_trusted_entities(tmp_path / "attacker" / "trusted-entities.yaml")}))
    tls = TlsFiles.from_dir(certs)
    tls = TlsFiles(tls.ca_cert, tls.server_cert, tls.server_key, tls.signing_key, hostile_trust)
    port = free_port()
    node_keys = generate_node_keys(out_dir=tmp_path, name="site")
    fabs = {label: _probe_fab(label) for label in ("coordinator", "foreign")}
    forged = sign_fab(fabs["foreign"], attacker)
    records = {
        "coordinator": sign_fab(fabs["coordinator"], coordinator),
        "foreign": {**forged, key_id(coordinator.public_key()): next(iter(forged.values()))},
    }
    link = SuperLink.start(SuperLinkSettings(state_dir=tmp_path / "srv", host="127.0.0.1", port=port, tls=tls))

    # Control calls go from this process with fer-server's token (each `flwr` call would be a process start).
    client = control_client(f"127.0.0.1:{port}", ca_cert=certs / "ca.crt",
                            token=(tmp_path / "srv" / TOKEN_FILE).read_text())
    site = None
    try:
        client.RegisterNode(RegisterNodeRequest(
            public_key=public_key_to_bytes(load_ssh_public_key(node_keys.public_key.read_bytes()))))
        with open(tmp_path / "site.log", "wb") as log:
            site = subprocess.Popen(
                [str(BIN / "fer-client"), "start", "--server", f"127.0.0.1:{port}", "--dataset", "synthetic=20",
                 "--ca-cert", str(certs / "ca.crt"), "--key", str(node_keys.private_key), "--state-dir", "node",
                 "--new-privacy-ledger"],
                cwd=tmp_path, env=flower_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        _wait_until_online(client, timeout=120)

        # Execute
        run_ids = {
            label: client.StartRun(StartRunRequest(fab=Fab(
                hash_str=hashlib.sha256(fab).hexdigest(), content=fab, verifications=records[label]))).run_id
            for label, fab in fabs.items()
        }
        statuses = _wait_until_finished(client, list(run_ids.values()), timeout=240)
    finally:
        client.close()
        if site is not None:
            stop_tree(site, timeout=3)
        link.stop()

    # Assert
    site_log = (tmp_path / "site.log").read_text(errors="replace")
    assert set(statuses.values()) == {"finished"}, site_log[-3000:]
    ran = sorted(path.name for path in (tmp_path / "node").glob("ran-*"))
    assert ran == [f"ran-{run_ids['coordinator']}-coordinator"], site_log[-3000:]
    assert site_log.count("FAB verification failed") == 1
