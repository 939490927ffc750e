"""The Flower ClientApp: a thin adapter between Flower's messages and the plain training loops in `client.task`.

It uses Flower's NumPyClient (legacy) path on purpose: in Flower 1.41 secure aggregation (SecAgg+) only runs there,
and one path for plain, DP and secure-aggregation runs means one thing to test.

What leaves the node is a model *delta* (new weights − received weights), validated and norm-bounded by
`privacy.guard` first: deltas quantise with far less error under secure aggregation than full weights, and a
NaN or an exploding update is caught here rather than turned into garbage the server cannot see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from torch.utils.data import DataLoader

from client import replay, task
from client.config import ConfigError, RunSettings
from client.dp_training import open_dp_client
from client.data.preprocess import Augment, FERTorchDataset
from client.node_data import NodeData, load_node_data
from models import create_model, model_info
from privacy.secagg import secure_aggregation_mod

log = logging.getLogger("fer_fl.client")


@dataclass(frozen=True)
class NodeSetup:
    """Everything node-specific a client needs: its data and how it trains (from its profile)."""

    data: NodeData
    profile: str
    local_epochs: int
    batch_size: int
    state_dir: Path


def setup_from_node_config(context: Context, settings: RunSettings) -> NodeSetup:
    """A real node: its dataset and profile come from the SuperNode's `--node-config`."""
    from client.profiles import PROFILES  # profiles are node settings, shared with simulations

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
    profile_name = str(cfg.get("profile", ""))
    profile = PROFILES.get(profile_name)
    state_dir = Path(str(cfg.get("state-dir", Path.home() / ".fer-fl" / client_id)))
    return NodeSetup(
        data=data,
        profile=profile_name or "default",
        local_epochs=profile.local_epochs if profile else settings.local_epochs,
        batch_size=profile.batch_size if profile else settings.batch_size,
        state_dir=state_dir,
    )


class FerClient(NumPyClient):
    """One node's training and evaluation for one message. Built fresh per message; state lives on disk."""

    def __init__(
        self, *, setup: NodeSetup, settings: RunSettings, node_index: int, node_config: dict | None = None
    ) -> None:
        self.setup = setup
        self.settings = settings
        self.node_index = node_index
        self.node_config = dict(node_config or {})

    def _model(self) -> torch.nn.Module:
        # Federated models always use the GroupNorm build: BatchNorm's running statistics are per-site data
        # statistics (a leak of their own) and average badly across non-IID sites.
        return create_model(self.settings.model, dp=True)

    def _seed(self, server_round: int) -> int:
        return self.settings.seed * 1_000_003 + self.node_index * 1_009 + server_round

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return task.get_weights(self._model())

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        server_round = int(config.get("server-round", 0))
        if not self.settings.dp_enabled or "partition-id" in self.node_config:
            # Simulated nodes keep their state inside the run directory, which must never hold individual
            # updates; and a simulation is never resumed mid-round.
            return self._fit(parameters, config)
        # A round run again after the coordinator resumed gets the update this node already released for it:
        # the same output again costs nothing, training again would be charged a second time (client/replay.py).
        digest = replay.global_digest(parameters)
        released = replay.load_released(self.setup.state_dir, server_round=server_round, digest=digest)
        if released is not None:
            log.info("round %d: re-sending the update already released for these global weights", server_round)
            return released
        delta, num_examples, metrics = self._fit(parameters, config)
        replay.save_released(self.setup.state_dir, server_round=server_round, digest=digest, delta=delta,
                             num_examples=num_examples, metrics=metrics)
        return delta, num_examples, metrics

    def _fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        server_round = int(config.get("server-round", 0))
        seed = self._seed(server_round)
        torch.manual_seed(seed)
        model = self._model()
        task.set_weights(model, parameters)
        data = self.setup.data
        dataset = FERTorchDataset(data.train_images, data.train_labels, augment=Augment(), seed=seed)
        loader = DataLoader(
            dataset,
            batch_size=min(self.setup.batch_size, max(1, len(dataset))),
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        optimizer = task.make_optimizer(model, name=self.settings.optimizer, lr=self.settings.lr)
        privacy: dict = {}
        if self.settings.dp_enabled:
            result, privacy = self._fit_private(model, optimizer, dataset, server_round)
        else:
            proximal_mu = float(config.get("proximal-mu", 0.0))
            reference = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
            result = task.train(
                model,
                loader,
                epochs=self.setup.local_epochs,
                optimizer=optimizer,
                proximal_mu=proximal_mu,
                reference=reference,
            )
        new_weights = task.get_weights(model)
        delta = [new - np.asarray(old, dtype=np.float32) for new, old in zip(new_weights, parameters)]
        delta, norm, clipped = bound_update(delta, max_norm=self.settings.update_bound)
        metrics = {
            "client-id": data.client_id,
            "profile": self.setup.profile,
            "train-loss": result.loss,
            "train-accuracy": result.accuracy,
            **{f"dp-{key}": value for key, value in privacy.items()},
        }
        if not self.settings.secure_agg:
            # Metrics travel in the clear even under SecAgg+; an individual update's norm must not.
            metrics.update({"update-norm": norm, "update-clipped": clipped})
        if self.settings.central_dp_enabled:
            # Central DP calibrates its noise for a uniform mean, so every client weighs 1 in the aggregate
            # (also under SecAgg+, where the weight is applied here, before masking); the count is reported apart.
            metrics["train-examples"] = data.num_train
            return delta, 1, metrics
        return delta, data.num_train, metrics

    def _fit_private(self, model, optimizer, dataset, server_round: int) -> tuple[task.TrainResult, dict]:
        """DP-SGD: the round's spend is charged to the node's ledger before training starts.

        `BudgetExhausted` propagates: Flower turns it into an error reply naming the reason, and the server
        carries on without this node.
        """
        cfg = self.node_config
        dp = open_dp_client(
            settings=self.settings,
            client_id=self.setup.data.client_id,
            state_dir=self.setup.state_dir,
            dataset_size=len(dataset),
            batch_size=self.setup.batch_size,
            local_epochs=self.setup.local_epochs,
            key_file=Path(cfg["ledger-key"]) if "ledger-key" in cfg else None,
            anchor_path=Path(cfg["ledger-anchor"]) if "ledger-anchor" in cfg else None,
            create_key="partition-id" in cfg,
        )
        plan = dp.begin_round(server_round=server_round)
        private = dp.make_private(
            model=model, optimizer=optimizer, dataset=dataset, plan=plan,
            grad_sample_mode=model_info(self.settings.model)["dp_engine"],
        )
        result = task.train(
            private.model, private.loader, epochs=plan.local_epochs, optimizer=private.optimizer,
            criterion=private.criterion,
        )
        return result, dp.status()

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        data = self.setup.data
        model = self._model()
        task.set_weights(model, parameters)
        loader = DataLoader(FERTorchDataset(data.test_images, data.test_labels), batch_size=256)
        result = task.evaluate(model, loader)
        return result.loss, result.num_examples, {"client-id": data.client_id, "accuracy": result.accuracy}


def bound_update(delta: list[np.ndarray], *, max_norm: float) -> tuple[list[np.ndarray], float, bool]:
    """Refuses a non-finite update and scales one whose global L2 norm exceeds `max_norm` down to it.

    Returns the (possibly scaled) arrays, the original norm and whether it was scaled.
    """
    for array in delta:
        if not np.all(np.isfinite(array)):
            raise FloatingPointError("local training produced a non-finite update; refusing to send it")
    norm = float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in delta)))
    if norm <= max_norm:
        return delta, norm, False
    scale = max_norm / norm
    return [(a * scale).astype(np.float32) for a in delta], norm, True


def node_settings(settings: RunSettings, node_config: dict) -> RunSettings:
    """The run's settings as this node applies them: a node's own `dp-epsilon` caps the run's budget.

    A site may hold itself to a stricter budget than the coordinator's, or insist on DP-SGD in a run that has
    none; it can never be made to spend more than it set. The node's ledger records the budget it first trained
    under and refuses a different one later, so the cap cannot be raised by restarting with another value.
    """
    if "dp-epsilon" not in node_config:
        return settings
    own = float(node_config["dp-epsilon"])
    if not own > 0:
        raise ConfigError(f"node-config dp-epsilon must be positive, got {own}")
    run = settings.dp_epsilon
    return settings.replace(dp_epsilon=min(own, run) if run > 0 else own)


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
        settings = node_settings(fixed or RunSettings.from_run_config(dict(context.run_config)), context.node_config)
        setup = provider(context, settings)
        node_index = int(context.node_config.get("partition-id", 0))
        return FerClient(
            setup=setup, settings=settings, node_index=node_index, node_config=dict(context.node_config)
        ).to_client()

    return ClientApp(client_fn=client_fn, mods=list(mods))


# SecAgg+ is always mounted: it answers the protocol's stages when the server runs it and lets plain rounds through
# (unless the node requires secure aggregation). The client already bounds its update, so the mod only checks.
app = make_client_app(mods=(secure_aggregation_mod,))
