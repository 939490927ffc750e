"""Faults in a real deployment over loopback: real `fer-server` and `fer-client` processes, TLS and enrolled keys.

Two federations serve every test here (they are the expensive part; each is a module-scoped fixture, so its cost
shows in the setup time of the first test that uses it):

- **SecAgg+ with sites killed mid-round** (5 sites, DP-SGD, `--secure-agg`, 5 shares, threshold 3): in round 1
  site c is killed with SIGKILL while it trains (after its ledger charged the round, before its masked update left)
  and restarted once round 1 is over; in round 2 sites d and e are killed the same way. Site a runs with
  `--require-secure-agg`. DP makes every node keep the update it released (client/replay.py), which is how the
  tests recompute the survivors' aggregate and compare it with what the server applied.
- **Ten plain sites** (2 rounds, no DP, no SecAgg+), one of them started with `--require-secure-agg`, which must
  refuse every plain round while the nine others train.

"Killed" means the site's machine dies: SIGKILL to `fer-client` and to every process it started (its SuperNode and
ClientApps), so nothing gets to clean up. The SuperLink sees such a node only as one that stopped heartbeating.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from client.deploy import free_port, generate_node_keys, stop_tree
from tests.test_deploy_e2e import BIN, _client_args, _rounds, _run, _server_args, _spawn, _wait_for_text

# One federation is set up inside the first test that uses it: the limit covers it on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# CNN-AM: of the registered models the fastest to train on CPU here (3 SGD steps of 64 faces: 0.36 s against
# DMSNet-IoT's 0.68 s, OMP_NUM_THREADS=1), and its federated build uses book-keeping DP clipping. No client
# evaluation: the server's own test split scores each round, so a round costs one ClientApp per node.
_COMMON_CONFIG = """\
model = "cnn_am"
dataset = "synthetic=200"
local-epochs = 1
batch-size = 32
fraction-evaluate = 0.0
"""
# Under SecAgg+ the quantisation step is 2 x max-update-norm / 2**24 per weighted value; a small clip and a
# max-weight equal to the largest site's example count keep the decoded aggregate within ~3e-6 of the exact one,
# far below the size of one DP update (so the aggregate check below can tell a wrong set of survivors from rounding).
MAX_UPDATE_NORM = 10.0
MAX_WEIGHT = 2000
SECAGG_CONFIG = _COMMON_CONFIG + f"""\
max-update-norm = {MAX_UPDATE_NORM}
secagg-max-weight = {float(MAX_WEIGHT)}
"""
SECAGG_SITES = ("a", "b", "c", "d", "e")
SMALL_DATA = "synthetic=200"  # 200 training faces per site
# The sites to be killed hold more data, so their DP training (after the ledger charge, before the reply) lasts
# seconds: the window in which the test kills them. 2000 training faces are ~16 DP-SGD steps of 128.
VICTIM_DATA = f"synthetic={MAX_WEIGHT}"
DP_EPSILON = 8.0
DP_DELTA = 1e-5
PLAIN_SITES = tuple(f"s{i:02d}" for i in range(10))
PLAIN_DATA = "synthetic=100"
REFUSING_SITE = PLAIN_SITES[-1]
REFUSAL = "requires secure aggregation"
NODE_UNAVAILABLE = "Node Unavailable"


@dataclass
class Federation:
    """What a finished loopback federation left behind, for the tests to read."""

    tmp: Path
    run_dir: Path
    server_rc: int
    seconds: float
    released: dict[tuple[str, int], tuple[np.ndarray, int]] = field(default_factory=dict)

    def finished(self) -> Federation:
        """This federation, after checking that fer-server exited 0 (the failure shows its log's tail)."""
        assert self.server_rc == 0, self.log("server.log")[-3000:]
        return self

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def log(self, name: str) -> str:
        return (self.tmp / name).read_text(errors="replace")


def _make_keys(tmp: Path, names: tuple[str, ...], config: str) -> None:
    """Certificates for loopback, one node key pair per site (in-process: ten `fer-client keygen` runs cost ~20 s
    of interpreter start-up on this machine) and the run config."""
    assert _run([str(BIN / "fer-server"), "certs", "--out", "certs"], cwd=tmp).returncode == 0
    for name in names:
        generate_node_keys(out_dir=tmp / "keys", name=name)
    (tmp / "run.toml").write_text(config)


def _enrol(names: tuple[str, ...]) -> list[str]:
    return [arg for name in names for arg in ("--enroll", f"keys/{name}.pub")]


def _open_ledger(node_dir: Path, client_id: str):
    """The node's privacy ledger, read with privacy.ledger's own reader (verifies key, anchor and sequence)."""
    from privacy.ledger import PrivacyLedger

    return PrivacyLedger.open(node_dir / "privacy.ledger", key_file=node_dir / "ledger.key",
                              anchor_path=node_dir / "ledger.anchor", client_id=client_id,
                              budget_epsilon=DP_EPSILON, delta=DP_DELTA)


def _charged_rounds(node_dir: Path, client_id: str) -> list[int]:
    """Rounds the node's ledger has charged so far; [] before its first DP round. Never creates a ledger."""
    from privacy.ledger import LedgerError

    if not (node_dir / "privacy.ledger").exists():
        return []
    try:
        return [r.server_round for r in _open_ledger(node_dir, client_id).rounds]
    except LedgerError:  # the node is between its ledger and anchor writes: look again
        return []


class _ReleaseWatcher(threading.Thread):
    """Keeps a copy of every update a node releases (client/replay.py keeps only the latest one on disk).

    The file is replaced atomically, so each read sees one whole version.
    """

    def __init__(self, tmp: Path, names: tuple[str, ...]) -> None:
        super().__init__(daemon=True)
        self.tmp, self.names = tmp, names
        self.released: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.poll()
            self.halt.wait(0.25)

    def poll(self) -> None:
        from client.replay import RELEASED_UPDATE

        for name in self.names:
            path = self.tmp / f"node-{name}" / RELEASED_UPDATE
            try:
                with np.load(path, allow_pickle=False) as data:
                    meta = json.loads(str(data["meta"]))
                    key = (name, int(meta["server_round"]))
                    if key not in self.released:
                        self.released[key] = (data["a0"].astype(np.float64), int(meta["num_examples"]))
            except (OSError, ValueError, KeyError):
                continue


def _kill_when_charged(processes: dict[str, subprocess.Popen], tmp: Path, victims: tuple[str, ...], *,
                       server_round: int, server: subprocess.Popen, timeout: float) -> None:
    """SIGKILLs each victim's whole process tree as soon as its ledger has charged `server_round`: it is then
    training that round, and its update has not left yet."""
    pending = set(victims)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            if server_round in _charged_rounds(tmp / f"node-{name}", f"site-{name}"):
                stop_tree(processes[name], kill=True)
                pending.discard(name)
        if server.poll() is not None:
            break
        time.sleep(0.1)
    assert not pending, f"{sorted(pending)} never charged round {server_round}"


def _wait_for_round(run_dir: Path, server_round: int, *, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and server_round in _rounds(run_dir):
            return
        assert server.poll() is None, f"the server exited before round {server_round} was logged"
        time.sleep(0.5)
    raise AssertionError(f"round {server_round} not logged within {timeout} s")


def _federation_dir(tmp_path_factory, name: str, sites: tuple[str, ...], config: str) -> tuple[Path, int]:
    """A new folder holding the sites' keys and node configs, and a free port for the SuperLink."""
    tmp = tmp_path_factory.mktemp(name)
    _make_keys(tmp, sites, config)
    return tmp, free_port()


@pytest.fixture(scope="module")
def secagg_federation(tmp_path_factory) -> Federation:
    """5 SecAgg+ sites under DP: c killed in round 1 and restarted, d and e killed in round 2."""
    started = time.monotonic()
    tmp, port = _federation_dir(tmp_path_factory, "secagg", SECAGG_SITES, SECAGG_CONFIG)
    run_dir = tmp / "run"
    processes: dict[str, subprocess.Popen] = {}
    watcher = _ReleaseWatcher(tmp, SECAGG_SITES)

    def start_site(name: str, log: str, *, first_start: bool = True) -> None:
        data = VICTIM_DATA if name in ("c", "d", "e") else SMALL_DATA
        extra = ["--require-secure-agg"] if name == "a" else []
        processes[name] = _spawn(_client_args(port, name, *extra, dataset=data, first_start=first_start),
                                 tmp / log, cwd=tmp)

    try:
        server = _spawn(_server_args(port, "--out", "run", "--rounds", "2", "--min-clients", "5", "--secure-agg",
                                     "--secagg-shares", "5", "--secagg-threshold", "3", "--dp-epsilon",
                                     str(DP_EPSILON), "--dp-delta", str(DP_DELTA), "--timeout", "1200",
                                     # The SuperLink reports a dead node itself (missed heartbeats), which ends
                                     # a stage; the timeout only spares a live site starved by a busy machine.
                                     "--secagg-timeout", "600",
                                     *_enrol(SECAGG_SITES)),
                        tmp / "server.log", cwd=tmp)
        processes["server"] = server
        _wait_for_text(tmp / "server.log", "waiting for", timeout=120, process=server)
        for name in SECAGG_SITES:
            start_site(name, f"client-{name}.log")
        watcher.start()

        # Round 1: c dies while training. The SuperLink reports it unavailable once its heartbeat lapses (Flower
        # 1.41: within 2 x 30 s), the round goes on with four.
        _kill_when_charged(processes, tmp, ("c",), server_round=1, server=server, timeout=600)
        _wait_for_round(run_dir, 1, server=server, timeout=600)
        # Restarted only now: a node that is back online before the server gives up on its in-flight message is
        # not reported unavailable, and the stage would wait out secagg-timeout. min-clients 5 holds round 2
        # until c is back.
        start_site("c", "client-c-restarted.log", first_start=False)
        _kill_when_charged(processes, tmp, ("d", "e"), server_round=2, server=server, timeout=600)
        server_rc = server.wait(timeout=900)
    finally:
        watcher.halt.set()
        for process in processes.values():
            stop_tree(process, timeout=3)
    watcher.join(timeout=5)
    watcher.poll()
    return Federation(tmp=tmp, run_dir=run_dir, server_rc=server_rc, seconds=time.monotonic() - started,
                      released=dict(watcher.released))


@pytest.fixture(scope="module")
def plain_federation(tmp_path_factory) -> Federation:
    """10 plain sites for 2 rounds; one of them requires SecAgg+."""
    started = time.monotonic()
    tmp, port = _federation_dir(tmp_path_factory, "plain", PLAIN_SITES, _COMMON_CONFIG)
    processes: list[subprocess.Popen] = []
    try:
        server = _spawn(_server_args(port, "--out", "run", "--rounds", "2", "--min-clients", str(len(PLAIN_SITES)),
                                     "--timeout", "1200", *_enrol(PLAIN_SITES)),
                        tmp / "server.log", cwd=tmp)
        processes.append(server)
        _wait_for_text(tmp / "server.log", "waiting for", timeout=120, process=server)
        for name in PLAIN_SITES:
            extra = ["--require-secure-agg"] if name == REFUSING_SITE else []
            processes.append(_spawn(_client_args(port, name, *extra, dataset=PLAIN_DATA),
                                    tmp / f"client-{name}.log", cwd=tmp))
        server_rc = server.wait(timeout=900)
    finally:
        for process in processes:
            stop_tree(process, timeout=3)
    return Federation(tmp=tmp, run_dir=tmp / "run", server_rc=server_rc, seconds=time.monotonic() - started)


def _global_weights(run_dir: Path, server_round: int) -> np.ndarray:
    """The global model after `server_round` as the flat vector that travels (round 0: the seeded initial model)."""
    from client import wire
    from client.config import RunSettings
    from models import create_model
    from models.files import load_model
    from server.server_app import initial_weights

    settings = RunSettings.from_run_config(json.loads((run_dir / "config.json").read_text()))
    if server_round == 0:
        return initial_weights(settings)[0].astype(np.float64)
    state, _ = load_model(run_dir / "checkpoints" / f"round-{server_round:03d}.pt")
    model = create_model(settings.model, dp=True)
    model.load_state_dict(state)
    return wire.get_weights(model)[0].astype(np.float64)


def _assert_secagg_aggregate(fed: Federation, server_round: int, survivors: tuple[str, ...]) -> None:
    """The global step of `server_round` is the example-weighted mean of exactly the survivors' released updates,
    within SecAgg+'s quantisation bound (server/secagg.py: n x 2 x clip / 2**24 / sum(n_i / max_weight))."""
    updates = {name: fed.released[(name, server_round)] for name in survivors}
    total = sum(n for _, n in updates.values())
    expected = sum(delta * n for delta, n in updates.values()) / total
    applied = _global_weights(fed.run_dir, server_round) - _global_weights(fed.run_dir, server_round - 1)
    # Each survivor's stochastic rounding is off by less than one level; 5 % and 1e-6 cover the rounding of the
    # integer weights and of the float32 checkpoints the global steps are read from.
    bound = len(survivors) * 2 * MAX_UPDATE_NORM / 2**24 / (total / MAX_WEIGHT) * 1.05 + 1e-6
    error = float(np.max(np.abs(applied - expected)))
    assert error <= bound, (server_round, error, bound)
    # Every survivor is really in the sum: leaving any one out moves the mean far beyond the bound.
    for left_out in survivors:
        rest = [updates[name] for name in survivors if name != left_out]
        other = sum(delta * n for delta, n in rest) / sum(n for _, n in rest)
        assert float(np.max(np.abs(applied - other))) > 10 * bound, (server_round, left_out)


def test_secagg_round_completes_without_the_site_killed_mid_round(secagg_federation):
    """Round 1 of 5 SecAgg+ sites: c is SIGKILLed while training; the round aggregates exactly the other four."""
    # Prepare
    fed = secagg_federation.finished()

    # Execute
    record = fed.records()[1]

    # Assert
    assert record["round"] == 1
    assert record["fit"]["failed"] is False
    assert record["fit"]["num_clients"] == 4
    assert record["fit"]["num_accepted"] == 4
    assert sorted(record["fit"]["clients"]) == ["site-a", "site-b", "site-d", "site-e"]
    assert [NODE_UNAVAILABLE in f for f in record["fit"]["failures"]] == [True]
    assert ("c", 1) not in fed.released, "c released its round-1 update before it was killed"
    _assert_secagg_aggregate(fed, 1, ("a", "b", "d", "e"))


def test_secagg_round_completes_without_two_sites_killed_mid_round(secagg_federation):
    """Round 2: d and e are SIGKILLed while training; threshold 3 of 5 still unmasks the sum of a, b and c."""
    # Prepare
    fed = secagg_federation.finished()

    # Execute
    records = fed.records()
    summary = fed.summary()

    # Assert
    assert [r["round"] for r in records] == [0, 1, 2]
    assert summary["failed_rounds"] == []
    assert summary["secure_aggregation"] is True
    fit = records[2]["fit"]
    assert fit["failed"] is False
    assert (fit["num_clients"], fit["num_accepted"]) == (3, 3)
    assert sorted(fit["clients"]) == ["site-a", "site-b", "site-c"]
    assert [NODE_UNAVAILABLE in f for f in fit["failures"]] == [True, True]
    assert ("d", 2) not in fed.released and ("e", 2) not in fed.released, "a victim released before it was killed"
    _assert_secagg_aggregate(fed, 2, ("a", "b", "c"))


def test_killed_site_ledger_matches_its_spend_after_restart(secagg_federation):
    """The site killed mid-round 1 and restarted: its ledger holds the charge of the round it died in plus round 2,
    and the ε the server reports for it is exactly its ledger's; sites killed for good are under-reported by the
    server (it never heard of their last charge), and their ledgers still hold it."""
    # Prepare
    fed = secagg_federation.finished()
    privacy = json.loads((fed.run_dir / "privacy.json").read_text())
    reported = {c["client_id"]: c["epsilon_spent"] for c in privacy["clients"]}

    # Execute
    ledgers = {name: _open_ledger(fed.tmp / f"node-{name}", f"site-{name}") for name in SECAGG_SITES}

    # Assert
    assert "NEW PRIVACY LEDGER" not in fed.log("client-c-restarted.log")  # same key, same ledger
    assert "NEW PRIVACY LEDGER" in fed.log("client-c.log")
    records = fed.records()
    assert "site-c" not in records[1]["privacy"]  # the server heard nothing from c in round 1...
    # ...and c's round-2 reply carries its whole spend, the charge of the round it was killed in included.
    assert records[2]["privacy"]["site-c"]["epsilon_spent"] == pytest.approx(ledgers["c"].spent_epsilon, rel=1e-12)
    for name in ("a", "b", "c"):
        assert [r.server_round for r in ledgers[name].rounds] == [1, 2], name
        assert reported[f"site-{name}"] == pytest.approx(ledgers[name].spent_epsilon, rel=1e-12), name
        assert 0 < ledgers[name].spent_epsilon <= DP_EPSILON
    for name in ("d", "e"):
        rounds = ledgers[name].rounds
        assert [r.server_round for r in rounds] == [1, 2], name
        assert reported[f"site-{name}"] == pytest.approx(rounds[0].epsilon_after, rel=1e-12), name
        assert ledgers[name].spent_epsilon > reported[f"site-{name}"]


def test_site_requiring_secure_agg_trains_under_secagg(secagg_federation):
    """Site a runs with --require-secure-agg and takes part in every SecAgg+ round (the flag refuses nothing here)."""
    # Prepare
    fed = secagg_federation

    # Execute
    fits = [r["fit"] for r in fed.records()[1:]]

    # Assert
    assert [("site-a" in fit["clients"]) for fit in fits] == [True, True]
    assert REFUSAL not in fed.log("client-a.log")


def test_ten_sites_train_two_rounds(plain_federation):
    """10 real fer-client processes: both rounds get a reply from every site, nine updates aggregated each round."""
    # Prepare
    fed = plain_federation.finished()

    # Execute
    records = fed.records()
    summary = fed.summary()

    # Assert
    assert [r["round"] for r in records] == [0, 1, 2]
    assert summary["rounds"] == 2 and summary["failed_rounds"] == []
    trainers = sorted(f"site-{name}" for name in PLAIN_SITES if name != REFUSING_SITE)
    for record in records[1:]:
        fit = record["fit"]
        assert (fit["num_clients"], fit["num_accepted"], fit["num_rejected"]) == (9, 9, 0)
        assert sorted(fit["clients"]) == trainers
        assert len(fit["failures"]) == 1
    steps = [_global_weights(fed.run_dir, r) - _global_weights(fed.run_dir, r - 1) for r in (1, 2)]
    assert all(np.all(np.isfinite(step)) and np.linalg.norm(step) > 0 for step in steps)


def test_site_requiring_secure_agg_refuses_plain_rounds(plain_federation):
    """The --require-secure-agg site refuses both plain rounds: the server records its reason, its log says so."""
    # Prepare
    fed = plain_federation.finished()

    # Execute
    failures = [r["fit"]["failures"] for r in fed.records()[1:]]

    # Assert
    assert [len(f) for f in failures] == [1, 1]
    assert all(REFUSAL in f[0] and "plain update" in f[0] for f in failures), failures
    assert REFUSAL in fed.log(f"client-{REFUSING_SITE}.log")
    assert REFUSAL not in fed.log(f"client-{PLAIN_SITES[0]}.log")
