"""Running a site's Flower SuperNode: node keys, the pre-join data check, and the SuperNode process.

A site's data never leaves it: the SuperNode's node config only names the dataset path, which the ClientApp opens
on this machine. The check before joining opens it the same way, so a wrong path or an unreadable folder is one
clear error at start-up instead of a failed round on the coordinator's screen.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.atomic import atomic_write
from client.lifetime import descendants, spawn_supervised, stop_tree  # noqa: F401 - re-exported
from client.relay import OutputRelay

PRIVATE_KEY = "node.key"
PUBLIC_KEY = "node.pub"


@dataclass(frozen=True)
class NodeKeys:
    """A node's authentication key pair: OpenSSH-format EC P-384, as Flower's node authentication reads it."""

    private_key: Path
    public_key: Path


def generate_node_keys(*, out_dir: Path, name: str = "node", overwrite: bool = False) -> NodeKeys:
    """Writes `<name>.key` (private, mode 0600) and `<name>.pub` (hand this one to the coordinator).

    Raises:
        ValueError: the files exist and `overwrite` is False (a new key would silently un-enrol the node).
    """
    out_dir = Path(out_dir)
    keys = NodeKeys(private_key=out_dir / f"{name}.key", public_key=out_dir / f"{name}.pub")
    for path in (keys.private_key, keys.public_key):
        if path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; use --overwrite to replace the node's keys")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write(keys.private_key, private, mode=0o600)
    atomic_write(keys.public_key, public + f" {name}\n".encode())
    return keys


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Waits until something accepts TCP connections on host:port; raises TimeoutError on timeout or if
    `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"the process listening on {host}:{port} exited with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing answered on {host}:{port} within {timeout:.0f} s")


def check_data(*, spec: str, image_size: int = 48, seed: int = 42) -> str:
    """Opens the node's dataset exactly as the ClientApp will, and returns a one-line description of it.

    Raises:
        client.data.formats.DatasetError: the data cannot be read (the message names the file or row).
    """
    from client.data.formats import DatasetError, load_dataset

    dataset = load_dataset(spec, image_size=image_size, seed=seed)
    train = dataset.splits.get("train")
    if train is None or len(train.labels) == 0:
        raise DatasetError(f"{spec}: no training images found")
    counts = {split: len(part.labels) for split, part in dataset.splits.items()}
    return f"{dataset.kind} data, " + ", ".join(f"{n} {split}" for split, n in counts.items()) + " images"


@dataclass(frozen=True)
class SuperNodeSettings:
    """How to start a site's SuperNode.

    Args:
        superlink: the coordinator's HOST:PORT.
        node_config: Flower node config (dataset, client-id, profile, state-dir, ledger-key, ...).
        state_dir: this node's Flower home and log folder.
        ca_cert: the coordinator's CA certificate (TLS); None only with `insecure`.
        private_key: the node's authentication key (`fer-client keygen`); None only with `insecure`.
        insecure: plaintext, no node authentication.
        runtime_port: local port of the SuperNode's ClientApp API (distinct per node on one machine).
        isolation: Flower's ClientApp isolation mode (subprocess: one fresh process per message).
        max_retries: reconnect attempts before giving up (None: forever, so a restarted server is rejoined).
        trusted_entities: the coordinator's trusted-entities.yaml; the SuperNode then runs only FABs that key
            signed (Flower's `--trusted-entities`; see server/fab_signing.py).
    """

    superlink: str
    node_config: dict[str, str]
    state_dir: Path
    ca_cert: Path | None = None
    private_key: Path | None = None
    insecure: bool = False
    runtime_port: int = 9094
    isolation: str = "subprocess"
    max_retries: int | None = None
    trusted_entities: Path | None = None

    def command(self) -> list[str]:
        """The `flower-supernode` command line."""
        config = " ".join(f"{key}={json.dumps(str(value))}" for key, value in self.node_config.items())
        cmd = [
            str(Path(sys.executable).parent / "flower-supernode"),
            "--superlink", self.superlink,
            "--node-config", config,
            "--port", str(self.runtime_port),
            "--isolation", self.isolation,
        ]
        if self.max_retries is not None:
            cmd += ["--max-retries", str(self.max_retries)]
        if self.trusted_entities is not None:
            cmd += ["--trusted-entities", str(self.trusted_entities)]
        if self.insecure:
            cmd.append("--insecure")
        else:
            if self.ca_cert is None or self.private_key is None:
                raise ValueError("a secure SuperNode needs the CA certificate and the node's private key")
            cmd += ["--root-certificates", str(self.ca_cert), "--auth-supernode-private-key", str(self.private_key)]
        return cmd

    def env(self) -> dict[str, str]:
        """`flower_env()` with Flower's home under the node's state dir."""
        return flower_env(flwr_home=self.state_dir / "flwr")


def flower_env(*, flwr_home: Path | None = None, one_thread: bool = True) -> dict[str, str]:
    """The environment for every Flower process we start (the one implementation; server/deploy.py uses it too).

    Our venv's scripts come first on PATH (the SuperLink and SuperNode spawn `flower-superexec`, `flwr-serverapp`,
    `flwr-clientapp` by name), telemetry is off, output unbuffered (logs arrive as they happen).

    Args:
        flwr_home: Flower's home folder (FLWR_HOME), when it must not be the user's ~/.flwr.
        one_thread: One torch thread per ClientApp unless the operator set OMP_NUM_THREADS: several nodes or messages
            on one machine would otherwise oversubscribe its cores. The coordinator's processes pass False.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if one_thread:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_supernode(
    settings: SuperNodeSettings, *, log_file: Path, show: Callable[[str], None], pass_fds: tuple[int, ...] = ()
) -> tuple[subprocess.Popen, OutputRelay]:
    """Starts `flower-supernode` under a supervisor (client/lifetime.py: the SuperNode, its SuperExec and every
    ClientApp die with the caller), its output (stdout and stderr) piped through an `OutputRelay`: all of it
    appended to `log_file`, and to `show` line by line with Python tracebacks replaced by one line naming
    `log_file` (client/relay.py says why). Join the relay after the process has exited. `pass_fds` go to the
    supervisor only (the state directory's lock, held until the last process of the tree is gone)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    process = spawn_supervised(settings.command(), env=settings.env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, pass_fds=pass_fds)
    relay = OutputRelay(process.stdout, log_file=log_file, show=show, log_name=str(log_file)).start()
    return process, relay
