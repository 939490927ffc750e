"""A Flower Control API client in the test process, as a stranger (no token) or as fer-server (its token).

Each `flwr` CLI call is a whole Python process (seconds on a loaded machine); tests that only need an answer from
the Control API ask it from here. `Bearer` adds the header the `flwr` CLI's OIDC plugin would send.
"""

from __future__ import annotations

from pathlib import Path


class Bearer:
    """A protobuf-over-HTTP interceptor that sends `Authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self.token = token

    def intercept(self, context, call_next):
        context.request.headers["Authorization"] = f"Bearer {self.token}"
        return call_next(context)


def control_client(address: str, *, ca_cert: Path, token: str | None = None):
    """A `ControlHttpClient` for `address` (host:port) trusting `ca_cert`, with `token` when given."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr CLI")]
    if token is not None:
        interceptors.append(Bearer(token))
    return ControlHttpClient.from_server_address(address, insecure=False, root_certificates=Path(ca_cert).read_bytes(),
                                                 interceptors=interceptors)
