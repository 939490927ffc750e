"""Privacy report: central-DP ε, privacy.json content from real client status, and the Privacy section report.md
renders from it (server/report.py, the one renderer)."""

from __future__ import annotations

import json
import warnings

import dp_accounting
import pytest

from privacy.accounting import central_epsilon
from privacy.dp import DPClient, DPSettings
from privacy.ledger import PrivacyLedger, generate_key_file
from privacy.report import THREAT_MODEL, PrivacyReport, privacy_report
from tests.report_tables import markdown_table

# (σ, client fraction q, rounds, δ) → ε with Opacus 1.6.0's RDP accountant.
CENTRAL_GOLDEN = [
    ((1.0, 0.1, 100, 1e-5), 7.899255002434629),
    ((2.0, 1.0, 10, 1e-3), 6.2361795987102),
    ((0.8, 0.5, 50, 1e-5), 39.9134795014913),
]


@pytest.fixture(autouse=True)
def _quiet_opacus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _privacy_section(tmp_path, record: PrivacyReport) -> str:
    """The Privacy section of report.md for a run directory holding this privacy report (what fer-server renders)."""
    from server.report import write_report
    from server.rundir import RunDirectory

    run = RunDirectory(tmp_path / "rendered")
    run.write_config({"dataset": "synthetic"})
    run.write_privacy(record)
    text = write_report(run.path).read_text()
    return text[text.index("## Privacy"):]


def _central(**overrides) -> dict:
    """Central-DP settings as the server would report them."""
    return {"noise_multiplier": 1.0, "clipping_norm": 0.5, "sample_rate": 0.1, "rounds": 100, "delta": 1e-5, **overrides}


def _client_status(tmp_path, client_id: str, rounds: int, *, secure: bool = False) -> dict:
    """A real DPClient's status after charging ``rounds`` rounds (``secure``: OS-keyed noise, as deployed)."""
    key = tmp_path / "ledger.key"
    if not key.exists():
        generate_key_file(key)
    ledger = PrivacyLedger.open(
        tmp_path / client_id / "ledger.bin",
        key_file=key,
        anchor_path=tmp_path / "anchors" / f"{client_id}.anchor",
        client_id=client_id,
        budget_epsilon=3.0,
        delta=1e-5,
    )
    client = DPClient(
        settings=DPSettings(epsilon=3.0, secure_mode=secure), ledger=ledger, dataset_size=120, batch_size=8, local_epochs=1, planned_rounds=3
    )
    for server_round in range(1, rounds + 1):
        client.begin_round(server_round=server_round)
    return client.status()


@pytest.mark.parametrize(("args", "expected"), CENTRAL_GOLDEN)
def test_central_epsilon_golden_and_agrees_with_dp_accounting(args, expected):
    """Central ε matches its golden value and Google's dp_accounting within 5 %."""
    # Prepare
    sigma, rate, rounds, delta = args
    independent = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
    independent.compose(dp_accounting.SelfComposedDpEvent(event, rounds))

    # Execute
    epsilon = central_epsilon(noise_multiplier=sigma, sample_rate=rate, rounds=rounds, delta=delta)

    # Assert
    assert epsilon == pytest.approx(expected, rel=1e-9)
    assert epsilon / independent.get_epsilon(delta) == pytest.approx(1.0, abs=0.05)


def test_central_epsilon_grows_with_rounds_and_shrinks_with_noise():
    """ε increases strictly with rounds and decreases strictly with σ; zero rounds cost nothing."""
    # Execute
    by_rounds = [central_epsilon(noise_multiplier=1.0, sample_rate=0.2, rounds=r, delta=1e-5) for r in (0, 1, 5, 20, 80)]
    by_sigma = [central_epsilon(noise_multiplier=s, sample_rate=0.2, rounds=20, delta=1e-5) for s in (0.7, 1.0, 1.5, 3.0)]

    # Assert
    assert by_rounds[0] == 0.0
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:]))
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))


def test_report_carries_every_clients_real_figures(tmp_path):
    """privacy.json holds each client's status figures, sorted by id, the central ε and the threat model."""
    # Prepare
    statuses = [_client_status(tmp_path, "site-b", rounds=3), _client_status(tmp_path, "site-a", rounds=1)]

    # Execute
    report = privacy_report(clients=statuses, central=_central(), secure_aggregation=True).to_json()

    # Assert
    assert [c["client_id"] for c in report["clients"]] == ["site-a", "site-b"]
    site_a, site_b = report["clients"]
    for entry, status in ((site_a, statuses[1]), (site_b, statuses[0])):
        for field in ("epsilon_spent", "epsilon_budget", "delta", "noise_multiplier", "max_grad_norm", "sample_rate"):
            assert entry[field] == status[field]
        assert entry["steps"] == status["steps"] and entry["accountant"] == "rdp"
    assert site_a["steps"] == 15 and site_b["steps"] == 45
    assert site_b["epsilon_spent"] > site_a["epsilon_spent"] > 0
    assert report["max_epsilon_spent"] == site_b["epsilon_spent"] <= 3.0
    assert site_a["budget_exhausted"] is False
    assert report["central"]["epsilon"] == pytest.approx(CENTRAL_GOLDEN[0][1], rel=1e-9)
    assert report["secure_aggregation"] is True and report["local_dp"] is True
    assert report["threat_model"] == THREAT_MODEL
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_report_without_any_dp_states_that_plainly(tmp_path):
    """With neither local nor central DP the report says so and has no ε."""
    # Execute
    record = privacy_report(clients=[], central=None, secure_aggregation=False)
    report = record.to_json()

    # Assert
    assert report["local_dp"] is False and report["central"] is None and report["max_epsilon_spent"] is None
    section = _privacy_section(tmp_path, record)
    assert "- local_dp: False" in section and "- secure_aggregation: False" in section


def _complete_status() -> dict:
    """A well-formed client status."""
    return {
        "epsilon_spent": 1.0, "epsilon_budget": 3.0, "delta": 1e-5, "noise_multiplier": 1.0,
        "max_grad_norm": 1.0, "sample_rate": 0.1, "steps": 10, "accountant": "rdp",
    }


@pytest.mark.parametrize(
    ("dropped", "override", "message"),
    [
        ("epsilon_budget", {}, "clients\\[0\\] lacks epsilon_budget"),
        (None, {"noise_multiplier": float("nan")}, "clients\\[0\\].noise_multiplier must be a finite number"),
        (None, {"accountant": "gdp"}, "clients\\[0\\].accountant"),
    ],
)
def test_bad_client_entry_is_named(dropped, override, message):
    """A missing field or a non-finite number raises ValueError naming the client and field."""
    # Prepare
    entry = {**_complete_status(), **override}
    entry.pop(dropped, None)

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        privacy_report(clients=[entry], central=None, secure_aggregation=False)


def test_written_report_and_markdown_show_the_numbers(tmp_path):
    """The run directory writes the report as parseable JSON (as the ServerApp does); the markdown shows ε values and
    the threat model."""
    # Prepare
    from server.rundir import PRIVACY_JSON, RunDirectory

    record = privacy_report(clients=[_client_status(tmp_path, "site-a", rounds=2)], central=_central(), secure_aggregation=True)

    # Execute
    run = RunDirectory(tmp_path / "run")
    run.write_privacy(record)
    path = tmp_path / "run" / PRIVACY_JSON
    markdown = _privacy_section(tmp_path, record)
    report = record.to_json()

    # Assert
    assert json.loads(path.read_text()) == report
    assert RunDirectory(tmp_path / "run", create=False).privacy() == record
    assert not list(path.parent.glob(".privacy.json.*"))
    assert [row["epsilon_spent"] for row in markdown_table(markdown, "Privacy")] == \
        [f"{report['clients'][0]['epsilon_spent']:.4g}"]
    assert f"- central.epsilon: {report['central']['epsilon']:.4g}" in markdown
    assert "- secure_aggregation: True" in markdown
    assert THREAT_MODEL in markdown


def test_threat_model_is_one_paragraph_covering_server_dp_and_gaps():
    """The threat model is one paragraph naming the server model, what DP protects and what nothing covers."""
    # Assert
    assert "\n" not in THREAT_MODEL
    for phrase in ("honest-but-curious", "SecAgg+", "single training image", "Central DP", "Neither covers"):
        assert phrase in THREAT_MODEL


def test_secagg_quantisation_cost_is_summarised_by_its_worst_round(tmp_path):
    """privacy.json carries every round's SecAgg+ quantisation cost and the worst one on top; report.md states it."""
    # Prepare
    from server.secagg_outcome import QuantizationCost

    def cost(server_round: int, total_weight: float) -> dict:
        step = 2 * 0.5 / 2**24
        return QuantizationCost(
            server_round=server_round, num_clients=3, clipping_range=0.5, quantization_range=2**24,
            total_weight=total_weight, step=step, max_abs_error=3 * step / total_weight,
            rms_error=3**0.5 * step / 2 / total_weight, max_abs_error_per_update=step / (total_weight / 3),
        ).to_json()

    rounds = [cost(1, 3.0), cost(2, 1.5)]

    # Execute
    record = privacy_report(clients=[], central=None, secure_aggregation=True, secagg_quantization=rounds)
    markdown, report = _privacy_section(tmp_path, record), record.to_json()

    # Assert
    summary = report["secure_aggregation_quantization"]
    assert summary["max_abs_error_of_average"] == rounds[1]["max_abs_error"] == pytest.approx(2 / 2**24)
    assert summary["max_abs_error_per_update"] == rounds[1]["max_abs_error_per_update"]
    assert summary["rounds"] == rounds
    assert f"- secure_aggregation_quantization.max_abs_error_of_average: {2 / 2**24:.4g}" in markdown
    assert privacy_report(clients=[], central=None, secure_aggregation=False).secure_aggregation_quantization is None


@pytest.mark.parametrize(
    ("secure", "noise", "named"),
    [
        ({"site-a": False, "site-b": False}, "seeded", "every client"),
        ({"site-a": True, "site-b": False}, "mixed", "clients site-b"),
        ({"site-a": True, "site-b": True}, "csprng", None),
    ],
)
def test_seeded_noise_is_stated_as_not_private_against_whoever_knows_the_seed(tmp_path, secure, noise, named):
    """Clients whose DP noise was seeded (simulations) get a caveat in privacy.json and the markdown; OS-keyed
    noise (deployed nodes) does not."""
    # Prepare
    statuses = [_client_status(tmp_path, cid, rounds=1, secure=flag) for cid, flag in secure.items()]

    # Execute
    record = privacy_report(clients=statuses, central=None, secure_aggregation=False)
    markdown, report = _privacy_section(tmp_path, record), record.to_json()

    # Assert
    assert report["local_dp_noise"].startswith(noise)
    if named is None:
        assert "seeded_noise_caveat" not in report and "Seeded noise" not in markdown
    else:
        assert f"noise and Poisson sampling of {named} were drawn" in report["seeded_noise_caveat"]
        assert "not private against anyone who knows that seed" in report["seeded_noise_caveat"]
        assert report["seeded_noise_caveat"] in markdown
