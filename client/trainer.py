"""One node's training and evaluation for one Flower message: the NumPyClient the ClientApp builds.

Kept apart from `client.client_app` so that importing the ClientApp stays light: under SecAgg+ three of a
round's four messages are protocol stages the secure-aggregation mod answers without ever reaching this client,
and in a deployment every message starts a fresh ClientApp process, which then need not import torch.

What leaves the node is a model *delta* (new weights − received weights), validated and norm-bounded first:
deltas quantise with far less error under secure aggregation than full weights, and a NaN or an exploding
update is caught here rather than turned into garbage the server cannot see.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.client import NumPyClient
from torch.utils.data import DataLoader

from client import replay, task, wire
from client.config import RECIPE, RunSettings, parse_label_prior
from client.data.preprocess import FERTorchDataset, make_augment
from client.dp_training import open_dp_client
from client.node_config import NodeSettings
from client.node_setup import NodeSetup
from models import create_model, freeze_for_dp, model_info
from privacy.guard import UpdateRejected, scale_update, update_norm
from privacy.report import dp_metrics

log = logging.getLogger("fer_fl.client")


def momentum_record(model: str) -> str:
    """The key of keep-momentum's buffers in the node's context state (never sent). Flower keeps a node's context
    for a run series, not only a run (flwr 1.41 supernode: push_task_output saves the ClientApp's context under the
    run's series), so the key names the model: buffers of another architecture are never loaded."""
    return f"fer-fl.momentum.{model}"


SLICE_SEED_RECORD = "fer-fl.slice-seed"  # a deployed node's local-splits seed in its context state (never sent)


class FerClient(NumPyClient):
    """One node's training and evaluation for one message. Built fresh per message; state lives on disk, and in the
    node's Flower context (`state`) for what the node keeps only while the run lasts."""

    def __init__(self, *, setup: NodeSetup, settings: RunSettings, node: NodeSettings,
                 state: RecordDict | None = None) -> None:
        self.setup = setup
        self.settings = settings
        self.node = node
        # The node's Flower context state: what the node keeps in memory between a run's messages (the SuperNode
        # holds it; a fresh ClientApp process gets it with each message). `keep-momentum` keeps its buffers here.
        self.state = state if state is not None else RecordDict()

    def _model(self) -> torch.nn.Module:
        # Federated models always use the GroupNorm build: BatchNorm's running statistics are per-site data
        # statistics (a leak of their own) and average badly across non-IID sites.
        return create_model(self.settings.model, dp=True)

    def _seed(self, server_round: int) -> int:
        """The seed of this round's torch generator (augmentation, shuffling, dropout; DP noise in simulations).

        A simulation is reproducible: the seed follows from the run's seed, the node's partition and the round,
        so no two nodes share batches or noise, and privacy.json says the noise was seeded. A deployed node seeds
        from the OS: the coordinator knows the run's seed, and every real node used to share index 0, so it
        could regenerate a node's batches and noise (its DP noise is drawn from a CSPRNG anyway, privacy.dp).
        """
        if not self.node.simulated:
            return secrets.randbits(63)
        return self.settings.seed * 1_000_003 + self.node.partition_id * 1_009 + server_round

    def _slice_seed(self) -> int:
        """The seed of the permutations `local-splits` cuts into rounds (task.round_slice), the same every round so
        that `splits` rounds train each face once. Simulated: `_seed` of round 0, which never trains. Deployed:
        drawn from the OS at the node's first round and kept in its context state."""
        if self.node.simulated:
            return self._seed(0)
        kept = self.state.config_records.get(SLICE_SEED_RECORD)
        if kept is None:
            kept = ConfigRecord({"seed": secrets.randbits(62)})
            self.state[SLICE_SEED_RECORD] = kept
        return int(kept["seed"])

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return wire.get_weights(self._model())

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        server_round = int(config.get("server-round", 0))
        if not self.settings.dp_enabled or self.node.simulated:
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
        wire.set_weights(model, parameters)
        data = self.setup.data
        privacy: dict = {}
        # dp-train (under DP-SGD or central DP): what is not trained is frozen before the optimiser and Opacus see
        # the model, so it gets no gradient and no noise and goes back unchanged (a zero delta). "all" freezes nothing.
        size = self.settings.image_size
        counts = freeze_for_dp(model, self.settings.dp_train, input_size=(1, size, size))
        if self.settings.dp_enabled:
            # DP-SGD keeps its own recipe (dp-optimizer, a constant dp-lr, the light augmentation, which runs in
            # the data loader, before per-sample clipping); the model's recipe is for non-private training.
            augment = make_augment(self.settings.augment if self.settings.augment != RECIPE else "light")
            dataset = FERTorchDataset(data.train_images, data.train_labels, augment=augment, seed=seed,
                                      views=self.settings.aug_mult)
            optimizer = task.make_optimizer(model, name=self.settings.train_optimizer, lr=self.settings.train_lr)
            result, privacy = self._fit_private(model, optimizer, dataset, server_round)
            privacy = {**privacy, "dp_train": self.settings.dp_train, "trainable_params": counts.trainable,
                       "frozen_params": counts.frozen}
        else:
            carry = None
            if self.settings.keep_momentum:  # the momentum this node ended its last round with, if any
                kept = self.state.array_records.get(momentum_record(self.settings.model))
                carry = task.MomentumCarry(buffers=kept.to_numpy_ndarrays() if kept is not None else None)
                if kept is not None:
                    log.info("round %d: training on from the momentum this node kept from its last round", server_round)
            # FedProx pulls towards, and FedNTD distils from, the global model as this round received it.
            result = task.train_round(
                model, data.train_images, data.train_labels, recipe=self.settings.recipe(synthetic=data.synthetic),
                batch_size=self.setup.batch_size, seed=seed, server_round=server_round,
                num_rounds=self.settings.num_server_rounds, epochs=self.setup.local_epochs,
                splits=self.settings.local_splits, slice_seed=self._slice_seed(),
                label_prior=fit_label_prior(config, self.settings),
                proximal_mu=float(config.get("proximal-mu", 0.0)), ntd_beta=self.settings.ntd_beta,
                carry=carry,
            )
            if carry is not None:
                self.state[momentum_record(self.settings.model)] = ArrayRecord(numpy_ndarrays=carry.buffers)
        new_weights = wire.get_weights(model)
        delta = [new - np.asarray(old, dtype=np.float32) for new, old in zip(new_weights, parameters)]
        delta, norm, clipped = bound_update(delta, max_norm=self.settings.update_bound)
        metrics = {
            "client-id": data.client_id,
            "profile": self.setup.profile,
            **dp_metrics(privacy),
        }
        if releases_train_metrics(self.settings, share_metrics=self.node.share_metrics):
            metrics.update({"train-loss": result.loss, "train-accuracy": result.accuracy})
        if not self.settings.secure_agg:
            # Metrics travel in the clear even under SecAgg+; an individual update's norm must not.
            metrics.update({"update-norm": norm, "update-clipped": clipped})
        if self.settings.central_dp_enabled:
            # Central DP calibrates its noise for a uniform mean, so every client weighs 1 in the aggregate
            # (also under SecAgg+, where the weight is applied here, before masking); the count is reported apart,
            # unless SecAgg+ hides per-site figures and the site did not opt in.
            if not self.settings.secure_agg or self.node.share_metrics:
                metrics["train-examples"] = data.num_train
            return delta, 1, metrics
        return delta, data.num_train, metrics

    def _fit_private(self, model, optimizer, dataset, server_round: int) -> tuple[task.TrainResult, dict]:
        """DP-SGD: the round's spend is charged to the node's ledger before training starts.

        `BudgetExhausted` propagates: Flower turns it into an error reply naming the reason, and the server
        carries on without this node.
        """
        dp = open_dp_client(
            settings=self.settings,
            client_id=self.setup.data.client_id,
            files=self.node.ledger_files(state_dir=self.setup.state_dir),
            dataset_size=len(dataset),
            batch_size=self.setup.batch_size,
            local_epochs=self.setup.local_epochs,
            simulated=self.node.simulated,
        )
        plan = dp.begin_round(server_round=server_round)
        private = dp.make_private(
            model=model, optimizer=optimizer, dataset=dataset, plan=plan,
            grad_sample_mode=model_info(self.settings.model)["dp_engine"], views=self.settings.aug_mult,
        )
        result = task.train(
            private.model, private.loader, epochs=plan.local_epochs, optimizer=private.optimizer,
            criterion=private.criterion,
        )
        return result, dp.status()

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        data = self.setup.data
        if not releases_evaluation(self.settings, share_metrics=self.node.share_metrics):
            # Accuracy, loss and size of the local test split are figures of private data that neither DP-SGD
            # nor SecAgg+ covers: the reply says they are withheld and carries none (not even the count).
            return 0.0, 0, {"client-id": data.client_id, "metrics-withheld": True}
        model = self._model()
        wire.set_weights(model, parameters)
        loader = DataLoader(FERTorchDataset(data.test_images, data.test_labels), batch_size=256)
        result = task.evaluate(model, loader, flip_tta=self.settings.recipe().flip_tta)
        return result.loss, result.num_examples, {"client-id": data.client_id, "accuracy": result.accuracy}


def fit_label_prior(config: dict, settings: RunSettings) -> tuple[float, ...] | None:
    """The label mix logit-adjust trains towards, as the server resolved it for this run (`label-prior` in the fit
    config, server.public_pretrain.target_label_prior); None when the run's recipe does not logit-adjust.

    Raises:
        ValueError: the recipe logit-adjusts but the fit config has no valid label-prior (Flower turns this into an
            error reply naming the reason, and the round goes on without this site).
    """
    if settings.recipe().class_balance != "logit-adjust":
        return None
    if "label-prior" not in config:
        raise ValueError("class-balance logit-adjust needs the server's label-prior in the fit config; it sent none")
    return parse_label_prior(str(config["label-prior"]), key="the fit config's label-prior")


def releases_train_metrics(settings: RunSettings, *, share_metrics: bool) -> bool:
    """Whether the fit reply may carry the training loss and accuracy (`share_metrics`: the site's operator opted in
    to sharing per-site figures, `fer-client start --share-metrics`).

    Both are computed on the private Poisson batches. Under DP-SGD they are outside the accountant, so they never
    leave (the simplest honest choice: noising and accounting them would cost budget for a progress figure; the
    server evaluates the global model on its own test set). Under SecAgg+ the site's update is hidden in the sum,
    and a per-site figure in the clear would undo part of that, so only a site that opted in sends them.
    """
    if settings.dp_enabled:
        return False
    return not settings.secure_agg or share_metrics


def releases_evaluation(settings: RunSettings, *, share_metrics: bool) -> bool:
    """Whether the evaluate reply may carry the local test split's loss, accuracy and size: always in a plain
    run, and under DP-SGD or SecAgg+ only when the site opted in (these figures are neither noised nor masked)."""
    if settings.dp_enabled or settings.secure_agg:
        return share_metrics
    return True


def bound_update(delta: list[np.ndarray], *, max_norm: float) -> tuple[list[np.ndarray], float, bool]:
    """Refuses a non-finite update and scales one whose global L2 norm exceeds `max_norm` down to it.

    Returns the (possibly scaled) arrays, the original norm and whether it was scaled.
    """
    try:
        norm = update_norm(delta)
    except UpdateRejected as err:
        raise FloatingPointError(f"local training produced a non-finite update ({err}); refusing to send it") from None
    if norm <= max_norm:
        return delta, norm, False
    return scale_update(delta, max_norm / norm), norm, True
