"""No private information outside DP and SecAgg+: what a curious server receives from the sites, message by message.

The real ServerApp body (`run_federation`) runs against the real ClientApp (simulated sites, SecAgg+ mod mounted)
through Flower's link state and protobuf wire (tests.secagg_runtime); the test reads every reply the server got
and the run directory it wrote, as the coordinator could.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from client.client_app import make_client_app, secure_aggregation_mod
from client.config import RunSettings
from server.rundir import RunDirectory
from server.server_app import initial_weights, run_federation
from simulation.federation import simulated_setup
from tests.secagg_runtime import InProcessRun, run_in_process

# Figures computed on a site's private data: the training batches' loss and accuracy, the local test split's
# accuracy, and the sizes of either.
PRIVATE_KEYS = {"train-loss", "train-accuracy", "accuracy", "train-examples"}
MODES = {
    "plain": {},
    "dp": {"dp_epsilon": 8.0, "dp_batch_size": 16},
    "secagg": {"secure_agg": True, "secagg_shares": 3, "secagg_threshold": 2, "secagg_max_weight": 1000.0},
}


def _make_settings(tmp_path, mode: str) -> RunSettings:
    return RunSettings(
        dataset="synthetic=150", num_clients=3, min_clients=3, num_server_rounds=1, model="cnn_am",
        out_dir=str(tmp_path / "run"), **MODES[mode],
    )


def _run(settings: RunSettings) -> InProcessRun:
    run_dir = RunDirectory(settings.out_dir)

    def server_main(grid, context) -> None:
        run_federation(grid, context, settings, run_dir=run_dir)

    client_app = make_client_app(provider=simulated_setup, settings=settings, mods=(secure_aggregation_mod,))
    return run_in_process(server_main, client_app, num_nodes=settings.num_clients)


def _keys_received(run: InProcessRun) -> set[str]:
    """Every metric and config key in every reply the server received."""
    keys: set[str] = set()
    for reply in run.replies:
        if reply.has_content():
            for record in (*reply.content.metric_records.values(), *reply.content.config_records.values()):
                keys.update(record.keys())
    return keys


def _evaluation_counts(run: InProcessRun) -> list[int]:
    return [
        compat.recorddict_to_evaluateres(reply.content).num_examples
        for reply in run.replies
        if reply.has_content() and reply.metadata.message_type == MessageType.EVALUATE
    ]


@pytest.mark.parametrize("mode", [pytest.param("dp", marks=pytest.mark.slow), "secagg"])
def test_a_curious_server_gets_no_per_site_figures_under_dp_or_secagg(tmp_path, mode):
    """Under DP-SGD or SecAgg+ no reply carries a training loss/accuracy, a local accuracy or a local test-set
    size, and metrics.jsonl holds no per-site evaluation; the sites' replies say the figures were withheld."""
    # Prepare
    settings = _make_settings(tmp_path, mode)

    # Execute
    run = _run(settings)

    # Assert
    assert _keys_received(run) & PRIVATE_KEYS == set()
    assert _evaluation_counts(run) == [0, 0, 0]
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rounds[1]["federated"] is None
    assert rounds[1]["evaluate"]["num_withheld"] == 3
    assert rounds[1]["fit"]["train_loss"] is None and rounds[1]["fit"]["num_accepted"] == 3
    assert rounds[1]["server"]["accuracy"] is not None  # the server still evaluates on its own test set


def test_a_plain_run_still_reports_per_site_figures(tmp_path):
    """Without DP or SecAgg+ (nothing to undo) sites send their figures, so the check above can see them."""
    # Prepare
    settings = _make_settings(tmp_path, "plain")

    # Execute
    run = _run(settings)

    # Assert
    assert {"train-loss", "train-accuracy", "accuracy"} <= _keys_received(run)
    assert all(count > 0 for count in _evaluation_counts(run))


def _evaluate_message(weights: list[np.ndarray]) -> Message:
    content = compat.evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(weights), {"server-round": 1}), True)
    return Message(content=content, dst_node_id=7, message_type=MessageType.EVALUATE, group_id="1")


@pytest.mark.usefixtures("superlink_identity")
@pytest.mark.parametrize(("mode", "share", "shared"), [("secagg", "true", True), ("secagg", None, False),
                                                       ("dp", "true", True), ("plain", None, True)])
def test_a_site_that_opts_in_shares_its_evaluation(tmp_path, mode, share, shared):
    """`share-metrics` in the node config (fer-client start --share-metrics) releases the local evaluation."""
    # Prepare
    settings = _make_settings(tmp_path, mode).replace(dataset="synthetic=280")
    node_config = {"dataset": "synthetic=280", "client-id": "site-a", "state-dir": str(tmp_path / "state")}
    if share is not None:
        node_config["share-metrics"] = share
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=settings.to_run_config())

    # Execute
    reply = make_client_app()(_evaluate_message(initial_weights(settings)), context)

    # Assert
    evalres = compat.recorddict_to_evaluateres(reply.content)
    assert (evalres.num_examples == 56) is shared  # synthetic test split = N // 5
    assert ("accuracy" in evalres.metrics) is shared
    assert evalres.metrics.get("metrics-withheld", False) is not shared
