"""A node's config: what `fer-client start` writes is what the ClientApp reads, through one typed `NodeSettings`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.config import parse_config_args
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
from flwr.compat.common import recorddict_compat as compat

from client.cli import start_cmd
from client.config import RunSettings
from client.deploy import generate_node_keys
from client.node_config import NodeConfigError, NodeSettings
from privacy.secagg_identity import identity_of

SIMULATION_ONLY = {PARTITION_ID_KEY, NUM_PARTITIONS_KEY}  # Flower's simulation engine sets these, never an operator


def _start_with_every_option(tmp_path: Path, monkeypatch) -> object:
    """Runs the real `fer-client start` with every node-config option set, up to the SuperNode it would launch;
    returns the SuperNodeSettings it built (the supervisor that runs them is skipped)."""
    started = []
    monkeypatch.setattr(start_cmd, "_run_supernode", lambda settings, *, lock: started.append(settings))
    keys = generate_node_keys(out_dir=tmp_path / "keys", name="site-a")
    roster = tmp_path / "secagg-roster.yaml"
    roster.write_text(f"site-a: {keys.public_key.read_text().strip()}\n")
    start_cmd.start(
        server="127.0.0.1:1", dataset="synthetic=40", key=keys.private_key, insecure=True, client_id="site-a",
        profile="iot", state_dir=tmp_path / "state", ledger_key=tmp_path / "keys" / "ledger.key",
        ledger_anchor=tmp_path / "anchor" / "ledger.anchor", new_privacy_ledger=True, require_secure_agg=True,
        share_metrics=True, dp_epsilon=3.0, secagg_roster=roster, secagg_min_threshold=3,
    )
    (settings,) = started
    return settings


def _as_the_supernode_reads_it(command: list[str]) -> dict:
    """The node config a real flower-supernode hands its ClientApp, parsed from its `--node-config` argument."""
    return parse_config_args([command[command.index("--node-config") + 1]])


def test_every_key_fer_client_start_writes_is_a_field_and_round_trips(tmp_path, monkeypatch):
    """`fer-client start` writes every operator key of NodeSettings and no other; through the SuperNode's own parser
    they read back as what the operator asked for."""
    # Prepare
    settings = _start_with_every_option(tmp_path, monkeypatch)

    # Execute
    node = NodeSettings.from_node_config(_as_the_supernode_reads_it(settings.command()), node_id=7)

    # Assert
    assert set(settings.node_config) | SIMULATION_ONLY == set(NodeSettings.keys())
    assert not set(settings.node_config) & SIMULATION_ONLY
    assert node == NodeSettings.from_node_config(settings.node_config)
    assert node == NodeSettings(
        dataset="synthetic=40", client_id="site-a", profile="iot", state_dir=(tmp_path / "state").resolve(),
        ledger_key=(tmp_path / "keys" / "ledger.key").resolve(),
        ledger_anchor=(tmp_path / "anchor" / "ledger.anchor").resolve(), dp_epsilon=3.0, require_secure_agg=True,
        share_metrics=True, secagg_min_threshold=3, secagg_roster=(tmp_path / "secagg-roster.yaml").resolve(),
        node_key=(tmp_path / "keys" / "site-a.key").resolve(),
    )
    assert identity_of(node.node_key) is not None
    assert node.ledger_files(state_dir=node.state_dir).key.is_file()  # --new-privacy-ledger made the key


def test_every_field_round_trips_through_the_node_config():
    """to_node_config and from_node_config are inverse for a deployed and for a simulated node."""
    # Prepare
    deployed = NodeSettings(dataset="folder=/data/a b", client_id="site-b", profile="hospital", state_dir=Path("/s"),
                            ledger_key=Path("/k/ledger.key"), ledger_anchor=Path("/a/anchor"), dp_epsilon=1.5,
                            require_secure_agg=True, share_metrics=True, secagg_min_threshold=4,
                            secagg_roster=Path("/c/roster.yaml"), node_key=Path("/k/node.key"))
    simulated = NodeSettings(client_id="client-002", partition_id=2, num_partitions=5, simulated=True)

    # Execute / Assert
    for node in (deployed, simulated):
        assert NodeSettings.from_node_config(node.to_node_config()) == node


def test_a_simulated_and_a_deployed_node_parse_differently():
    """Flower's simulation engine marks its nodes with a partition; a SuperNode's config has its own dataset and
    state folder instead, and only that node keeps SecAgg+ contributions on disk."""
    # Prepare
    simulation_engine = {"partition-id": 2, "num-partitions": 5}
    operator = {"dataset": "synthetic=40"}

    # Execute
    simulated = NodeSettings.from_node_config(simulation_engine, node_id=7)
    deployed = NodeSettings.from_node_config(operator, node_id=7)

    # Assert
    assert (simulated.simulated, simulated.partition_id, simulated.dataset) == (True, 2, None)
    assert (deployed.simulated, deployed.partition_id, deployed.dataset) == (False, None, "synthetic=40")
    assert simulated.state_dir is None and simulated.secagg_options().state_dir is None
    assert deployed.state_dir == Path.home() / ".fer-fl" / "7" == deployed.secagg_options().state_dir
    assert deployed.client_id == simulated.client_id == "7"  # the Flower node id when no client-id is set


@pytest.mark.parametrize(
    ("node_config", "key"),
    [
        ({"require-secure-agg": "ture"}, "require-secure-agg"),
        ({"share-metrics": "maybe"}, "share-metrics"),
        ({"dp-epsilon": "lots"}, "dp-epsilon"),
        ({"dp-epsilon": "-1"}, "dp-epsilon"),
        ({"dp-epsilon": "nan"}, "dp-epsilon"),
        ({"secagg-min-threshold": "2.5"}, "secagg-min-threshold"),
        ({"profile": "gpu"}, "profile"),
        ({"require-secureagg": "true"}, "require-secureagg"),
        ({"client-id": ""}, "client-id"),
        ({"dataset": None}, "dataset"),
    ],
)
def test_a_malformed_node_config_is_refused_in_one_line_naming_the_key(node_config, key):
    """A wrong type, an unknown key or a bad value is one NodeConfigError line naming the key, never a default."""
    # Prepare
    config = {"dataset": "synthetic=40", **node_config}
    if config["dataset"] is None:
        del config["dataset"]

    # Execute
    with pytest.raises(NodeConfigError) as caught:
        NodeSettings.from_node_config(config)

    # Assert
    assert key in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_deployed_node_cannot_claim_a_partition_without_being_simulated():
    """`simulated` and `partition-id` agree: a NodeSettings built by hand cannot mix a deployed node's seeding with
    a simulated node's partition."""
    # Execute / Assert
    with pytest.raises(NodeConfigError, match="partition-id"):
        NodeSettings(dataset="synthetic=40", partition_id=1)
    with pytest.raises(NodeConfigError, match="partition-id"):
        dataclasses.replace(NodeSettings(partition_id=1, simulated=True), partition_id=None)


def _plain_train_message(weights: list[np.ndarray]) -> Message:
    """A TRAIN message without SecAgg+ configs: the server asks for an update it can see on its own."""
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), {"server-round": 1}), True)
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN, group_id="1")


@pytest.mark.usefixtures("superlink_identity")
@pytest.mark.parametrize("node_config", [{"require-secure-agg": "on"}, {"require-secure-agg ": "true"},
                                         {"require_secure_agg": "true"}])
def test_a_misspelt_require_secure_agg_never_lets_a_plain_update_out(node_config):
    """Attack (a coordinator asks for a plain update): a node whose operator asked for SecAgg+ with a value or key the
    node does not understand refuses before training, instead of reading it as "not required" and sending its update
    in the clear."""
    from client.client_app import make_client_app, secure_aggregation_mod
    from server.server_app import initial_weights

    # Prepare
    settings = RunSettings(dataset="synthetic=40", model="cnn_am", out_dir="unused")
    context = Context(run_id=1, node_id=7, node_config={"dataset": "synthetic=40", **node_config},
                      state=RecordDict(), run_config=settings.to_run_config())
    app = make_client_app(mods=(secure_aggregation_mod,))

    # Execute
    with pytest.raises(NodeConfigError, match="require") as caught:
        app(_plain_train_message(initial_weights(settings)), context)

    # Assert
    assert "\n" not in str(caught.value)
