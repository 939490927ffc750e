"""Run directory and report: round trips, atomic writes, no clobbering, resume semantics, plots that exist."""

from __future__ import annotations

import csv
import json
import re
import struct
import tomllib
import zlib

import numpy as np
import pytest
import torch

from client.config import RunSettings
from client.data.labels import EMOTIONS
from models.card import SchemaVersionError
from models.files import load_model
from privacy.report import THREAT_MODEL, privacy_report
from server.metrics import classification_metrics, client_distribution
from server.records import FitRecord, RoundRecord, summarize
from server.report import write_report
from server.rundir import RunDirectory, flatten_round
from simulation.partition import partition_labels, partition_stats

from tests.report_tables import expected_round_row, markdown_table, num, pct

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CONFIG = {"dataset": "synthetic", "num-clients": 4, "model": "cnn_am", "alpha": 0.5, "secure-agg": False}
_SETTINGS = RunSettings.from_run_config(_CONFIG)


def _make_partition(spec: str) -> dict:
    """partition.json as simulation.federation.federation_stats writes it: per client, and per dataset."""
    counts = [[5, 3, 2], [0, 8, 2], [9, 0, 1], [2, 2, 6]]
    return {"clients": {str(i): {"dataset": spec, "profile": None, "per_class": c, "size": 10, "attacker": False}
                        for i, c in enumerate(counts)},
            "datasets": {spec: {"num_clients": 4, "num_samples": 40, "classes": ["a", "b", "c"], "per_client": counts,
                                "sizes": [10, 10, 10, 10], "label_skew_tv": 0.31}}}


def _make_round(index: int, *, accuracy: float = 0.5, clients: int = 4) -> dict:
    """A round record in the schema the ServerApp appends (round 0: server evaluation only)."""
    rng = np.random.default_rng(index)
    y_true = rng.integers(0, 7, 70)
    y_pred = np.where(rng.random(70) < accuracy, y_true, rng.integers(0, 7, 70))
    server = {"loss": 2.0 - 0.2 * index, **classification_metrics(y_true, y_pred)}
    record = {"round": index, "seconds": 1.25, "bytes_up": 1000 * index, "bytes_down": 2000 * index,
              "server": server, "federated": None}
    if index > 0:
        accuracies = {str(c): float(a) for c, a in enumerate(rng.uniform(0.2, 0.8, clients))}
        record["federated"] = {
            "loss": 1.9 - 0.2 * index, "accuracy": float(np.mean(list(accuracies.values()))),
            "clients": {c: {"accuracy": a, "num_examples": 15} for c, a in accuracies.items()},
            "distribution": client_distribution(list(accuracies.values())),
        }
        record["fit"] = {"num_clients": clients, "num_rejected": 1,
                         "rejected": [{"client": "3", "reason": "update norm 1e9 > 100"}], "train_loss": 1.5}
    return record


def _make_run(path, *, config=_CONFIG, rounds: int = 3, partition: bool = True, privacy=None):
    """A complete run directory as a finished simulation leaves it (`privacy`: a privacy_report)."""
    run = RunDirectory(path)
    run.write_config(config)
    for index in range(rounds + 1):
        run.append_round(RoundRecord.from_json(_make_round(index, accuracy=0.2 + 0.2 * index)))
    if partition:
        run.write_partition(_make_partition(config["dataset"]))
    if privacy is not None:
        run.write_privacy(privacy)
    run.write_summary(summarize(run.rounds(), seconds=5.0, settings=RunSettings.from_run_config(config)))
    return run


def _png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG, decoded."""
    texts, offset = {}, len(_PNG_SIGNATURE)
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            texts[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, _, value = body.partition(b"\0")
            texts[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
        elif kind == b"iTXt":  # used for text outside Latin-1, such as the em dash in the partition title
            key, _, rest = body.partition(b"\0")
            compressed, value = rest[0], rest[2:].split(b"\0", 2)[2]
            texts[key.decode("latin-1")] = (zlib.decompress(value) if compressed else value).decode("utf-8")
        offset += 12 + length
    return texts


def _temporaries(path) -> list:
    """Files an interrupted atomic write would leave behind."""
    return [p for p in path.rglob("*") if p.name.endswith(".tmp")]


def test_round_trip_of_everything_written(tmp_path):
    """config, rounds, partition and summary read back exactly as written."""
    run = _make_run(tmp_path / "run")

    reopened = RunDirectory(tmp_path / "run", create=False)

    assert reopened.read_json("config.json") == _CONFIG
    assert tomllib.loads((tmp_path / "run" / "config.toml").read_text()) == _CONFIG
    assert reopened.rounds() == [RoundRecord.from_json(json.loads(json.dumps(_make_round(i, accuracy=0.2 + 0.2 * i))))
                                 for i in range(4)]
    assert reopened.read_json("partition.json")["clients"]["1"]["per_class"] == [0, 8, 2]
    assert reopened.summary() == summarize(run.rounds(), seconds=5.0, settings=_SETTINGS)
    assert _temporaries(tmp_path) == []


def test_metrics_jsonl_is_one_parseable_line_per_round(tmp_path):
    """metrics.jsonl holds exactly one JSON object per line, in round order."""
    _make_run(tmp_path / "run", rounds=2)

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()

    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]


def test_metrics_csv_flattens_rounds(tmp_path):
    """metrics.csv has dotted columns, one per emotion for per-class lists, no per-client or matrix columns."""
    _make_run(tmp_path / "run", rounds=2)

    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    record = _make_round(2, accuracy=0.6)
    assert [row["round"] for row in rows] == ["0", "1", "2"]
    assert float(rows[2]["server.accuracy"]) == pytest.approx(record["server"]["accuracy"])
    assert float(rows[2]["server.per_class_recall.happy"]) == pytest.approx(record["server"]["per_class_recall"][3])
    assert float(rows[2]["federated.distribution.worst_10pct"]) == pytest.approx(
        record["federated"]["distribution"]["worst_10pct"])
    assert rows[0]["federated.accuracy"] == ""  # round 0 has no federated evaluation
    assert not [c for c in rows[0] if "confusion" in c or c.startswith(("federated.clients", "fit.rejected"))]


def test_flatten_round_hand_worked():
    """A small nested record flattens to the expected columns."""
    record = {"round": 1, "server": {"accuracy": 0.5, "per_class_recall": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, None],
                                     "confusion_matrix": [[1]]},
              "fit": {"rejected": [{"client": "a"}], "num_clients": 3}, "federated": {"clients": {"x": {}}}}

    row = flatten_round(record)

    assert row == {"round": 1, "server.accuracy": 0.5, "server.per_class_recall.angry": 0.1,
                   "server.per_class_recall.disgust": 0.2, "server.per_class_recall.fear": 0.3,
                   "server.per_class_recall.happy": 0.4, "server.per_class_recall.sad": 0.5,
                   "server.per_class_recall.surprise": 0.6, "server.per_class_recall.neutral": None,
                   "fit.num_clients": 3}


def test_refuses_to_clobber_a_non_empty_run_directory(tmp_path):
    """A new run in a non-empty folder fails naming it, and leaves the old files untouched."""
    _make_run(tmp_path / "run", rounds=1)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()

    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "run"))):
        RunDirectory(tmp_path / "run")

    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_empty_existing_folder_is_accepted_and_missing_resume_is_not(tmp_path):
    """An empty folder can hold a new run; resuming a folder that does not exist is an error."""
    (tmp_path / "empty").mkdir()

    RunDirectory(tmp_path / "empty").write_json("summary.json", {"rounds": 0})

    assert (tmp_path / "empty" / "summary.json").exists()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        RunDirectory(tmp_path / "nowhere", resume=True)


def test_resumed_round_replaces_the_rounds_it_supersedes(tmp_path):
    """After a resume, a re-run round r replaces the stored r and everything after it; nothing is duplicated."""
    _make_run(tmp_path / "run", rounds=3)

    resumed = RunDirectory(tmp_path / "run", resume=True)
    resumed.append_round(RoundRecord(round=2, seconds=9.0, server={"accuracy": 0.99}))
    resumed.append_round(RoundRecord(round=3, seconds=9.0, server={"accuracy": 0.98}))

    rounds = RunDirectory(tmp_path / "run", create=False).rounds()
    assert [r.round for r in rounds] == [0, 1, 2, 3]
    assert [r.seconds for r in rounds] == [1.25, 1.25, 9.0, 9.0]
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        assert [row["round"] for row in csv.DictReader(handle)] == ["0", "1", "2", "3"]


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    """A write that fails half-way (unserialisable value) keeps the old file intact and leaves no .tmp."""
    run = RunDirectory(tmp_path / "run")
    run.write_json("summary.json", {"final_accuracy": 0.5})

    with pytest.raises(TypeError):
        run.write_json("summary.json", {"final_accuracy": object()})

    assert run.read_json("summary.json") == {"final_accuracy": 0.5}
    assert _temporaries(tmp_path) == []


def test_non_finite_numbers_become_null_and_numpy_becomes_json(tmp_path):
    """NaN/inf are written as null (valid JSON); numpy scalars and arrays as numbers and lists."""
    run = RunDirectory(tmp_path / "run")

    run.append_round(RoundRecord(round=1, server={"loss": float("nan"), "accuracy": np.float32(0.25),
                                                  "sizes": np.array([1, 2])},
                                 fit=FitRecord(train_loss=float("inf"))))

    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = json.loads(text)
    assert written["server"] == {"loss": None, "accuracy": 0.25, "sizes": [1, 2]}
    assert written["fit"]["train_loss"] is None


def test_config_toml_only_when_representable(tmp_path):
    """A config with a null has no TOML spelling: config.json is written, config.toml is not."""
    run = RunDirectory(tmp_path / "run")

    run.write_config({"dataset": "fer2013=/data", "lr": None})

    assert run.read_json("config.json") == {"dataset": "fer2013=/data", "lr": None}
    assert not (tmp_path / "run" / "config.toml").exists()


def test_append_round_requires_an_integer_round(tmp_path):
    """A record without an integer round is refused before anything is written."""
    run = RunDirectory(tmp_path / "run")

    with pytest.raises(ValueError, match="integer 'round'"):
        run.append_round(RoundRecord.from_json({"round": "1"}))

    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_saved_model_loads_with_weights_only(tmp_path):
    """model.pt is a plain state_dict (weights_only=True) equal to what was saved; model.json describes it."""
    run = RunDirectory(tmp_path / "run")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))

    path = run.save_model(model.state_dict(), model_name="cnn_am", model_cfg={"depth": 2}, round=5,
                          dataset="synthetic")

    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert (meta["name"], meta["cfg"], meta["round"], meta["dataset"]) == ("cnn_am", {"depth": 2}, 5, "synthetic")
    assert meta["classes"] == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def test_checkpoints_accept_numpy_and_the_latest_is_found(tmp_path):
    """Checkpoints go to checkpoints/round-XXX.pt; numpy arrays (Flower's format) load back as tensors."""
    run = RunDirectory(tmp_path / "run")
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}

    for index in (1, 2, 10):
        run.save_model(weights, model_name="dmsnet_iot", model_cfg={}, round=index, checkpoint=True)

    latest = run.latest_checkpoint()
    state, card = load_model(latest)
    assert latest == tmp_path / "run" / "checkpoints" / "round-010.pt"
    assert card.round == 10
    assert torch.equal(state["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert not (tmp_path / "run" / "model.pt").exists()


def test_load_model_detects_a_replaced_file(tmp_path):
    """A model file that no longer matches its recorded sha256 is refused."""
    run = RunDirectory(tmp_path / "run")
    path = run.save_model({"w": torch.ones(2)}, model_name="cnn_am", model_cfg={}, round=1)
    torch.save({"w": torch.zeros(2)}, path)

    with pytest.raises(ValueError, match="sha256"):
        load_model(path)


@pytest.mark.parametrize("name", ["model.json", "metrics.jsonl", "summary.json", "privacy.json"])
def test_a_record_of_another_schema_version_is_refused_naming_its_file(tmp_path, name):
    """Every typed reader refuses a record written under a schema_version it does not know, in one line."""
    # Prepare
    status = {"client_id": "site-a", "epsilon_spent": 1.0, "epsilon_budget": 3.0, "delta": 1e-5,
              "noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.1, "steps": 10, "accountant": "rdp"}
    run = _make_run(tmp_path / "run", rounds=1, privacy=privacy_report(clients=[status], central=None,
                                                                        secure_aggregation=False))
    run.save_model({"w": torch.ones(1)}, model_name="cnn_am", model_cfg={}, round=1)
    path = tmp_path / "run" / name
    if name.endswith(".jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        lines[-1]["schema_version"] = 99
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 99}))
    readers = {"model.json": lambda: load_model(tmp_path / "run" / "model.pt"),
               "metrics.jsonl": lambda: RunDirectory(tmp_path / "run", create=False),
               "summary.json": lambda: RunDirectory(tmp_path / "run", create=False).summary(),
               "privacy.json": lambda: RunDirectory(tmp_path / "run", create=False).privacy()}

    # Execute / Assert
    with pytest.raises(SchemaVersionError, match=rf"^{re.escape(str(path))}(:2)?: schema_version 99 is not one"):
        readers[name]()


def test_report_references_plots_that_exist_and_are_png(tmp_path):
    """Every image report.md links to exists, starts with the PNG signature and is not trivially small."""
    _make_run(tmp_path / "run")

    report = write_report(tmp_path / "run")

    text = report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(["plots/accuracy.png", "plots/loss.png", "plots/clients.png",
                                    "plots/confusion.png", "plots/partition.png"])
    for link in links:
        data = (tmp_path / "run" / link).read_bytes()
        assert data[:8] == _PNG_SIGNATURE, link
        assert len(data) > 5000, link
    assert "| final_accuracy |" in text
    assert _temporaries(tmp_path) == []


@pytest.mark.slow
def test_synthetic_runs_say_so_in_report_and_plot_titles(tmp_path):
    """With the synthetic dataset, report.md and every plot title say "synthetic"; a real dataset says nothing."""
    _make_run(tmp_path / "synthetic")
    _make_run(tmp_path / "real", config={**_CONFIG, "dataset": "fer2013=/data/fer2013"})

    synthetic = write_report(tmp_path / "synthetic").read_text()
    real = write_report(tmp_path / "real").read_text()

    assert "synthetic" in synthetic.splitlines()[0].lower()
    assert "synthetic" not in real.lower()
    for png in (tmp_path / "synthetic" / "plots").glob("*.png"):
        assert "synthetic" in _png_text(png.read_bytes())["Title"], png.name
    for png in (tmp_path / "real" / "plots").glob("*.png"):
        assert "synthetic" not in _png_text(png.read_bytes())["Title"], png.name


def _dp_status(client_id: str, spent: float) -> dict:
    """One node's DPClient.status, as the ServerApp hands it to privacy_report."""
    return {"client_id": client_id, "epsilon_spent": spent, "epsilon_budget": 3.0, "delta": 1e-5,
            "noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.1, "steps": 10, "accountant": "rdp",
            "secure_mode": True}


def test_report_has_a_privacy_section_from_privacy_json(tmp_path):
    """privacy.json adds a Privacy section with each client's epsilon under its site name, the run-level facts and
    a plot (the table once showed row numbers: it looked for `client` where privacy.json says `client_id`)."""
    privacy = privacy_report(clients=[_dp_status("site-b", 1.25), _dp_status("site-a", 2.5)], central=None,
                             secure_aggregation=True)
    _make_run(tmp_path / "run", privacy=privacy)

    text = write_report(tmp_path / "run").read_text()

    section = text[text.index("## Privacy"):]
    rows = [{k: row[k] for k in ("client", "epsilon_spent", "epsilon_budget", "delta", "accountant")}
            for row in markdown_table(text, "Privacy")]
    assert rows == [{"client": "site-a", "epsilon_spent": "2.5", "epsilon_budget": "3", "delta": "1e-05",
                     "accountant": "rdp"},
                    {"client": "site-b", "epsilon_spent": "1.25", "epsilon_budget": "3", "delta": "1e-05",
                     "accountant": "rdp"}]
    assert "secure_aggregation: True" in section
    assert THREAT_MODEL in section
    assert "plots/privacy.png" in section
    assert (tmp_path / "run" / "plots" / "privacy.png").read_bytes()[:8] == _PNG_SIGNATURE


def test_report_states_that_seeded_dp_noise_is_not_private_against_the_seed(tmp_path):
    """A simulation's privacy.json (seeded noise) puts its caveat in report.md, in words, not as a bare flag."""
    status = {"client_id": "0", "epsilon_spent": 1.0, "epsilon_budget": 3.0, "delta": 1e-5, "noise_multiplier": 1.1,
              "max_grad_norm": 1.0, "sample_rate": 0.1, "steps": 10, "accountant": "rdp", "secure_mode": False}
    _make_run(tmp_path / "run", privacy=privacy_report(clients=[status], central=None, secure_aggregation=False))

    text = write_report(tmp_path / "run").read_text()

    section = text[text.index("## Privacy"):]
    assert "not private against anyone who knows that seed" in section
    assert "local_dp_noise: seeded" in section


def test_report_skips_what_is_missing(tmp_path):
    """A run with only round 0 and no partition, summary or privacy still reports, with no dangling links."""
    run = RunDirectory(tmp_path / "run")
    run.write_config({"dataset": "synthetic"})
    run.append_round(RoundRecord.from_json(_make_round(0)))

    text = write_report(tmp_path / "run").read_text()

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["plots/accuracy.png", "plots/confusion.png", "plots/loss.png"]
    assert all((tmp_path / "run" / link).exists() for link in links)
    assert "## Privacy" not in text and "## Data partition" not in text and "## Clients" not in text


def test_report_reads_the_federation_partition_layout(tmp_path):
    """partition.json keyed by client id, with profiles and per-dataset stats, gives the plot and per-profile sizes."""
    labels = np.random.default_rng(0).integers(0, 7, 300)
    weights = [4.0, 1.0, 1.0, 1.0, 1.0]
    parts = partition_labels(labels, num_partitions=5, scheme="dirichlet", size_weights=weights, seed=0)
    block = partition_stats(labels, parts)
    clients = {f"client-{i:03d}": {"dataset": "synthetic", "profile": "hospital" if w == 4 else "iot",
                                   "per_class": counts, "size": len(part)}
               for i, (w, counts, part) in enumerate(zip(weights, block["per_client"], parts))}
    run = _make_run(tmp_path / "run", partition=False)
    run.write_partition({"clients": clients, "datasets": {"synthetic": block}})

    text = write_report(tmp_path / "run").read_text()

    section = text[text.index("## Data partition"):]
    assert f"- profile hospital: 1 client, {len(parts[0])} samples each on average" in section
    assert f"label skew (synthetic), mean total-variation distance from the global label mix: " \
           f"{block['label_skew_tv']:.3f}" in section
    assert (tmp_path / "run" / "plots" / "partition.png").read_bytes()[:8] == _PNG_SIGNATURE


def _read_back(path) -> tuple[list[dict], dict]:
    """metrics.jsonl and summary.json as the run wrote them to disk."""
    rounds = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return rounds, json.loads((path / "summary.json").read_text())


def test_report_tables_hold_the_rows_of_metrics_jsonl(tmp_path):
    """Summary, Rounds and final per-class tables show, row by row, what metrics.jsonl and summary.json hold."""
    # Prepare
    _make_run(tmp_path / "run", rounds=3)
    rounds, summary = _read_back(tmp_path / "run")

    # Execute
    text = write_report(tmp_path / "run").read_text()

    # Assert
    assert markdown_table(text, "Rounds") == [expected_round_row(record) for record in rounds]
    final = rounds[-1]["server"]
    assert markdown_table(text, "Final per-class results (server-side test set)") == [
        {"class": name, "recall": pct(final["per_class_recall"][k]), "F1": num(final["per_class_f1"][k]),
         "support": str(final["support"][k])} for k, name in enumerate(EMOTIONS)]
    shown = {row[""]: row["value"] for row in markdown_table(text, "Summary")}
    assert shown["final_accuracy"] == pct(summary["final_accuracy"]) == pct(rounds[-1]["server"]["accuracy"])
    assert shown["best_round"] == str(summary["best_round"])
    assert shown["rounds"] == "3"
    assert shown["bytes_up"] == f"{sum(r['bytes_up'] for r in rounds) / 1e3:.2f} kB"


def test_failed_rounds_are_shown_in_the_summary(tmp_path):
    """summary.json's failed_rounds (a list) appears as a Summary row and as a warning naming each round's reason."""
    # Prepare: round 2 failed as the ServerApp records it
    run = _make_run(tmp_path / "run", rounds=3)
    records = [r.to_json() for r in run.rounds()]
    records[2]["fit"].update(failed=True, failure="round 2: SecAgg+ halted: 1 of 3 shares received")
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run.write_summary(run.summary().replace(failed_rounds=[2]))

    # Execute
    text = write_report(tmp_path / "run").read_text()

    # Assert
    shown = {row[""]: row["value"] for row in markdown_table(text, "Summary")}
    assert shown["failed_rounds"] == "2"
    summary_section = text[text.index("## Summary"):text.index("## Configuration")]
    assert "> **1 round failed**" in summary_section
    assert "> - round 2: round 2: SecAgg+ halted: 1 of 3 shares received" in summary_section


def test_a_run_without_failed_rounds_says_none(tmp_path):
    """An empty failed_rounds list is shown as "none", with no failure warning."""
    # Prepare
    run = _make_run(tmp_path / "run", rounds=1)
    run.write_summary(run.summary().replace(failed_rounds=[]))
    # Execute
    text = write_report(tmp_path / "run").read_text()
    # Assert
    assert {row[""]: row["value"] for row in markdown_table(text, "Summary")}["failed_rounds"] == "none"
    assert "failed**" not in text
