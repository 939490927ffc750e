"""End-to-end deployment over loopback: real `fer-server` and `fer-client` processes, TLS and enrolled keys.

One federation serves every assertion of the first test (it is the expensive part); the resume test runs its own.
Every process started here is stopped in a `finally`, with all of its descendants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.deploy import flower_env, free_port, stop_tree

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CHANCE = 1 / 7
# Small and quick. Of the registered models, CNN-AM's federated (GroupNorm) build moved off chance fastest on the
# synthetic faces in a quick check (0.31-0.38 after 2 rounds of 3 epochs on 640 faces; chance is 0.14).
# Clients evaluate nothing (the server's test set scores each round), so a round costs one ClientApp start-up
# per node instead of two.
RUN_CONFIG = """\
model = "cnn_am"
dataset = "synthetic=800"
local-epochs = 3
batch-size = 32
fraction-evaluate = 0.0
"""


def _env() -> dict[str, str]:
    return flower_env()


def _spawn(args: list[str], log: Path, *, cwd: Path) -> subprocess.Popen:
    env = _env()
    # A stock flower-supernode would otherwise unpack apps into ~/.flwr (fer-client and fer-server set their own).
    env["FLWR_HOME"] = str(cwd / f"flwr-home-{log.stem}")
    with open(log, "wb") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL)


def _run(args: list[str], *, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout)


def _run_to_exit(args: list[str], log: Path, *, cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Runs a process that is expected to give up; its output goes to a file because Flower's helper processes
    inherit (and would hold open) a pipe."""
    process = _spawn(args, log, cwd=cwd)
    try:
        code = process.wait(timeout=timeout)
    finally:
        stop_tree(process, timeout=3)
    return code, log.read_text(errors="replace")


def _wait_for_text(path: Path, text: str, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path.name} within {timeout} s:\n{path.read_text(errors='replace')[-3000:]}")


def _make_site(tmp: Path, names: list[str]) -> None:
    """Certificates for loopback and one key pair per site name."""
    assert _run([str(BIN / "fer-server"), "certs", "--out", "certs"], cwd=tmp).returncode == 0
    for name in names:
        assert _run([str(BIN / "fer-client"), "keygen", "--out", "keys", "--name", name], cwd=tmp).returncode == 0
    (tmp / "run.toml").write_text(RUN_CONFIG)


def _server_args(port: int, *extra: str) -> list[str]:
    return [str(BIN / "fer-server"), "--certs", "certs", "--state-dir", "srv", "--port", str(port),
            "--host", "127.0.0.1", "--config", "run.toml", "--timeout", "400", *extra]


def _client_args(port: int, name: str, *extra: str) -> list[str]:
    return [str(BIN / "fer-client"), "start", "--server", f"127.0.0.1:{port}", "--ca-cert", "certs/ca.crt",
            "--key", f"keys/{name}.key", "--dataset", "synthetic=800", "--client-id", f"site-{name}",
            "--state-dir", f"node-{name}", "--new-privacy-ledger", *extra]


def _stock_supernode_args(tmp: Path, port: int, name: str, *, with_ca: bool) -> list[str]:
    node_dir = tmp / f"node-{name}"
    args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
            "--auth-supernode-private-key", f"keys/{name}.key", "--port", str(free_port()),
            "--node-config", f'dataset="synthetic=800" client-id="stock-{name}" state-dir="{node_dir}" '
                             f'ledger-key="{node_dir}/ledger.key"']
    if with_ca:
        args += ["--root-certificates", "certs/ca.crt"]
    else:
        args += ["--max-retries", "1"]
    return args


def _rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_three_sites_train_over_tls_and_outsiders_are_refused(tmp_path):
    """fer-server + 3 enrolled fer-clients finish 2 rounds above chance; unenrolled and CA-less nodes are refused."""
    # Prepare
    _make_site(tmp_path, ["a", "b", "c", "outsider"])
    port = free_port()
    run_dir = tmp_path / "run"
    processes: list[subprocess.Popen] = []
    try:
        server = _spawn(_server_args(port, "--out", "run", "--rounds", "2", "--min-clients", "3",
                                     "--enroll", "keys/a.pub", "--enroll", "keys/b.pub", "--enroll", "keys/c.pub"),
                        tmp_path / "server.log", cwd=tmp_path)
        processes.append(server)
        # A node that dials before its key is registered is refused, so the sites start once enrolment is done.
        _wait_for_text(tmp_path / "server.log", "waiting for", timeout=120, process=server)
        for name in ("a", "b", "c"):
            processes.append(_spawn(_client_args(port, name), tmp_path / f"client-{name}.log", cwd=tmp_path))

        # Execute
        outsider_rc, outsider_log = _run_to_exit(_client_args(port, "outsider", "--max-retries", "1"),
                                                 tmp_path / "outsider.log", cwd=tmp_path)
        no_ca_rc, no_ca_log = _run_to_exit(_stock_supernode_args(tmp_path, port, "a", with_ca=False),
                                           tmp_path / "no-ca.log", cwd=tmp_path)
        server_rc = server.wait(timeout=420)
    finally:
        for process in processes:
            stop_tree(process, timeout=3)

    # Assert
    server_log = (tmp_path / "server.log").read_text()
    assert server_rc == 0, server_log[-3000:]
    assert outsider_rc == 1
    assert "Failed to activate SuperNode" in outsider_log
    assert no_ca_rc != 0
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca_log
    assert _rounds(run_dir) == [0, 1, 2]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["fit"]["num_accepted"] for r in records[1:]] == [3, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["final_accuracy"] > CHANCE
    for name in ("config.json", "metrics.csv", "model.pt", "model.json", "report.md",
                 "checkpoints/round-001.pt", "checkpoints/round-002.pt"):
        assert (run_dir / name).is_file(), name
    assert "round 2/2" in server_log


def test_killed_server_resumes_and_finishes_every_round_once(tmp_path):
    """The server dies after round 1; `fer-server resume` finishes round 3; each round is logged exactly once and
    every node's privacy ledger holds every charged round (none lost on restart); a stock SuperNode takes part."""
    # Prepare
    # Two nodes keep it affordable: one fer-client and one stock flower-supernode.
    _make_site(tmp_path, ["a", "stock"])
    port = free_port()
    run_dir = tmp_path / "run"
    server_args = ["--enroll", "keys/a.pub", "--enroll", "keys/stock.pub"]
    processes: list[subprocess.Popen] = []
    try:
        server = _spawn(_server_args(port, "--out", "run", "--rounds", "3", "--min-clients", "2",
                                     "--dp-epsilon", "50", *server_args), tmp_path / "server.log", cwd=tmp_path)
        processes.append(server)
        _wait_for_text(tmp_path / "server.log", "waiting for", timeout=120, process=server)
        processes.append(_spawn(_client_args(port, "a"), tmp_path / "client-a.log", cwd=tmp_path))
        (tmp_path / "node-stock").mkdir()
        from privacy.ledger import generate_key_file

        generate_key_file(tmp_path / "node-stock" / "ledger.key")
        processes.append(_spawn(_stock_supernode_args(tmp_path, port, "stock", with_ca=True), tmp_path / "stock.log",
                                cwd=tmp_path))
        _wait_for_text(tmp_path / "server.log", "round 1/3", timeout=300, process=server)

        # Execute
        stop_tree(server, kill=True)  # the coordinator's machine dies: no clean shutdown
        resumed = _spawn([str(BIN / "fer-server"), "resume", "run", "--certs", "certs", "--state-dir", "srv",
                          "--port", str(port), "--host", "127.0.0.1", "--timeout", "400"],
                         tmp_path / "resume.log", cwd=tmp_path)
        processes.append(resumed)
        resumed_rc = resumed.wait(timeout=450)
    finally:
        for process in processes:
            stop_tree(process, timeout=3)

    # Assert
    resume_log = (tmp_path / "resume.log").read_text()
    assert resumed_rc == 0, resume_log[-3000:]
    assert "resuming" in resume_log and "after round 1" in resume_log
    assert _rounds(run_dir) == [0, 1, 2, 3]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "stock-stock" in records[-1]["privacy"]
    # The coordinator's ledger record outlived the killed ServerApp: it is in its state folder, not the process.
    marks = json.loads((tmp_path / "srv" / "node-ledgers.json").read_text())["nodes"]
    assert set(marks) == {"site-a", "stock-stock"}
    privacy = json.loads((run_dir / "privacy.json").read_text())
    reported = {c["client_id"]: c for c in privacy["clients"]}
    from privacy.ledger import PrivacyLedger

    retrained = 0
    for node, client_id in (("a", "site-a"), ("stock", "stock-stock")):
        node_dir = tmp_path / f"node-{node}"
        ledger = PrivacyLedger.open(node_dir / "privacy.ledger", key_file=node_dir / "ledger.key",
                                    anchor_path=node_dir / "ledger.anchor", client_id=client_id,
                                    budget_epsilon=50.0, delta=1e-5)
        charged = sorted(r.server_round for r in ledger.rounds)
        # A node that released its round-2 update before the server died re-sends it when round 2 is re-run,
        # at no new cost. One killed while still training round 2 trains again and is charged again (a real
        # second spend, never a lost one); its budget was planned for 3 rounds, so it then declines round 3.
        if charged.count(2) == 2:
            retrained += 1
            assert charged == [1, 2, 2]
        else:
            assert charged == [1, 2, 3]
        assert reported[client_id]["epsilon_spent"] == pytest.approx(ledger.spent_epsilon, rel=1e-9)
    assert [r["fit"]["num_accepted"] for r in records[1:]] == [2, 2, 2 - retrained]
    declines = [f for f in records[3]["fit"]["failures"] if "privacy budget exhausted" in f]
    assert len(declines) == retrained
