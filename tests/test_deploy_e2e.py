"""End-to-end deployment over loopback: real `fer-server` and `fer-client` processes, TLS and enrolled keys.

One federation serves every assertion of the first test (it is the expensive part); the crash test runs its own,
and the lock test runs no round at all. Every process started here is stopped in a `finally`, with all of its
descendants.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from client.deploy import flower_env, free_port, stop_tree
from client.lifetime import cmdline, descendants, pid_alive

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# How far above both the initial model (0.1125) and a one-class predictor (23/160 = 0.144 on the server's test set)
# the trained model must score. With the default lr 3e-4 this federation reached only 0.169 after 2 rounds, which
# the old `> 1/7` check passed; see RUN_CONFIG for what it reaches now.
MARGIN = 0.08
# Local epochs of the run that must learn. Deployed nodes seed from the OS, so its accuracy varies run to run: with
# RUN_CONFIG's 3 it scored 0.200 once in CI (needs 0.224); replayed Flower-free with 8 seeds (3 sites, 2 rounds):
# 3 epochs 0.231-0.325, mean 0.275; 5 epochs 0.419-0.506, mean 0.456, eight standard deviations above the bar.
LEARNING_EPOCHS = 5
# The crash test checks book-keeping, not learning: smaller node datasets and one local epoch keep its 3 rounds short.
SMALL = "synthetic=240"
# Small and quick: CNN-AM's federated (GroupNorm) build, every site on the same 640 synthetic training faces. Adam
# at lr 1e-3, fresh each round as in a ClientApp, measured on those faces alone: 0.206 after 3 epochs, 0.269 after
# 6 (lr 3e-4: 0.169 federated; 2e-3: 0.175). Clients evaluate nothing (the server's test set scores each round),
# so a round costs one ClientApp start-up per node instead of two. The recipe keys pin the training these figures
# were measured with (the models' recipes of models/recipe.py came later).
RUN_CONFIG = """\
model = "cnn_am"
dataset = "synthetic=800"
local-epochs = 3
batch-size = 32
optimizer = "adam"
lr = 0.001
lr-schedule = "constant"
weight-decay = 0.0
label-smoothing = 0.0
augment = "light"
flip-tta = "off"
fraction-evaluate = 0.0
"""


def _env() -> dict[str, str]:
    return flower_env()


def _spawn(args: list[str], log: Path, *, cwd: Path, sigint_ignored: bool = False) -> subprocess.Popen:
    env = _env()
    # A stock flower-supernode would otherwise unpack apps into ~/.flwr (fer-client and fer-server set their own).
    env["FLWR_HOME"] = str(cwd / f"flwr-home-{log.stem}")
    # A shell starts a background job (`cmd &`) with SIGINT ignored; sigint_ignored starts it the same way.
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    with open(log, "wb") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, preexec_fn=preexec)


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


def _start_server(tmp: Path, make_args, log: Path, *, attempts: int = 3,
                  sigint_ignored: bool = False) -> tuple[subprocess.Popen, int]:
    """Starts `make_args(port)` on a free port and waits until it waits for nodes; returns it and its port.

    free_port() releases the port before fer-server binds it, so another process can take it in between; fer-server
    then exits with one line saying the port is in use, and this retries on a new port."""
    for _ in range(attempts):
        port = free_port()
        server = _spawn(make_args(port), log, cwd=tmp, sigint_ignored=sigint_ignored)
        try:
            _wait_for_text(log, "waiting for", timeout=120, process=server)
            return server, port
        except AssertionError:
            if server.poll() is None or "is already in use" not in log.read_text(errors="replace"):
                stop_tree(server, timeout=3)
                raise
    raise AssertionError(f"no free port for fer-server after {attempts} attempts")


def _tree(pid: int) -> dict[int, str]:
    """`pid` and its live descendants, each with its command line (a pid reused later has another one)."""
    return {p: cmdline(p) for p in [pid, *descendants(pid)] if pid_alive(p)}


def _left_over(tree: dict[int, str], *, mentioning: str, timeout: float) -> dict[int, str]:
    """What is still alive after `timeout` s: processes of `tree`, and any process whose command line mentions
    `mentioning` (the SuperLink names its state directory in its --database)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid: cmd for pid, cmd in tree.items() if pid_alive(pid) and cmdline(pid) == cmd}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid() and mentioning in cmdline(int(entry.name)):
                if pid_alive(int(entry.name)):
                    left[int(entry.name)] = cmdline(int(entry.name))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _make_site(tmp: Path, names: list[str]) -> None:
    """Certificates for loopback and one key pair per site name."""
    assert _run([str(BIN / "fer-server"), "certs", "--out", "certs"], cwd=tmp).returncode == 0
    for name in names:
        assert _run([str(BIN / "fer-client"), "keygen", "--out", "keys", "--name", name], cwd=tmp).returncode == 0
    (tmp / "run.toml").write_text(RUN_CONFIG)


def _server_args(port: int, *extra: str) -> list[str]:
    return [str(BIN / "fer-server"), "--certs", "certs", "--state-dir", "srv", "--port", str(port),
            "--host", "127.0.0.1", "--config", "run.toml", "--timeout", "400", *extra]


def _client_args(port: int, name: str, *extra: str, dataset: str = "synthetic=800", first_start: bool = True
                 ) -> list[str]:
    """A site's `fer-client start`; its first start makes its privacy ledger key (a restart must not ask again)."""
    new_ledger = ["--new-privacy-ledger"] if first_start else []
    return [str(BIN / "fer-client"), "start", "--server", f"127.0.0.1:{port}", "--ca-cert", "certs/ca.crt",
            "--key", f"keys/{name}.key", "--dataset", dataset, "--client-id", f"site-{name}",
            "--state-dir", f"node-{name}", *new_ledger, *extra]


def _stock_supernode_args(tmp: Path, port: int, name: str, *, with_ca: bool,
                          dataset: str = "synthetic=800") -> list[str]:
    node_dir = tmp / f"node-{name}"
    args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
            "--auth-supernode-private-key", f"keys/{name}.key", "--port", str(free_port()),
            "--node-config", f'dataset="{dataset}" client-id="stock-{name}" state-dir="{node_dir}" '
                             f'ledger-key="{node_dir}/ledger.key"']
    if with_ca:
        args += ["--root-certificates", "certs/ca.crt"]
    else:
        args += ["--max-retries", "1"]
    return args




def _rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _charged_rounds(node_dir: Path) -> list[int]:
    """The rounds a node's privacy ledger charged (read as the node wrote it; [] before its first DP round)."""
    from privacy.ledger import read_ledger

    if not (node_dir / "privacy.ledger").exists():
        return []
    return sorted(r.server_round for r in read_ledger(node_dir / "privacy.ledger", key_file=node_dir / "ledger.key")[1])


def _released_round(node_dir: Path) -> int | None:
    """The round of the update a DP node last released (client/replay.py), None before its first."""
    try:
        with np.load(node_dir / "released-update.npz", allow_pickle=False) as data:
            return json.loads(str(data["meta"]))["server_round"]
    except (OSError, ValueError, KeyError):
        return None


def _report_rounds(report: Path) -> list[str]:
    """The first column of report.md's Rounds table."""
    section = report.read_text().split("## Rounds", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")]
    return [cell for cell in cells if cell.isdigit()]


def _wait_until(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime, to show that a refused command wrote nothing."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_three_sites_train_over_tls_and_outsiders_are_refused(tmp_path):
    """fer-server + 3 enrolled fer-clients finish 2 rounds well above the initial model and a one-class
    predictor; unenrolled and CA-less nodes are refused."""
    # Prepare
    _make_site(tmp_path, ["a", "b", "c", "outsider"])
    run_dir = tmp_path / "run"
    processes: list[subprocess.Popen] = []
    try:
        # A node that dials before its key is registered is refused, so the sites start once enrolment is done.
        server, port = _start_server(
            tmp_path, lambda port: _server_args(port, "--out", "run", "--rounds", "2", "--min-clients", "3",
                                                "--local-epochs", str(LEARNING_EPOCHS),
                                                "--enroll", "keys/a.pub", "--enroll", "keys/b.pub",
                                                "--enroll", "keys/c.pub"),
            tmp_path / "server.log")
        processes.append(server)
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
    initial = records[0]["server"]
    one_class = max(initial["support"]) / initial["num_examples"]  # the best a constant prediction can score
    assert summary["initial_accuracy"] == pytest.approx(initial["accuracy"])
    assert summary["final_accuracy"] >= max(initial["accuracy"], one_class) + MARGIN, (initial, summary)
    for name in ("config.json", "metrics.csv", "model.pt", "model.json", "report.md",
                 "checkpoints/round-001.pt", "checkpoints/round-002.pt"):
        assert (run_dir / name).is_file(), name
    assert "round 2/2" in server_log
    _assert_every_site_holds_the_final_model(tmp_path, run_dir, ["a", "b", "c"])


def _site_epsilon(node_dir: Path) -> float | None:
    """The cumulative ε a node's ledger records, read as the node wrote it (None without a ledger)."""
    from privacy.ledger import read_ledger

    if not (node_dir / "privacy.ledger").exists():
        return None
    rounds = read_ledger(node_dir / "privacy.ledger", key_file=node_dir / "ledger.key")[1]
    return rounds[-1].epsilon_after if rounds else 0.0


def _assert_every_site_holds_the_final_model(tmp: Path, run_dir: Path, names: list[str]) -> None:
    """Issue 14 item 1: each site stored the coordinator's final weights (same weights sha256 as model.pt) with its
    card, `fer-client models` lists it, and `fer-client predict` with the site's default model gives the same
    probabilities as with the coordinator's model.pt (in-process to 1e-6; the CLI's JSON lines identical)."""
    from client import wire
    from client.delivery import list_delivered, weights_sha256
    from client.inference.model import load_torch_model, open_classifier
    from client.inference.pipeline import FramePipeline
    from tests.inference_builds import paste, pick_faces

    coordinator, _ = load_torch_model(run_dir / "model.pt")
    expected_sha = weights_sha256(wire.get_weights(coordinator))
    summary = json.loads((run_dir / "summary.json").read_text())
    delivery = json.loads((run_dir / "delivery.json").read_text())
    assert len(delivery["delivered"]) == len(names) and delivery["refused"] == {}, delivery
    assert (delivery["round"], delivery["weights_sha256"]) == (2, expected_sha)
    for name in names:
        node_dir = tmp / f"node-{name}"
        (held,) = list_delivered(node_dir)
        card = held.card
        assert held.path.parent == node_dir / "models" and held.path.name == f"{card.run_id}-r2.pt"
        assert (card.round, card.name, card.weights_sha256) == (2, "cnn_am", expected_sha)
        # Same torch on both sides here, so the site's file is byte-identical to model.pt (the weights digest above
        # is what holds across torch versions).
        assert card.sha256 == json.loads((run_dir / "model.json").read_text())["sha256"]
        assert card.server_metrics["accuracy"] == pytest.approx(summary["final_accuracy"])
        assert card.secure_aggregation is False
        assert card.epsilon_spent == _site_epsilon(node_dir)
        listed = _run([str(BIN / "fer-client"), "models", "--state-dir", str(node_dir), "--json"], cwd=tmp)
        assert listed.returncode == 0 and json.loads(listed.stdout)["weights_sha256"] == expected_sha
    faces = pick_faces(("happy", "sad", "surprise"))
    frames = [paste(face, index) for index, face in enumerate(faces.values())]
    images = tmp / "faces"
    images.mkdir()
    for index, frame in enumerate(frames):
        cv2.imwrite(str(images / f"face-{index}.png"), frame)
    site = tmp / f"node-{names[0]}"
    by_site = FramePipeline(classifier=open_classifier(model=None, runtime="torch", state_dir=site))
    by_coordinator = FramePipeline(classifier=open_classifier(model=run_dir / "model.pt", runtime="torch"))
    assert by_site.classifier.card.source == list_delivered(site)[0].path
    for frame in frames:
        ours, theirs = by_site.process(frame), by_coordinator.process(frame)
        assert len(ours) == len(theirs) == 1
        assert np.abs(ours[0].probabilities - theirs[0].probabilities).max() <= 1e-6
    default = _run([str(BIN / "fer-client"), "predict", str(images), "--state-dir", str(site)], cwd=tmp, timeout=300)
    explicit = _run([str(BIN / "fer-client"), "predict", str(images), "--model", str(run_dir / "model.pt")], cwd=tmp,
                    timeout=300)
    assert default.returncode == explicit.returncode == 0, default.stderr + explicit.stderr
    assert len(default.stdout.splitlines()) == len(frames)
    assert default.stdout == explicit.stdout


def test_sigkilled_server_leaves_nothing_running_and_resume_finishes_every_round_once(tmp_path):
    """fer-server is SIGKILLed in round 2 after every node released its update: no process of its tree survives;
    `fer-server resume` re-runs round 2 (each node re-sends its update at no new cost) and round 3; every round is
    logged once, report.md and plots are written, and each node's ledger is what the run reported. A stock
    SuperNode takes part; fer-client then stops on SIGTERM, saying what its ledger holds."""
    # Prepare
    # Two nodes keep it affordable: one fer-client and one stock flower-supernode.
    _make_site(tmp_path, ["a", "stock"])
    run_dir, state_dir = tmp_path / "run", tmp_path / "srv"
    nodes = {"site-a": tmp_path / "node-a", "stock-stock": tmp_path / "node-stock"}
    processes: list[subprocess.Popen] = []
    try:
        server, port = _start_server(
            tmp_path, lambda port: _server_args(port, "--out", "run", "--rounds", "3", "--min-clients", "2",
                                                "--dp-epsilon", "50", "--local-epochs", "1",
                                                "--enroll", "keys/a.pub", "--enroll", "keys/stock.pub"),
            tmp_path / "server.log")
        processes.append(server)
        client = _spawn(_client_args(port, "a", dataset=SMALL), tmp_path / "client-a.log", cwd=tmp_path)
        processes.append(client)
        nodes["stock-stock"].mkdir()
        from privacy.ledger import generate_key_file

        generate_key_file(nodes["stock-stock"] / "ledger.key")
        processes.append(_spawn(_stock_supernode_args(tmp_path, port, "stock", with_ca=True, dataset=SMALL),
                                tmp_path / "stock.log",
                                cwd=tmp_path))
        _wait_for_text(tmp_path / "server.log", "round 1/3", timeout=300, process=server)
        # Made deterministic: once round 2's messages are out (a node charged round 2), the ServerApp is frozen,
        # so it cannot aggregate round 2 before the kill however fast the nodes are; then every node releases
        # its round-2 update, and the coordinator dies holding replies it never used.
        _wait_until(lambda: any(2 in _charged_rounds(d) for d in nodes.values()), timeout=300,
                    what="a node to charge round 2")
        serverapps = [p for p in descendants(server.pid) if "flwr-serverapp" in cmdline(p)]
        assert serverapps, _tree(server.pid)
        for pid in serverapps:
            os.kill(pid, signal.SIGSTOP)
        _wait_until(lambda: all(_released_round(d) == 2 for d in nodes.values()), timeout=300,
                    what="every node to release its round-2 update")
        tree = _tree(server.pid)

        # Execute
        os.kill(server.pid, signal.SIGKILL)  # the coordinator is OOM-killed: no clean shutdown, no finally
        server.wait(timeout=10)
        left = _left_over(tree, mentioning=str(state_dir), timeout=30)
        resumed = _spawn([str(BIN / "fer-server"), "resume", "run", "--certs", "certs", "--state-dir", "srv",
                          "--port", str(port), "--host", "127.0.0.1", "--timeout", "400"],
                         tmp_path / "resume.log", cwd=tmp_path)
        processes.append(resumed)
        resumed_rc = resumed.wait(timeout=450)
        client_tree = _tree(client.pid)
        client.send_signal(signal.SIGTERM)
        client_rc = client.wait(timeout=30)
        client_left = _left_over(client_tree, mentioning=str(nodes["site-a"]), timeout=10)
    finally:
        for process in processes:
            stop_tree(process, timeout=3)

    # Assert
    assert len(tree) >= 4, tree  # fer-server, supervisor, SuperLink, SuperExec, ServerApp
    assert left == {}, f"processes of the killed fer-server still running: {left}"
    resume_log = (tmp_path / "resume.log").read_text()
    assert resumed_rc == 0, resume_log[-3000:]
    assert "resuming" in resume_log and "after round 1" in resume_log
    assert _rounds(run_dir) == [0, 1, 2, 3]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["fit"]["num_accepted"] for r in records[1:]] == [2, 2, 2]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
    assert _report_rounds(run_dir / "report.md") == ["0", "1", "2", "3"]
    shown = re.findall(r"\]\((plots/[^)]+\.png)\)", (run_dir / "report.md").read_text())
    assert {"plots/accuracy.png", "plots/loss.png", "plots/privacy.png"} <= set(shown), shown
    for plot in shown:
        assert (run_dir / plot).stat().st_size > 0, plot
    # The coordinator's ledger record outlived the killed ServerApp: it is in its state folder, not the process.
    marks = json.loads((tmp_path / "srv" / "node-ledgers.json").read_text())["nodes"]
    assert set(marks) == set(nodes)
    reported = {c["client_id"]: c for c in json.loads((run_dir / "privacy.json").read_text())["clients"]}
    from privacy.ledger import read_ledger

    for client_id, node_dir in nodes.items():
        # Round 2 charged once: the resumed round 2 was answered from the released update, not trained again.
        assert _charged_rounds(node_dir) == [1, 2, 3], client_id
        spent = read_ledger(node_dir / "privacy.ledger", key_file=node_dir / "ledger.key")[1][-1].epsilon_after
        assert reported[client_id]["epsilon_spent"] == pytest.approx(spent, rel=1e-9)
    client_log = (tmp_path / "client-a.log").read_text()
    assert client_rc == 128 + signal.SIGTERM, client_log[-2000:]
    assert "stopped on SIGTERM; no round was in progress; privacy ledger: rounds 1, 2, 3 charged" in client_log
    assert client_left == {}


def _insecure_server_args(port: int, state: str, out: str) -> list[str]:
    # Two nodes are never reached here, so no run is ever submitted: the server only holds its port and folders.
    return [str(BIN / "fer-server"), "--insecure", "--state-dir", state, "--out", out, "--port", str(port),
            "--host", "127.0.0.1", "--dataset", "synthetic=50", "--rounds", "1", "--min-clients", "2"]


def _insecure_client_args(port: int, state: str) -> list[str]:
    return [str(BIN / "fer-client"), "start", "--insecure", "--server", f"127.0.0.1:{port}",
            "--dataset", "synthetic=50", "--client-id", state, "--state-dir", state, "--new-privacy-ledger"]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_busy_port_state_or_run_dir_refuses_a_second_start_and_sigint_stops_a_background_client(tmp_path):
    """A second fer-server on a held port, state directory or run directory, and a second fer-client on a held state
    directory, each exit 1 with one line naming the holder's pid and write nothing; a fer-client and a fer-server
    started with SIGINT ignored (background jobs) still stop on SIGINT within seconds, leaving no process and free
    locks."""
    # Prepare
    from client.lifetime import InstanceLock

    squatter = subprocess.Popen(
        [sys.executable, "-c", "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
                               "print(s.getsockname()[1], flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    processes: list[subprocess.Popen] = [squatter]
    try:
        held_port = int(squatter.stdout.readline())
        server, port = _start_server(tmp_path, lambda port: _insecure_server_args(port, "srv", "run"),
                                     tmp_path / "server.log", sigint_ignored=True)
        processes.append(server)
        client = _spawn(_insecure_client_args(port, "node"), tmp_path / "client.log", cwd=tmp_path,
                        sigint_ignored=True)
        processes.append(client)
        # The SuperNode is up with its SuperExec under it: a stop that orphaned them would show below.
        _wait_until(lambda: any("flower-superexec" in cmdline(p) for p in descendants(client.pid)), timeout=120,
                    what="fer-client's SuperNode and SuperExec")

        # Execute
        on_port = _run_to_exit(_insecure_server_args(held_port, "srv-b", "run-b"), tmp_path / "on-port.log",
                               cwd=tmp_path, timeout=90)
        on_state = _run_to_exit(_insecure_server_args(free_port(), "srv", "run-c"), tmp_path / "on-state.log",
                                cwd=tmp_path, timeout=90)
        on_run = _run_to_exit(_insecure_server_args(free_port(), "srv-d", "run"), tmp_path / "on-run.log",
                              cwd=tmp_path, timeout=90)
        on_node = _run_to_exit(_insecure_client_args(port, "node"), tmp_path / "on-node.log", cwd=tmp_path,
                               timeout=90)
        srv_holder = InstanceLock.holder_of(tmp_path / "srv" / "fer-server.lock")
        client_tree = _tree(client.pid)
        client.send_signal(signal.SIGINT)
        client_rc = client.wait(timeout=30)
        client_left = _left_over(client_tree, mentioning=str(tmp_path / "node"), timeout=10)
        server_tree = _tree(server.pid)
        server.send_signal(signal.SIGINT)
        server_rc = server.wait(timeout=30)
        server_left = _left_over(server_tree, mentioning=str(tmp_path / "srv"), timeout=10)
    finally:
        for process in processes:
            stop_tree(process, timeout=3)

    # Assert
    for (rc, output), holder, hint in ((on_port, squatter.pid, "--port"), (on_state, server.pid, "--state-dir"),
                                       (on_run, server.pid, "kill"), (on_node, client.pid, "--state-dir")):
        assert rc == 1, output
        assert len(_error_lines(output)) == 1, output
        assert f"pid {holder}" in _error_lines(output)[0] and hint in _error_lines(output)[0], output
    assert "run directory" in on_run[1] and "state directory" in on_state[1]
    for never_created in ("srv-b", "run-b", "run-c", "srv-d", "run"):
        assert not (tmp_path / never_created).exists(), never_created
    # The holders' locks still name them: the refused starts did not take over or rewrite them.
    assert srv_holder.pid == server.pid
    client_log = (tmp_path / "client.log").read_text()
    assert client_rc == 128 + signal.SIGINT, client_log[-2000:]
    assert "stopped on SIGINT; no round was in progress; privacy ledger: no DP round charged" in client_log
    assert len(client_tree) >= 4, client_tree  # fer-client, supervisor, SuperNode, SuperExec
    assert client_left == {}
    assert InstanceLock.holder_of(tmp_path / "node" / "fer-client.lock") is None
    assert server_rc == 130 and server_left == {}, (server_rc, server_left)
    assert InstanceLock.holder_of(tmp_path / "srv" / "fer-server.lock") is None
