"""The Flower ClientApp: a thin adapter between Flower's messages and the plain training loops in `client.task`.

It uses Flower's NumPyClient (legacy) path on purpose: in Flower 1.41 secure aggregation (SecAgg+) only runs there,
and one path for plain, DP and secure-aggregation runs means one thing to test.

This module only decides where a node's data and settings come from and mounts the SecAgg+ mod; the training
client itself (`client.trainer.FerClient`, torch and all) is imported when a message actually reaches it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.client import ClientApp

from client.config import ConfigError, RunSettings
from client.dp_training import LedgerFiles
from client.node_data import load_node_data
from client.node_setup import NodeSetup
from client.profiles import PROFILES  # profiles are node settings, shared with simulations
from privacy.ledger import PrivacyLedger
from privacy.secagg import secure_aggregation_mod

log = logging.getLogger("fer_fl.client")


def setup_from_node_config(context: Context, settings: RunSettings) -> NodeSetup:
    """A real node: its dataset and profile come from the SuperNode's `--node-config`."""
    cfg = context.node_config
    if "dataset" not in cfg:
        raise ValueError("node config has no 'dataset' (start the node with fer-client --dataset KIND=PATH)")
    client_id = str(cfg.get("client-id", context.node_id))
    data = load_node_data(
        spec=str(cfg["dataset"]),
        client_id=client_id,
        image_size=settings.image_size,
        seed=settings.seed,
        test_fraction=settings.local_test_fraction,
    )
    profile = PROFILES.get(str(cfg.get("profile", "")))
    return NodeSetup.with_profile(data=data, profile=profile, settings=settings,
                                  state_dir=node_state_dir(cfg, client_id))


def node_state_dir(node_config: dict, client_id: str) -> Path:
    """A deployed node's private folder (ledger, released update): `state-dir`, else ~/.fer-fl/CLIENT_ID."""
    return Path(str(node_config.get("state-dir", Path.home() / ".fer-fl" / client_id)))


def node_settings(settings: RunSettings, node_config: dict, *, client_id: str | None = None) -> RunSettings:
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
        node_config: the SuperNode's node config.
        client_id: the node's identity (default: its `client-id`); needed to open its ledger.
    """
    if "dp-epsilon" in node_config:
        own = float(node_config["dp-epsilon"])
        if not own > 0:
            raise ConfigError(f"node-config dp-epsilon must be positive, got {own}")
        run = settings.dp_epsilon
        settings = settings.replace(dp_epsilon=min(own, run) if run > 0 else own)
    if settings.dp_enabled or "partition-id" in node_config:
        return settings  # simulated nodes' ledgers live in each run's own directory
    client_id = client_id or str(node_config.get("client-id", ""))
    files = LedgerFiles.from_node_config(state_dir=node_state_dir(node_config, client_id), node_config=node_config)
    if not files.has_ledger():
        return settings
    files.check_not_wiped()
    ledger = PrivacyLedger.open_existing(files.ledger, key_file=files.key, anchor_path=files.anchor,
                                         client_id=client_id)
    log.warning("the run asks for no DP-SGD; this node keeps a privacy ledger and trains under its budget "
                "(epsilon %.4g, %.4g spent)", ledger.budget_epsilon, ledger.spent_epsilon)
    return settings.replace(dp_epsilon=ledger.budget_epsilon, dp_delta=ledger.delta, accountant=ledger.accountant)


def make_client_app(
    *, provider=setup_from_node_config, settings: RunSettings | None = None, mods: tuple = ()
) -> ClientApp:
    """Builds the ClientApp.

    Args:
        provider: `provider(context, settings) -> NodeSetup` decides where a node's data comes from.
        settings: fixed settings (an in-process simulation); None reads them from each message's run config.
        mods: Flower client mods (secure aggregation).
    """
    fixed = settings

    def client_fn(context: Context):
        settings = node_settings(fixed or RunSettings.from_run_config(dict(context.run_config)), context.node_config,
                                 client_id=str(context.node_config.get("client-id", context.node_id)))
        setup = provider(context, settings)
        node_index = int(context.node_config.get("partition-id", 0))
        # Imported here, not at the top: SecAgg+'s key-exchange and unmask stages never reach the client, and
        # without torch to import their fresh ClientApp process answers seconds sooner (docs/deployment.md).
        from client.trainer import FerClient

        return FerClient(
            setup=setup, settings=settings, node_index=node_index, node_config=dict(context.node_config)
        ).to_client()

    return ClientApp(client_fn=client_fn, mods=list(mods))


# SecAgg+ is always mounted: it answers the protocol's stages when the server runs it and lets plain rounds through
# (unless the node requires secure aggregation). The client already bounds its update, so the mod only checks.
app = make_client_app(mods=(secure_aggregation_mod,))
