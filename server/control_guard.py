"""Only the coordinator's own fer-server may drive its SuperLink.

Flower 1.41's SuperLink serves three APIs on one HTTPS port: Fleet (SuperNodes), Control (the `flwr` CLI: submit a
run, register or unregister a node key, stop runs, stream logs) and Runtime (the ServerApp and the SuperExec that
launches it). In the open-source build the Control API takes any caller (`NoOpControlAuthnPlugin`; OIDC is
enterprise-only) and, in subprocess isolation, the Runtime API hands a pending ServerApp task to whoever asks first
(SuperExec authentication is "ignored in subprocess isolation mode"). Anyone who reaches the port could enrol a
key, submit an app bundle every site would run, or stop the federation's run.

This module closes that at Flower's own hooks, inside the SuperLink process (`install`, called by
server/superlink_main.py):

- an outermost ASGI middleware (Flower's `extensions.get_middleware` hook) lets any peer reach only the Fleet API
  and the health check; every other path (Control, Runtime, OpenAPI docs) must come from this machine (a loopback
  peer, or a peer whose address is the very address it connected to) and a Control request must also carry the
  bearer token that only fer-server's state directory holds (`control.token`, mode 0600, new at every start);
- a Control authentication plugin (`TokenControlAuthnPlugin`, in place of the no-op one) checks the same token,
  so the check holds in Flower's own authentication step too, and it refuses the login/refresh endpoints that
  Flower leaves unauthenticated;
- SuperExec HMAC authentication (Flower's, for process isolation) is switched on in subprocess isolation too, with
  a fresh secret handed to the SuperExec the SuperLink starts, so only that SuperExec can claim ServerApp tasks;
- with a trusted-entities file, `StartRun` accepts only a FAB signed by the coordinator's key and keeps the
  signature with the stored FAB, which is where sites read it from (server/fab_signing.py).

The `flwr` CLI authenticates with a bearer token only through its OIDC plugin, which reads the token from
`FLWR_HOME/credentials.yaml`; `issue_control_token` writes the token there (mode 0600, Flower's own format) for the
connection fer-server uses, so `SuperLink.flwr` keeps working without any change to the CLI.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.certs import write_private

TOKEN_FILE = "control.token"
SUPEREXEC_SECRET_FILE = "superexec.secret"
CREDENTIALS_FILE = "credentials.yaml"
# What any peer may reach: the Fleet API (SuperNodes, which Flower authenticates by their enrolled key) and the
# health check. Everything else is refused unless it comes from this machine.
OPEN_PREFIXES = ("/v1/fleet/",)
OPEN_PATHS = frozenset({"/health"})
CONTROL_PREFIX = "/v1/control/"
NOT_LOCAL = "only fer-server on the coordinator's machine may use this API"
NO_TOKEN = "the Control API needs fer-server's token (the state directory's control.token)"


# ---------------------------------------------------------------------------------------------------------------
# The coordinator's side: the token and the `flwr` CLI's credentials.


def issue_control_token(*, state_dir: Path, flwr_home: Path, address: str) -> Path:
    """Creates a fresh Control API token in `state_dir/control.token` (mode 0600) and stores it as the `flwr`
    CLI's credentials for `address` in `flwr_home`; returns the token file.

    A new token at every SuperLink start means a token copied from an earlier run opens nothing.
    """
    token = secrets.token_urlsafe(32)
    path = Path(state_dir) / TOKEN_FILE
    write_private(path, token.encode())
    write_cli_credentials(flwr_home=Path(flwr_home), address=address, token=token)
    return path


def write_cli_credentials(*, flwr_home: Path, address: str, token: str) -> Path:
    """Stores `token` as the `flwr` CLI's OIDC access token for the connection `address` (host:port).

    The CLI picks its authentication plugin by the type stored for the address; with "oidc" it sends the stored
    access token as `Authorization: Bearer`. The refresh token is a random placeholder: our SuperLink refuses
    refreshes. Flower's FileCredentialStore writes through a mkstemp file, so the result has mode 0600.
    """
    from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY
    from flwr.common.constant import AuthnType
    from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / CREDENTIALS_FILE
    store = FileCredentialStore(file_path=path)
    store.set(AUTHN_TYPE_STORE_KEY % address, AuthnType.OIDC.encode())
    store.set(ACCESS_TOKEN_STORE_KEY % address, token.encode())
    store.set(REFRESH_TOKEN_STORE_KEY % address, secrets.token_urlsafe(16).encode())
    os.chmod(path, 0o600)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The SuperLink's side.


def is_local_peer(scope: dict[str, Any]) -> bool:
    """Whether an ASGI connection comes from this machine: a loopback peer, or a peer whose address is the
    address the connection was accepted on (a process on this host dialling the host's own interface address).
    A connection without a peer address (not TCP) is not local."""
    client, server = scope.get("client"), scope.get("server")
    peer = _ip(client[0]) if client else None
    if peer is None:
        return False
    if peer.is_loopback:
        return True
    own = _ip(server[0]) if server else None
    return own is not None and peer == own and not own.is_unspecified


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address, an IPv4-mapped IPv6 one (a dual-stack socket's view of an IPv4 peer) as the IPv4
    address it carries; None when `host` is not an IP address (a Unix socket's path, a name)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def bearer_matches(scope: dict[str, Any], token: bytes) -> bool:
    """Whether the request carries exactly one `Authorization: Bearer <token>` header with our token."""
    values = [value for name, value in scope.get("headers", []) if name.lower() == b"authorization"]
    if len(values) != 1:
        return False
    scheme, _, credential = values[0].partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), token)


def refusal(scope: dict[str, Any], token: bytes) -> str | None:
    """Why the guard refuses this HTTP request, or None to let it through."""
    path = scope.get("path", "")
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    if not is_local_peer(scope):
        return NOT_LOCAL
    if path.startswith(CONTROL_PREFIX) and not bearer_matches(scope, token):
        return NO_TOKEN
    return None


class ControlGuardMiddleware:
    """ASGI middleware in front of every SuperLink route: see `refusal`. Plain ASGI (not BaseHTTPMiddleware), so
    streamed responses (`flwr log`) pass untouched."""

    def __init__(self, app: Callable, *, token: bytes) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            reason = refusal(scope, self.token)
            if reason is not None:
                _log_refusal(scope, reason)
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps(_error_payload(reason)).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _error_payload(reason: str) -> dict[str, Any]:
    """Flower's public error format (what `flwr` and its HTTP clients parse), code NO_PERMISSIONS."""
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.supercore.error.catalog import API_ERROR_MAP

    code = ApiErrorCode.NO_PERMISSIONS
    return FlowerError(code, reason, public_details=f"fer-fl: {reason}").to_json(API_ERROR_MAP[code].public_message)


def _log_refusal(scope: dict[str, Any], reason: str) -> None:
    from logging import WARNING

    from flwr.supercore import log

    client = scope.get("client") or ("?", 0)
    log(WARNING, "fer-fl guard refused %s %s from %s: %s", scope.get("method", ""), scope.get("path", ""),
        client[0], reason)


def make_authn_plugin(token: bytes):
    """A Flower `ControlAuthnPlugin` that accepts exactly our bearer token (as the no-op account, so runs and
    nodes keep the owner Flower's no-op federation expects)."""
    from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.supercore.auth.typing import AccountInfo
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.superlink.auth_plugin import ControlAuthnPlugin

    class TokenControlAuthnPlugin(ControlAuthnPlugin):
        """Control API authentication by fer-server's token; no login, no refresh."""

        def __init__(self) -> None:
            self._token = token

        def get_login_details(self):
            return None

        def validate_tokens_in_metadata(self, metadata):
            values = [value for key, value in metadata if key == ACCESS_TOKEN_KEY]
            if len(values) != 1:
                return False, None
            value = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
            if not hmac.compare_digest(value, self._token):
                return False, None
            return True, AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)

        def get_auth_tokens(self, device_code):
            raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH, "fer-fl: tokens are issued by fer-server only")

        def refresh_tokens(self, metadata):
            raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH, "fer-fl: tokens are issued by fer-server only")

    return TokenControlAuthnPlugin()


# The verification record of the FAB the current StartRun checked, for the Fab that Flower's handler creates.
_checked_fab: contextvars.ContextVar[tuple[str, dict[str, str]] | None] = contextvars.ContextVar(
    "fer_checked_fab", default=None
)


def make_signed_start_run(start_run: Callable, trusted_entities: dict[str, str]) -> Callable:
    """Wraps Flower's `control_handlers.start_run`: refuse a FAB the coordinator did not sign; keep its signature.

    Flower stores an uploaded FAB with an empty verification record, and a SuperNode started with
    `--trusted-entities` refuses every such FAB. The signature is checked here with the same function the
    SuperNode uses, then handed to the `Fab` the handler builds (see `signed_fab_factory`).
    """
    from flwr.supercore.error import ApiErrorCode, FlowerError

    from client.trusted_entities import verify_fab
    from server.fab_signing import VALID_LICENSE

    def signed_start_run(request, *args, **kwargs):
        content = request.fab.content
        if not content:
            # A stored or Flower Hub app: not a FAB this coordinator uploaded and signed.
            raise FlowerError(ApiErrorCode.NO_PERMISSIONS, "fer-fl: FAB without content refused",
                              public_details="fer-fl: this SuperLink runs only FABs uploaded and signed by fer-server")
        record = {key: value for key, value in request.fab.verifications.items() if key != VALID_LICENSE}
        if not verify_fab(content, record, trusted_entities):
            raise FlowerError(ApiErrorCode.NO_PERMISSIONS, "fer-fl: unsigned or foreign-signed FAB refused",
                              public_details="fer-fl: the FAB is not signed by the coordinator's FAB signing key")
        record[VALID_LICENSE] = "fer-fl: signature checked by the coordinator's SuperLink"
        marker = _checked_fab.set((hashlib.sha256(content).hexdigest(), record))
        try:
            return start_run(request, *args, **kwargs)
        finally:
            _checked_fab.reset(marker)

    return signed_start_run


def signed_fab_factory(fab_class: type) -> Callable:
    """A stand-in for `Fab` in Flower's control handlers: the FAB that `signed_start_run` checked gets its
    signature record instead of the empty one Flower gives uploaded FABs; every other FAB is built unchanged."""

    def make_fab(hash_str: str, content: bytes, verifications: dict[str, str]):
        checked = _checked_fab.get()
        if checked is not None and checked[0] == hash_str and not verifications:
            verifications = dict(checked[1])
        return fab_class(hash_str, content, verifications)

    return make_fab


def install(*, token_file: Path, trusted_entities_file: Path | None = None) -> None:
    """Puts the guard into this (SuperLink) process before `flower_superlink()` runs; see the module docstring.

    Raises:
        SystemExit: the token or trusted-entities file is missing or unreadable (one line on stderr).
    """
    import importlib

    import uvicorn

    import flwr.superlink.extensions as extensions
    from flwr.common.constant import FLWR_INTERNAL_GRPC_CONTROL_API
    from flwr.superlink.servicer.control import control_handlers
    from starlette.middleware import Middleware

    from client.trusted_entities import load_trusted_entities

    # The package exports a function of the same name: import the module itself.
    flower_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")
    try:
        token = Path(token_file).read_bytes().strip()
    except OSError as err:
        sys.exit(f"fer-fl: cannot read the Control API token {token_file}: {err.strerror}")
    if len(token) < 16:
        sys.exit(f"fer-fl: the Control API token in {token_file} is too short")
    trusted = None
    if trusted_entities_file is not None:
        try:
            trusted = load_trusted_entities(trusted_entities_file)
        except ValueError as err:
            sys.exit(f"fer-fl: {err}")

    # The legacy gRPC Control API would listen on its own port, outside the middleware: never start it.
    os.environ.pop(FLWR_INTERNAL_GRPC_CONTROL_API, None)

    # SuperExec authentication in subprocess isolation: a fresh secret for the SuperExec this process starts.
    superexec_secret = secrets.token_bytes(32)
    secret_file = Path(token_file).with_name(SUPEREXEC_SECRET_FILE)
    write_private(secret_file, superexec_secret)

    parse_config = flower_superlink._parse_superlink_lifespan_config

    def guarded_config():
        config = parse_config()
        config.authn_plugin = make_authn_plugin(token)
        config.superexec_auth_secret = superexec_secret
        return config

    superexec_command = flower_superlink._get_superexec_command

    def guarded_superexec_command(*args, **kwargs):
        return [*superexec_command(*args, **kwargs), "--superexec-auth-secret-file", str(secret_file)]

    extension_middleware = extensions.get_middleware

    def guarded_middleware():
        return (Middleware(ControlGuardMiddleware, token=token), *extension_middleware())

    run_uvicorn = uvicorn.run

    def run_without_proxy_headers(*args, **kwargs):
        # X-Forwarded-For from a "trusted" proxy would rewrite the peer address the guard checks.
        kwargs["proxy_headers"] = False
        return run_uvicorn(*args, **kwargs)

    flower_superlink._parse_superlink_lifespan_config = guarded_config
    flower_superlink._get_superexec_command = guarded_superexec_command
    extensions.get_middleware = guarded_middleware
    uvicorn.run = run_without_proxy_headers
    if trusted is not None:
        control_handlers.start_run = make_signed_start_run(control_handlers.start_run, trusted)
        control_handlers.Fab = signed_fab_factory(control_handlers.Fab)
