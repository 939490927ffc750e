"""Only the coordinator's fer-server may drive its SuperLink (server/control_guard.py).

A real SuperLink (TLS, node authentication, the guard) on 127.0.0.1 runs the probe app (tests/apps/probe) for the
whole module; strangers then try the Control API (enrol a key, submit, stop, read logs, mint tokens), the Runtime
API (claim a ServerApp task) and a `flwr` CLI with a Flower home of their own. On Flower's unguarded SuperLink every
one of these is accepted. The guard's decision for peers that are not on this machine is tested on the middleware
itself, since every network test stays on loopback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from client.deploy import free_port, generate_node_keys
from server.certs import make_certificates
from server.control_guard import (
    NO_TOKEN,
    NOT_LOCAL,
    TOKEN_FILE,
    issue_control_token,
    make_authn_plugin,
    refusal,
)
from server.deploy import CONNECTION, SuperLink, SuperLinkSettings, TlsFiles, flower_env, flower_script
from server.fab_signing import load_signing_key, make_signing_key, sign_fab
from tests.control_client import control_client

PROBE = Path(__file__).parent / "apps" / "probe"


@dataclass
class Coordinator:
    """A running, guarded SuperLink with one run of the probe app in progress."""

    root: Path
    link: SuperLink
    address: str
    run_id: int

    @property
    def ca_cert(self) -> Path:
        return self.root / "certs" / "ca.crt"

    @property
    def token(self) -> str:
        return (self.link.state_dir / TOKEN_FILE).read_text()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """fer-server's SuperLink, as `fer-server start` runs it, with a probe run that waits for nodes."""
    root = tmp_path_factory.mktemp("coordinator")
    make_certificates(out_dir=root / "certs", hosts=["127.0.0.1"])
    port = free_port()
    settings = SuperLinkSettings(state_dir=root / "srv", host="127.0.0.1", port=port,
                                 tls=TlsFiles.from_dir(root / "certs"))
    link = SuperLink.start(settings)
    try:
        run_id = int(link.submit(app_dir=PROBE, run_config={"wait-for-nodes": 600}))
        yield Coordinator(root=root, link=link, address=f"127.0.0.1:{port}", run_id=run_id)
    finally:
        link.stop()


def _control(coordinator: Coordinator, *, token: str | None = None):
    """A Flower Control API client in this (another) process, trusting the coordinator's CA."""
    return control_client(coordinator.address, ca_cert=coordinator.ca_cert, token=token)


def _status(call) -> int:
    """The HTTP status a Flower client call ends with (200 when it returns)."""
    try:
        result = call()
        if hasattr(result, "__next__"):  # a streamed answer: read its first message
            next(result, None)
    except httpx.HTTPStatusError as err:
        return err.response.status_code
    return 200


def _registered(coordinator: Coordinator) -> list[int]:
    """Ids of the node keys the SuperLink would let in now (asked with the token, in this process)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    with _control(coordinator, token=coordinator.token) as client:
        nodes = client.ListNodes(ListNodesRequest()).nodes_info
    return [node.node_id for node in nodes if node.status != "unregistered"]


def _run_status(coordinator: Coordinator) -> str:
    """The probe run's Flower status (asked with the token, in this process)."""
    from flwr.proto.control_pb2 import ListRunsRequest

    with _control(coordinator, token=coordinator.token) as client:
        return client.ListRuns(ListRunsRequest(run_id=coordinator.run_id)).run_dict[coordinator.run_id].status.status


def _public_key_bytes() -> bytes:
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    return public_key_to_bytes(ec.generate_private_key(ec.SECP384R1()).public_key())


@functools.cache
def _probe_fab() -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(PROBE)


def _stranger_requests(run_id: int):
    """(name, call on a ControlHttpClient) for each thing a stranger would want to do."""
    from flwr.proto.control_pb2 import (
        GetAuthTokensRequest,
        ListNodesRequest,
        ListRunsRequest,
        RefreshAuthTokensRequest,
        RegisterNodeRequest,
        StartRunRequest,
        StopRunRequest,
        StreamLogsRequest,
        UnregisterNodeRequest,
    )
    from flwr.proto.fab_pb2 import Fab

    return {
        "register-node": lambda c: c.RegisterNode(RegisterNodeRequest(public_key=_public_key_bytes(), name="evil")),
        "unregister-node": lambda c: c.UnregisterNode(UnregisterNodeRequest(node_id=1)),
        "list-nodes": lambda c: c.ListNodes(ListNodesRequest()),
        "start-run": lambda c: c.StartRun(StartRunRequest(fab=Fab(hash_str=hashlib.sha256(_probe_fab()).hexdigest(),
                                                                  content=_probe_fab()))),
        "stop-run": lambda c: c.StopRun(StopRunRequest(run_id=run_id)),
        "stream-logs": lambda c: c.StreamLogs(StreamLogsRequest(run_id=run_id)),
        "list-runs": lambda c: c.ListRuns(ListRunsRequest()),
        "get-auth-tokens": lambda c: c.GetAuthTokens(GetAuthTokensRequest(device_code="x")),
        "refresh-auth-tokens": lambda c: c.RefreshAuthTokens(RefreshAuthTokensRequest(refresh_token="x")),
    }


STRANGER_REQUESTS = list(_stranger_requests(0))


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "a-guessed-token-of-the-right-length-0123456789"], ids=["no-token", "guess"])
@pytest.mark.parametrize("name", STRANGER_REQUESTS)
def test_control_requests_without_the_token_are_refused(coordinator, name, token):
    """Enrol, submit, stop, read logs, list, mint tokens: each refused (403) without fer-server's token."""
    # Prepare
    call = _stranger_requests(coordinator.run_id)[name]

    # Execute
    with _control(coordinator, token=token) as client:
        status = _status(lambda: call(client))

    # Assert
    assert status == 403


@pytest.mark.slow
def test_refused_requests_change_nothing(coordinator):
    """After every stranger request, no key was enrolled and fer-server's run is still running."""
    # Prepare
    with _control(coordinator) as client:
        for call in _stranger_requests(coordinator.run_id).values():
            _status(lambda call=call: call(client))

    # Assert
    assert _registered(coordinator) == []
    # Not stopped: a stopped run is "finished". On a loaded machine the SuperExec may not have claimed it yet.
    assert _run_status(coordinator) in ("pending", "starting", "running")


@pytest.mark.slow
def test_fer_servers_own_calls_work(coordinator, tmp_path):
    """fer-server enrols and revokes a node and reads its run through the `flwr` CLI (the submit of the fixture's
    run, signed, went the same way)."""
    # Prepare
    keys = generate_node_keys(out_dir=tmp_path, name="site")

    # Execute
    node_id = coordinator.link.enroll(keys.public_key, name="site")
    enrolled = _registered(coordinator)
    coordinator.link.revoke(node_id)
    run = coordinator.link.run_status(str(coordinator.run_id))

    # Assert
    assert enrolled == [int(node_id)]
    assert _registered(coordinator) == []
    assert run["run-id"] == str(coordinator.run_id) and run["status"] in ("starting", "running")


@pytest.mark.slow
def test_the_token_opens_the_control_api_to_a_flower_client(coordinator):
    """The same Flower client that was refused is served once it carries the token: the token is the key."""
    # Prepare
    from flwr.proto.control_pb2 import ListRunsRequest

    # Execute
    with _control(coordinator, token=coordinator.token) as client:
        runs = client.ListRuns(ListRunsRequest())

    # Assert
    assert [run.run_id for run in runs.run_dict.values()] == [coordinator.run_id]


@pytest.mark.slow
def test_a_flwr_cli_with_another_flower_home_is_refused(coordinator, tmp_path):
    """A stranger's own `flwr` (its own FLWR_HOME and a copy of the sites' ca.crt) cannot register a node key."""
    # Prepare
    from server.deploy import write_flower_config

    home = tmp_path / "stranger-flwr"
    write_flower_config(flwr_home=home, address=coordinator.address, ca_cert=coordinator.ca_cert, insecure=False)
    keys = generate_node_keys(out_dir=tmp_path, name="evil")

    # Execute
    done = subprocess.run(
        [flower_script("flwr"), "supernode", "register", str(keys.public_key), CONNECTION, "--format", "json"],
        capture_output=True, text=True, timeout=120, env=flower_env(flwr_home=home), stdin=subprocess.DEVNULL,
    )

    # Assert
    answer = json.loads(done.stdout[done.stdout.index("{"):])
    assert answer["success"] is False and "fer-fl" in answer["error-message"]
    assert _registered(coordinator) == []


@pytest.mark.slow
def test_runtime_task_claims_need_the_superexec_secret(coordinator):
    """A stranger on the Runtime API cannot claim a pending ServerApp task (SuperExec authentication is on)."""
    # Prepare
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        coordinator.address, insecure=False, root_certificates=coordinator.ca_cert.read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )

    # Execute
    with client:
        status = _status(lambda: client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-serverapp"])))

    # Assert
    assert status == 401


@pytest.mark.slow
@pytest.mark.parametrize("signer", ["unsigned", "foreign", "tampered"])
def test_start_run_refuses_fabs_the_coordinator_did_not_sign(coordinator, tmp_path, signer):
    """Even with the token, the SuperLink starts no run whose FAB the coordinator's key did not sign."""
    # Prepare
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.proto.fab_pb2 import Fab

    fab = _probe_fab()
    records = {
        "unsigned": {},
        "foreign": sign_fab(fab, load_signing_key(make_signing_key(out_dir=tmp_path).private_key)),
        "tampered": sign_fab(fab + b"\0", load_signing_key(coordinator.root / "certs" / "fab-signing.key")),
    }
    request = StartRunRequest(fab=Fab(hash_str=hashlib.sha256(fab).hexdigest(), content=fab,
                                      verifications=records[signer]))

    # Execute
    with _control(coordinator, token=coordinator.token) as client:
        status = _status(lambda: client.StartRun(request))

    # Assert
    assert status == 403


@pytest.mark.parametrize(
    ("path", "peer", "server", "with_token", "expected"),
    [
        ("/v1/control/start-run", "10.1.2.3", "10.0.0.5", True, NOT_LOCAL),
        ("/v1/runtime/acquire-task", "10.1.2.3", "10.0.0.5", False, NOT_LOCAL),
        ("/docs", "10.1.2.3", "10.0.0.5", False, NOT_LOCAL),
        ("/v1/control/list-runs", "127.0.0.1", "127.0.0.1", False, NO_TOKEN),
        ("/v1/control/list-runs", "::ffff:127.0.0.1", "127.0.0.1", False, NO_TOKEN),
        ("/v1/control/list-runs", "127.0.0.1", "127.0.0.1", True, None),
        ("/v1/control/list-runs", "10.0.0.5", "10.0.0.5", True, None),
        ("/v1/control/list-runs", "0.0.0.0", "0.0.0.0", True, NOT_LOCAL),
        ("/v1/runtime/pull-task-input", "127.0.0.1", "127.0.0.1", False, None),
        ("/v1/fleet/pull-messages", "10.1.2.3", "10.0.0.5", False, None),
        ("/health", "10.1.2.3", "10.0.0.5", False, None),
    ],
)
def test_guard_admits_only_fleet_from_other_machines(path, peer, server, with_token, expected):
    """Peers on other machines reach only Fleet and health; Control needs this machine and the token."""
    # Prepare
    token = b"t" * 43
    headers = [(b"authorization", b"Bearer " + token)] if with_token else []
    scope = {"type": "http", "path": path, "client": (peer, 40000), "server": (server, 9092), "headers": headers}

    # Execute
    reason = refusal(scope, token)

    # Assert
    assert reason == expected


@pytest.mark.parametrize(
    ("metadata", "valid"),
    [([], False), ([("flwr-oidc-access-token", "wrong")], False), ([("flwr-oidc-access-token", "t" * 43)], True),
     ([("flwr-oidc-access-token", "t" * 43), ("flwr-oidc-access-token", "t" * 43)], False)],
)
def test_authn_plugin_accepts_only_the_token(metadata, valid):
    """Flower's authentication step itself accepts exactly one copy of the token, as the no-op account."""
    # Prepare
    plugin = make_authn_plugin(b"t" * 43)

    # Execute
    accepted, account = plugin.validate_tokens_in_metadata(metadata)

    # Assert
    assert accepted is valid and (account is not None) is valid


def test_authn_plugin_mints_no_tokens():
    """The login and refresh endpoints, which Flower leaves unauthenticated, issue nothing."""
    # Prepare
    from flwr.supercore.error import FlowerError

    plugin = make_authn_plugin(b"t" * 43)

    # Execute / Assert
    assert plugin.get_login_details() is None
    with pytest.raises(FlowerError):
        plugin.get_auth_tokens("device")
    with pytest.raises(FlowerError):
        plugin.refresh_tokens([("flwr-oidc-refresh-token", "x")])


def test_superlink_commands_carry_the_guard(tmp_path):
    """fer-server's SuperLink command names the token file always, and the trusted entities with TLS."""
    # Prepare
    make_certificates(out_dir=tmp_path / "certs", hosts=["127.0.0.1"])
    tls = TlsFiles.from_dir(tmp_path / "certs")

    # Execute
    secure = SuperLinkSettings(state_dir=tmp_path / "srv", tls=tls).command()
    insecure = SuperLinkSettings(state_dir=tmp_path / "srv", insecure=True).command()

    # Assert
    for command in (secure, insecure):
        assert command[command.index("--fer-control-token") + 1] == str((tmp_path / "srv" / TOKEN_FILE).resolve())
    assert secure[secure.index("--fer-trusted-entities") + 1] == str(tls.trusted_entities)
    assert "--fer-trusted-entities" not in insecure


@pytest.mark.slow
def test_superlink_entry_point_refuses_to_start_unguarded(tmp_path):
    """Without the token file the entry point exits with one line instead of serving an open Control API."""
    # Execute
    done = subprocess.run([sys.executable, "-m", "server.superlink_main", "--insecure", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=flower_env(),
                          stdin=subprocess.DEVNULL)

    # Assert
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "fer-fl: --fer-control-token FILE is required (fer-server creates it); refusing to start an unguarded "
        "SuperLink"
    ]


def test_token_is_private_and_new_at_every_start(tmp_path):
    """control.token and the CLI's credentials are mode 0600, and each start issues a different token."""
    # Execute
    first = issue_control_token(state_dir=tmp_path, flwr_home=tmp_path / "flwr", address="127.0.0.1:1").read_text()
    path = issue_control_token(state_dir=tmp_path, flwr_home=tmp_path / "flwr", address="127.0.0.1:1")

    # Assert
    assert path.read_text() != first and len(first) >= 32
    for secret in (path, tmp_path / "flwr" / "credentials.yaml"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
