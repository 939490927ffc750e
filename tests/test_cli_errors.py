"""What a user sees when a command cannot do what was asked: exit code 1 and one stderr line naming the option, file
or row, no traceback and nothing half-written; plus the two fer-sim commands no other test runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from server.rundir import RunDirectory

BIN = Path(sys.executable).parent
INSECURE_WARNING = "WARNING: --insecure"


def _cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Runs an installed command (fer-sim, fer-server, fer-client) as a user would, in `cwd`."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    """stderr without the --insecure warning, which the commands print first on purpose."""
    return [line for line in stderr.splitlines() if not line.startswith(INSECURE_WARNING)]


def _nothing(root: Path) -> None:
    """No files needed."""


def _fake_credentials(root: Path) -> None:
    """A CA certificate and a node key that exist (their contents are checked later than these errors)."""
    (root / "ca.crt").write_text("not checked yet")
    (root / "node.key").write_text("not checked yet")


def _non_empty_out(root: Path) -> None:
    (root / "out").mkdir()
    (root / "out" / "notes.txt").write_text("an earlier run's notes")


def _toml(text: str) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        (root / "run.toml").write_text(text)

    return write


def _run_dir(*, config: dict | str, checkpoint_model: str | None = None, rounds_done: int = 1,
             schema_version: int | None = None) -> Callable:
    """A fer-server run directory with `config` (a dict, or raw text for a damaged file) and a checkpoint; with
    `schema_version`, its metrics.jsonl holds round 0 as a fer-fl of that schema version wrote it."""

    def make(root: Path) -> None:
        run = RunDirectory(root / "run")
        if isinstance(config, str):
            run.write_config({})
            (root / "run" / "config.json").write_text(config)
        else:
            run.write_config({**config, "out-dir": str(root / "run")})
        if checkpoint_model is not None:
            from models import create_model

            state = create_model(checkpoint_model, dp=True).state_dict()
            run.save_model(state, model_name=checkpoint_model, model_cfg={"dp": True}, round=rounds_done,
                           checkpoint=True)
        if schema_version is not None:
            from server.records import RoundRecord

            line = {**RoundRecord(round=0, server={"accuracy": 0.1}).to_json(), "schema_version": schema_version}
            (root / "run" / "metrics.jsonl").write_text(json.dumps(line) + "\n")

    return make


def _saved_model(*, tamper: bool = False, schema_version: int | None = None) -> Callable[[Path], None]:
    """A model.pt + model.json as a run writes them (optionally changed after saving, or its card marked as written
    under another schema version)."""

    def make(root: Path) -> None:
        from models import create_model

        run = RunDirectory(root / "run")
        path = run.save_model(create_model("cnn_am", dp=True).state_dict(), model_name="cnn_am",
                              model_cfg={"dp": True}, round=1)
        if tamper:
            with open(path, "ab") as handle:
                handle.write(b"appended")
        if schema_version is not None:
            card = path.with_suffix(".json")
            card.write_text(json.dumps({**json.loads(card.read_text()), "schema_version": schema_version}))

    return make


CLIENT = ("fer-client", "start", "--server", "127.0.0.1:1", "--dataset", "synthetic=10")
CREDENTIALS = ("--ca-cert", "ca.crt", "--key", "node.key")
SERVER = ("fer-server", "--out", "out", "--insecure", "--port", "1")

# (command line, setup, the error line after "PROG: error: ", paths that must not exist afterwards)
CASES = {
    "client-bad-profile": ((*CLIENT, *CREDENTIALS, "--profile", "gpu"), _fake_credentials,
                           "--profile must be one of hospital, iot; got 'gpu'", []),
    "client-missing-ledger-key": ((*CLIENT, "--insecure", "--ledger-key", "site.key"), _nothing,
                                  "--ledger-key file {root}/site.key does not exist: a new node's first start is "
                                  "`fer-client start --new-privacy-ledger ...`", []),
    "client-no-ca": (CLIENT, _nothing, "--ca-cert is required (or --insecure for a local test)", []),
    "client-no-key": ((*CLIENT, "--ca-cert", "ca.crt"), _fake_credentials,
                      "--key is required (or --insecure for a local test)", []),
    "server-non-empty-out": (SERVER, _non_empty_out,
                             "run directory {root}/out already exists and is not empty; choose another --out", []),
    "server-missing-enroll-key": ((*SERVER, "--enroll", "site-a.pub"), _nothing,
                                  "public key file site-a.pub does not exist", ["out"]),
    "server-missing-config": ((*SERVER, "--config", "run.toml"), _nothing, "config file run.toml does not exist",
                              ["out"]),
    "server-config-not-toml": ((*SERVER, "--config", "run.toml"), _toml("rounds = ["),
                               "run.toml: not valid TOML (", ["out"]),
    "server-config-unknown-key": ((*SERVER, "--config", "run.toml"), _toml('colour = "blue"'),
                                  "unknown run-config key 'colour'; known keys: dataset, ", ["out"]),
    "server-config-bad-value": ((*SERVER, "--config", "run.toml"), _toml('num-server-rounds = "many"'),
                                "run-config key 'num-server-rounds' expects int, got 'many'", ["out"]),
    "resume-no-checkpoint": (("fer-server", "resume", "run", "--insecure"), _run_dir(config={"model": "cnn_am"}),
                             "{root}/run has no checkpoint yet; start the run again with `fer-server start`", []),
    "resume-other-models-checkpoint": (
        ("fer-server", "resume", "run", "--insecure", "--port", "1", "--timeout", "5"),
        _run_dir(config={"model": "dmsnet_iot", "num-server-rounds": 3}, checkpoint_model="cnn_am"),
        "checkpoint {root}/run/checkpoints/round-001.pt holds model 'cnn_am' but the run's config.json says "
        "'dmsnet_iot'", []),
    "resume-config-not-json": (("fer-server", "resume", "run", "--insecure"),
                               _run_dir(config='{"model": "cnn_am",', checkpoint_model="cnn_am"),
                               "{root}/run/config.json: not a readable JSON run config (", []),
    "resume-config-unknown-key": (("fer-server", "resume", "run", "--insecure"),
                                  _run_dir(config={"colour": "blue"}, checkpoint_model="cnn_am"),
                                  "{root}/run/config.json: unknown run-config key 'colour'", []),
    "resume-unknown-schema-version": (("fer-server", "resume", "run", "--insecure"),
                                      _run_dir(config={"model": "cnn_am"}, checkpoint_model="cnn_am",
                                               schema_version=99),
                                      "{root}/run/metrics.jsonl:1: schema_version 99 is not one this fer-fl reads (1)",
                                      []),
    "run-unknown-model": (("fer-sim", "run", "--dataset", "synthetic=20", "--model", "resnet9000", "--out", "out"),
                          _nothing, "--model 'resnet9000' is unknown; known: cnn_am, ", ["out"]),
    "run-missing-data": (("fer-sim", "run", "--dataset", "faces=no-such-dir", "--out", "out"), _nothing,
                         "no-such-dir: no such file or folder", ["out"]),
    "run-too-many-clients": (("fer-sim", "run", "--dataset", "synthetic=20", "--num-clients", "5", "--out", "out"),
                             _nothing, "20 samples cannot give 5 clients at least 10 samples each", ["out"]),
    "run-non-empty-out": (("fer-sim", "run", "--dataset", "synthetic=20", "--out", "out"), _non_empty_out,
                          "run directory out already exists and is not empty", []),
    "run-missing-config": (("fer-sim", "run", "--config", "run.toml", "--out", "out"), _nothing,
                           "config file run.toml does not exist", ["out"]),
    "centralized-private": (("fer-sim", "centralized", "--dataset", "synthetic=20", "--dp-epsilon", "3", "--out",
                             "out"), _nothing, "fer-sim centralized trains without privacy", ["out"]),
    "centralized-local-splits": (("fer-sim", "centralized", "--dataset", "synthetic=20", "--local-splits", "4",
                                  "--out", "out"), _nothing,
                                 "fer-sim centralized trains whole passes a round; drop --local-splits", ["out"]),
    "centralized-ntd-beta": (("fer-sim", "centralized", "--dataset", "synthetic=20", "--ntd-beta", "1", "--out",
                              "out"), _nothing,
                             "fer-sim centralized has no global model to distill from; drop --ntd-beta", ["out"]),
    "run-ntd-beta-with-dp": (("fer-sim", "run", "--dataset", "synthetic=20", "--ntd-beta", "1", "--dp-epsilon", "3",
                              "--out", "out"), _nothing,
                             "ntd-beta 1.0 distills towards the global model in non-private training", ["out"]),
    "centralized-keep-momentum": (("fer-sim", "centralized", "--dataset", "synthetic=20", "--keep-momentum",
                                   "--out", "out"), _nothing,
                                  "fer-sim centralized keeps one optimiser for the whole run; drop --keep-momentum",
                                  ["out"]),
    "run-keep-momentum-with-adam": (("fer-sim", "run", "--dataset", "synthetic=20", "--keep-momentum", "--optimizer",
                                     "adam", "--out", "out"), _nothing,
                                    "keep-momentum carries SGD's momentum between rounds; optimizer adam has none",
                                    ["out"]),
    "run-negative-public-batch-size": (("fer-sim", "run", "--dataset", "synthetic=20", "--public-batch-size", "-3",
                                        "--out", "out"), _nothing,
                                       "public-batch-size and public-lr must be >= 0", ["out"]),
    "run-local-splits-with-dp": (("fer-sim", "run", "--dataset", "synthetic=20", "--local-splits", "4",
                                  "--dp-epsilon", "3", "--out", "out"), _nothing,
                                 "local-splits 4 trains on a slice of each site's data a round", ["out"]),
    "run-logit-adjust-public-without-slice": (("fer-sim", "run", "--dataset", "synthetic=20", "--class-balance",
                                               "logit-adjust", "--out", "out"), _nothing,
                                              "label-prior 'public' is the public slice's label mix: it needs "
                                              "public-fraction > 0", ["out"]),
    "run-bad-label-prior": (("fer-sim", "run", "--dataset", "synthetic=20", "--class-balance", "logit-adjust",
                             "--label-prior", "1,2,0", "--out", "out"), _nothing,
                            "label-prior must be public, uniform or 7 positive class counts", ["out"]),
    "run-server-learning-without-slice": (("fer-sim", "run", "--dataset", "synthetic=20", "--server-learning",
                                           "--out", "out"), _nothing,
                                          "server-learning trains the global model on the public slice after every "
                                          "round: it needs public-fraction > 0", ["out"]),
    "centralized-head-refit-without-slice": (("fer-sim", "centralized", "--dataset", "synthetic=20", "--head-refit",
                                              "--out", "out"), _nothing,
                                             "head-refit fits the classifier on the public slice at the end of the "
                                             "run: it needs public-fraction > 0", ["out"]),
    "demo-non-empty-out": (("fer-sim", "demo", "--out", "out"), _non_empty_out,
                           "run directory out already exists and is not empty", []),
    "evaluate-missing-model": (("fer-sim", "evaluate", "--model", "run/model.pt", "--dataset", "synthetic=20"),
                               _nothing, "model file run/model.pt does not exist", []),
    "evaluate-tampered-model": (("fer-sim", "evaluate", "--model", "run/model.pt", "--dataset", "synthetic=20"),
                                _saved_model(tamper=True),
                                "run/model.pt: cannot load the model (run/model.pt does not match the sha256", []),
    "evaluate-unknown-schema-version": (("fer-sim", "evaluate", "--model", "run/model.pt", "--dataset",
                                         "synthetic=20"), _saved_model(schema_version=2),
                                        "run/model.json: schema_version 2 is not one this fer-fl reads (1)", []),
    "evaluate-unknown-split": (("fer-sim", "evaluate", "--model", "run/model.pt", "--dataset", "synthetic=20",
                                "--split", "val"), _saved_model(), "--split 'val': synthetic=20 has splits test, train",
                               []),
}


@pytest.mark.slow  # each case starts a command in a fresh process
@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_one_line_exit_1_and_leaves_nothing_behind(tmp_path, case):
    """Each bad option, file or config gives exit 1 and exactly one stderr line (after the --insecure warning, where
    asked for) naming it; no traceback; no run directory made and an existing one left as it was."""
    # Prepare
    args, setup, message, absent = CASES[case]
    setup(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    # Execute
    done = _cli(*args, cwd=tmp_path)

    # Assert
    lines = _error_lines(done.stderr)
    assert (done.returncode, len(lines)) == (1, 1), done.stderr
    assert lines[0].startswith(f"{args[0]}: error: {message.format(root=tmp_path)}"), lines[0]
    assert "Traceback" not in done.stderr
    for name in absent:
        assert not (tmp_path / name).exists(), name
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow  # starts a real flower-supernode, which gives up on the unreachable server
def test_fer_client_reports_the_supernodes_exit_code(tmp_path):
    """A SuperNode that cannot reach its server (no retries) exits non-zero; fer-client ends with exit 1 and one
    line giving the SuperNode's code, no traceback (the SuperNode's own go to the state folder's log only)."""
    # Execute
    done = _cli(*CLIENT, "--insecure", "--max-retries", "0", "--state-dir", "site", "--new-privacy-ledger",
               cwd=tmp_path)

    # Assert
    assert done.returncode == 1, done.stderr
    # Looked for, not taken last: fer-client waits only RELAY_DRAIN_SECONDS for the SuperNode's last lines.
    assert done.stderr.splitlines().count(
        "fer-client: error: the SuperNode exited with code 1 (refused or unreachable server?)") == 1
    assert "Connection refused" in done.stderr  # Flower's own explanation is passed through above it
    assert "Traceback" not in done.stderr
    assert "joining 127.0.0.1:1" in done.stdout
    assert "Connection refused" in (tmp_path / "site" / "supernode.log").read_text()  # the full text is kept


@pytest.mark.slow  # one round of CNN-AM on 56 pooled faces, then an evaluation: ~30 s on a busy 2-core machine
def test_fer_sim_centralized_writes_a_run_that_evaluate_reproduces(tmp_path):
    """`fer-sim centralized` trains on the pooled data, prints the final accuracy its summary.json and last
    metrics.jsonl record hold, and `fer-sim evaluate --json` on its model.pt scores the same test faces the same."""
    # Execute
    done = _cli("fer-sim", "centralized", "--dataset", "synthetic=70", "--num-clients", "2", "--rounds", "1",
                "--local-epochs", "1", "--out", "base", cwd=tmp_path)
    evaluated = _cli("fer-sim", "evaluate", "--model", "base/model.pt", "--dataset", "synthetic=70", "--json",
                     cwd=tmp_path)

    # Assert
    assert done.returncode == 0, done.stderr
    run = tmp_path / "base"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1]
    assert summary["final_accuracy"] == rounds[-1]["server"]["accuracy"]
    assert f"centralized: final accuracy {summary['final_accuracy']:.4f}" in done.stdout
    assert done.stdout.rstrip().endswith("report: base/report.md") and (run / "report.md").is_file()
    assert json.loads((run / "config.json").read_text())["num-server-rounds"] == 1
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert (result["split"], result["num_examples"], result["synthetic"]) == ("test", 14, True)
    assert result["accuracy"] == pytest.approx(summary["final_accuracy"])
    assert result["confusion_matrix"] == rounds[-1]["server"]["confusion_matrix"]
