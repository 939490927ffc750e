"""Running the coordinator's side of a real federation: the Flower SuperLink process, node enrolment through
Flower's CLI, submitting our app as a run, and following it to the end.

Everything Flower keeps for the coordinator (its SQLite state, its CLI config naming the SuperLink and the CA, the
FABs it unpacks) lives under one *state directory*, with FLWR_HOME pointed there, so nothing lands in the user's
home directory and two coordinators on one machine never see each other's state.

Security defaults: TLS on and SuperNode authentication on (only enrolled public keys may join); runtime
installation of app dependencies off (a submitted app cannot pip-install on the coordinator); the Control and
Runtime APIs only for this machine's fer-server, with a token issued at each start (server/control_guard.py);
submitted FABs signed with the coordinator's key (server/fab_signing.py). `insecure=True` turns both TLS and node
authentication off, because Flower cannot authenticate nodes over plaintext; the token guard stays on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.deploy import flower_env, wait_for_port
from client.lifetime import cmdline, dying_with_me, port_holder, spawn_supervised, stop_tree
from privacy.atomic import atomic_write
from server.control_guard import TOKEN_FILE as CONTROL_TOKEN
from server.control_guard import issue_control_token
from server.fab_signing import SIGNING_KEY_ENV
from server.records import RoundRecord
from server.rundir import METRICS_JSONL

CONNECTION = "fer"
DATABASE = "superlink.db"
LOG_FILE = "superlink.log"
# Flower run states as `flwr ls` reports them.
FINISHED = "finished"


class DeployError(RuntimeError):
    """A deployment step failed for a reason the user can act on; the message is one line."""


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS material (see server.certs), and the FAB signing key with its public trusted-entities
    file (server/fab_signing.py): fer-server signs the FABs it submits, the SuperLink refuses unsigned ones."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    signing_key: Path | None = None
    trusted_entities: Path | None = None

    @classmethod
    def from_dir(cls, certs_dir: Path) -> TlsFiles:
        """The files `fer-server certs` writes into `certs_dir`; raises DeployError naming a missing one."""
        from server.certs import CA_CERT, SERVER_CERT, SERVER_KEY
        from server.fab_signing import SigningFiles

        certs_dir = Path(certs_dir).resolve()
        signing = SigningFiles.in_dir(certs_dir)
        files = cls(certs_dir / CA_CERT, certs_dir / SERVER_CERT, certs_dir / SERVER_KEY, signing.private_key,
                    signing.trusted_entities)
        for path in (files.ca_cert, files.server_cert, files.server_key, files.signing_key, files.trusted_entities):
            if not path.is_file():
                raise DeployError(f"{path} not found; create certificates with `fer-server certs --out {certs_dir}`")
        return files


def flower_script(name: str) -> str:
    """Path of a Flower console script installed beside this interpreter."""
    return str(Path(sys.executable).parent / name)


@dataclass(frozen=True)
class SuperLinkSettings:
    """How to start the SuperLink.

    Args:
        state_dir: Flower's home, the SQLite state and the log for this coordinator.
        host: address to listen on (0.0.0.0 for every interface; 127.0.0.1 keeps it on this machine).
        port: the one HTTPS port for Fleet (SuperNodes), Control (`flwr` CLI) and Runtime (ServerApp) APIs.
        tls: certificates; None only with `insecure`.
        insecure: plaintext and no node authentication (for a throw-away local test only).
        connect_host: the name the `flwr` CLI dials; must be one of the certificate's SANs.
    """

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 9092
    tls: TlsFiles | None = None
    insecure: bool = False
    connect_host: str = "127.0.0.1"

    def command(self) -> list[str]:
        """The `flower-superlink` command line."""
        cmd = [
            # Flower's flower-superlink, with a longer SQLite lock wait (see server/superlink_main.py).
            sys.executable, "-m", "server.superlink_main",
            "--host", self.host,
            "--port", str(self.port),
            "--database", str(Path(self.state_dir).resolve() / DATABASE),
            "--disable-runtime-dependency-installation",
            # Only fer-server may use the Control API (server/control_guard.py); SuperLink.start writes the token.
            "--fer-control-token", str(Path(self.state_dir).resolve() / CONTROL_TOKEN),
        ]
        if self.tls is not None and self.tls.trusted_entities is not None and not self.insecure:
            cmd += ["--fer-trusted-entities", str(self.tls.trusted_entities)]
        if self.insecure:
            cmd.append("--insecure")
        else:
            if self.tls is None:
                raise DeployError("TLS certificates are required (or pass --insecure for a local test)")
            cmd += [
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
                "--enable-supernode-auth",
            ]
        return cmd


def write_flower_config(*, flwr_home: Path, address: str, ca_cert: Path | None, insecure: bool) -> Path:
    """Writes the `flwr` CLI's config.toml in `flwr_home`: one connection, `fer`, to our SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    elif ca_cert is not None:
        lines.append(f'root-certificates = "{Path(ca_cert).resolve()}"')
    path = flwr_home / "config.toml"
    atomic_write(path, "\n".join(lines) + "\n")
    return path


class SuperLink:
    """A running SuperLink plus the `flwr` CLI pointed at it.

    Use `SuperLink.start(settings)` for a new process, or `SuperLink.attach(state_dir)` to drive one another
    command started (enrol, list, revoke while `fer-server` runs).
    """

    def __init__(
        self, *, state_dir: Path, process: subprocess.Popen | None = None, signing_key: Path | None = None
    ) -> None:
        self.state_dir = Path(state_dir)
        self.process = process
        self.signing_key = signing_key

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"

    @classmethod
    def start(cls, settings: SuperLinkSettings, *, timeout: float = 60.0, pass_fds: tuple[int, ...] = ()) -> SuperLink:
        """Starts `flower-superlink` and waits until its port answers; its output goes to state_dir/superlink.log.

        It runs under a supervisor (client/lifetime.py), so the SuperLink, its SuperExec and the ServerApp die with
        this process however it dies. `pass_fds` go to the supervisor only (the state directory's lock: held
        until the last process of the tree is gone)."""
        state_dir = Path(settings.state_dir).resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        link = cls(state_dir=state_dir, signing_key=settings.tls.signing_key if settings.tls else None)
        address = f"{settings.connect_host}:{settings.port}"
        write_flower_config(
            flwr_home=link.flwr_home, address=address,
            ca_cert=settings.tls.ca_cert if settings.tls else None, insecure=settings.insecure,
        )
        issue_control_token(state_dir=state_dir, flwr_home=link.flwr_home, address=address)
        log = open(state_dir / LOG_FILE, "ab")  # noqa: SIM115 - the child owns it
        try:
            link.process = spawn_supervised(
                settings.command(), stdout=log, stderr=subprocess.STDOUT,
                env=flower_env(flwr_home=link.flwr_home, one_thread=False), cwd=state_dir, pass_fds=pass_fds,
            )
        finally:
            log.close()
        try:
            wait_for_port(settings.connect_host, settings.port, timeout=timeout, process=link.process)
        except TimeoutError as err:
            link.stop()
            holder = port_holder(settings.port)
            if holder is not None:  # taken between our check and the SuperLink's bind
                raise DeployError(_port_taken(settings.port, holder)) from None
            raise DeployError(f"the SuperLink did not start ({err}); see {state_dir / LOG_FILE}") from None
        return link

    @classmethod
    def attach(cls, state_dir: Path) -> SuperLink:
        """The SuperLink a running `fer-server --state-dir state_dir` started."""
        link = cls(state_dir=Path(state_dir).resolve())
        if not (link.flwr_home / "config.toml").is_file():
            raise DeployError(f"{state_dir} holds no fer-server state; start `fer-server start --state-dir {state_dir}`")
        return link

    def stop(self, *, kill: bool = False) -> None:
        """Stops the SuperLink and every process under it (ServerApp included)."""
        if self.process is not None:
            stop_tree(self.process, kill=kill)

    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Runs `flwr ARGS --format json` against this SuperLink and returns its JSON answer.

        Raises:
            DeployError: the command failed; the message is Flower's own one-line reason.
        """
        # Flower's `flwr`, signing the FAB `flwr run` builds with the coordinator's key (server/flwr_cli.py); the
        # Control API token comes from the credentials SuperLink.start stored in flwr_home.
        cmd = [sys.executable, "-m", "server.flwr_cli", *args, "--format", "json"]
        env = flower_env(flwr_home=self.flwr_home, one_thread=False)
        if self.signing_key is not None:
            env[SIGNING_KEY_ENV] = str(self.signing_key)
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                preexec_fn=dying_with_me(),  # a `flwr run` must not submit on after fer-server died
            )
        except subprocess.TimeoutExpired:
            raise DeployError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from None
        answer = _last_json(done.stdout)
        if done.returncode != 0 or answer is None or not answer.get("success", False):
            reason = (answer or {}).get("error-message") or _last_line(done.stderr) or _last_line(done.stdout)
            raise DeployError(f"flwr {' '.join(args[:2])} failed: {reason}")
        return answer

    def enroll(self, public_key: Path, *, name: str | None = None) -> str:
        """Registers a SuperNode's public key (`flwr supernode register`); returns the node id."""
        args = ["supernode", "register", str(Path(public_key).resolve()), CONNECTION]
        if name:
            args += ["--name", name]
        return str(self.flwr(*args)["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """The registered SuperNodes with their status (`flwr supernode ls`)."""
        return list(self.flwr("supernode", "ls", CONNECTION).get("nodes", []))

    def wait_for_nodes(self, count: int, *, timeout: float | None = None, poll: float = 2.0) -> int:
        """Waits until `count` enrolled SuperNodes are online; returns how many are.

        The run is submitted only then: Flower's legacy strategies size a round's sample from the nodes connected
        when the round starts, so nodes that join a moment later would sit out round 1.
        """
        started = time.monotonic()
        while True:
            online = sum(1 for node in self.nodes() if node.get("status") == "online")
            if online >= count:
                return online
            if self.process is not None and self.process.poll() is not None:
                raise DeployError(f"the SuperLink exited (code {self.process.returncode}); see its log")
            if timeout is not None and time.monotonic() - started > timeout:
                raise DeployError(f"only {online} of {count} nodes came online within {timeout:.0f} s")
            time.sleep(poll)

    def revoke(self, node_id: str) -> None:
        """Unregisters a SuperNode (`flwr supernode unregister`): it can no longer connect with its key."""
        self.flwr("supernode", "unregister", str(node_id), CONNECTION)

    def submit(self, *, app_dir: Path, run_config: dict[str, Any]) -> str:
        """Submits our Flower app (`flwr run`) with `run_config` overrides; returns the run id."""
        overrides = " ".join(f"{key}={_toml_value(value)}" for key, value in run_config.items())
        answer = self.flwr("run", str(app_dir), CONNECTION, "--run-config", overrides, timeout=300.0)
        return str(answer["run-id"])

    def run_status(self, run_id: str) -> dict[str, Any]:
        """One run's record from `flwr ls --run-id`."""
        runs = self.flwr("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        if not runs:
            raise DeployError(f"the SuperLink knows no run {run_id}")
        return runs[0]

    def stop_run(self, run_id: str) -> None:
        """Stops a run (`flwr stop`)."""
        self.flwr("stop", str(run_id), CONNECTION)

    def follow(
        self,
        run_id: str,
        *,
        run_dir: Path,
        on_round: Callable[[RoundRecord], None] | None = None,
        poll: float = 1.0,
        status_every: float = 20.0,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Waits for a run to end, calling `on_round` with each new round record the ServerApp writes.

        Progress comes from the run directory (cheap to read); Flower's run status is asked every `status_every`
        seconds, and at once when summary.json appears (the ServerApp's last write). Each `flwr ls` is a whole
        Python process and a read of the SuperLink's SQLite state, which on a starved machine answers "database
        is locked" now and then: a failed status query is retried, not fatal, until three fail in a row.

        Returns the final run record. Raises DeployError when the run ends other than `finished:completed`, when
        the SuperLink process dies, or after `timeout` seconds.
        """
        # A resumed run's directory already holds the rounds before the checkpoint: report only new ones.
        seen = len(_read_metrics(run_dir))
        started = time.monotonic()
        last_check = time.monotonic()
        failed_queries = 0

        def deliver() -> None:
            nonlocal seen
            for record in _read_metrics(run_dir)[seen:]:
                seen += 1
                if on_round is not None:
                    on_round(record)

        while True:
            deliver()
            if self.process is not None and self.process.poll() is not None:
                raise DeployError(f"the SuperLink exited (code {self.process.returncode}); see its log")
            now = time.monotonic()
            summary_written = (Path(run_dir) / "summary.json").exists()
            if now - last_check >= status_every or summary_written:
                last_check = now
                try:
                    status = self.run_status(run_id)
                    failed_queries = 0
                except DeployError:
                    failed_queries += 1
                    if failed_queries >= 3:
                        raise
                    status = {}
                if str(status.get("status", "")).startswith(FINISHED):
                    deliver()
                    if status["status"] != "finished:completed":
                        detail = status.get("status-details") or ""
                        raise DeployError(f"run {run_id} ended as {status['status']} {detail}".strip())
                    return status
            if timeout is not None and now - started > timeout:
                raise DeployError(f"run {run_id} did not finish within {timeout:.0f} s")
            time.sleep(poll if not summary_written else 2.0)


def _port_taken(port: int, pid: int | None) -> str:
    if pid is None:
        return f"port {port} is already in use by another process: stop it or choose another --port"
    return f"port {port} is already in use by pid {pid} ({cmdline(pid)[:100]}): stop it or choose another --port"


def _read_metrics(run_dir: Path) -> list[RoundRecord]:
    """The complete round records in metrics.jsonl so far (the ServerApp may be writing the next line)."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            break
        records.append(RoundRecord.from_json(data, source=str(path)))
    return records


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _last_json(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def _last_line(text: str) -> str:
    lines = [line.strip(" │╭╰─") for line in (text or "").strip().splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""
