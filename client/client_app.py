"""The Flower ClientApp: a thin adapter between Flower's messages and the plain training loops in `client.task`.

It uses Flower's NumPyClient (legacy) path on purpose: in Flower 1.41 secure aggregation (SecAgg+) only runs there,
and one path for plain, DP and secure-aggregation runs means one thing to test.

This module only decides where a node's data and settings come from and mounts the SecAgg+ mod; the training
client itself (`client.trainer.FerClient`, torch and all) is imported when a message actually reaches it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context
from flwr.client import ClientApp

from client.config import RunSettings
from client.delivery_mod import receive_final_model
from client.node_config import NodeSettings, secagg_options
from client.node_data import load_node_data
from client.node_setup import NodeSetup
from privacy.ledger import PrivacyLedger
from privacy.secagg import make_secagg_mod

log = logging.getLogger("fer_fl.client")

# `provider(node, settings) -> NodeSetup`: where a node's data comes from (its dataset here; a partition of the
# simulation's in simulation/federation.py).
Provider = Callable[[NodeSettings, RunSettings], NodeSetup]


def setup_from_node_config(node: NodeSettings, settings: RunSettings) -> NodeSetup:
    """A real node: its dataset and profile come from the SuperNode's `--node-config`."""
    data = load_node_data(
        spec=node.dataset,
        client_id=node.client_id,
        image_size=settings.image_size,
        seed=settings.seed,
        test_fraction=settings.local_test_fraction,
    )
    return NodeSetup.with_profile(data=data, profile=node.client_profile, settings=settings, state_dir=node.state_dir)


def node_settings(settings: RunSettings, node: NodeSettings) -> RunSettings:
    """The run's settings as this node applies them: a node's own `dp-epsilon` caps the run's budget, and a node
    that keeps a privacy ledger trains under DP-SGD whatever the run asks.

    A site may hold itself to a stricter budget than the coordinator's, or insist on DP-SGD in a run that has
    none; it can never be made to spend more than it set. The node's ledger records the budget it first trained
    under and refuses a different one later, so the cap cannot be raised by restarting with another value.
    A deployed node with a ledger that gets a run without DP-SGD (`dp-epsilon = 0`) trains under its ledger's
    budget, δ and accountant (declining once that is spent), never without DP: its budget binds it, not the
    coordinator. A ledger it cannot open (missing key, tampering) raises, and the node declines.

    Args:
        settings: the run's settings.
        node: the node's parsed node config (its client id opens its ledger).
    """
    if node.dp_epsilon is not None:
        run = settings.dp_epsilon
        settings = settings.replace(dp_epsilon=min(node.dp_epsilon, run) if run > 0 else node.dp_epsilon)
    if settings.dp_enabled or node.simulated or node.state_dir is None:
        return settings  # simulated nodes' ledgers live in each run's own directory
    files = node.ledger_files(state_dir=node.state_dir)
    if not files.has_ledger():
        return settings
    files.check_not_wiped()
    ledger = PrivacyLedger.open_existing(files.ledger, key_file=files.key, anchor_path=files.anchor,
                                         client_id=node.client_id or "")
    log.warning("the run asks for no DP-SGD; this node keeps a privacy ledger and trains under its budget "
                "(epsilon %.4g, %.4g spent)", ledger.budget_epsilon, ledger.spent_epsilon)
    return settings.replace(dp_epsilon=ledger.budget_epsilon, dp_delta=ledger.delta, accountant=ledger.accountant)


def make_client_app(
    *, provider: Provider = setup_from_node_config, settings: RunSettings | None = None, mods: tuple = ()
) -> ClientApp:
    """Builds the ClientApp.

    Args:
        provider: `provider(node, settings) -> NodeSetup` decides where a node's data comes from.
        settings: fixed settings (an in-process simulation); None reads them from each message's run config.
        mods: Flower client mods (secure aggregation).
    """
    fixed = settings

    def client_fn(context: Context):
        # The node config is read here, once per message, and passed down parsed: nothing below reads a key.
        node = NodeSettings.from_node_config(context.node_config, node_id=context.node_id)
        settings = node_settings(fixed or RunSettings.from_run_config(dict(context.run_config)), node)
        setup = provider(node, settings)
        # Imported here, not at the top: SecAgg+'s key-exchange and unmask stages never reach the client, and
        # without torch to import their fresh ClientApp process answers seconds sooner (docs/deployment.md).
        from client.trainer import FerClient

        return FerClient(setup=setup, settings=settings, node=node, state=context.state).to_client()

    # Every ClientApp answers the coordinator's delivery of the final model (client/delivery_mod.py); a run that
    # never sends one (fer-sim) never reaches it.
    return ClientApp(client_fn=client_fn, mods=[*mods, receive_final_model])


# SecAgg+ is always mounted: it answers the protocol's stages when the server runs it and lets plain rounds through
# (unless the node requires secure aggregation). It validates only: the client already bounds its update (the
# training client here, or DP-SGD), and the site's own SecAgg+ options come from its node config.
secure_aggregation_mod = make_secagg_mod(node_options=secagg_options)
app = make_client_app(mods=(secure_aggregation_mod,))
