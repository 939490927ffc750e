"""The centralised baseline every federated result is compared with.

Same model, same loops (`client.task`), same training data (the union of the federated clients' local training
sets, and the public slice when the federation's server trains on it each round: server-learning; so the comparison
isolates federation itself), same number of passes over each sample
(rounds × local epochs), same held-out test set, the same round 0 (init-model and public pretraining:
server_app.initial_weights) and the same run-directory outputs, one "round" per
`local-epochs` epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from client import task, wire
from client.config import RunSettings
from client.node_data import cached_dataset, node_data_from_indices
from models import create_model
from privacy.report import privacy_report
from server.evaluation import ServerEvaluator
from server.head_refit import HeadRefit
from server.public_pretrain import public_data, public_training_data, target_label_prior
from server.report import write_report
from server.records import RoundRecord, RoundReport, RunSummary, build_round, summarize
from server.rundir import RunDirectory
from server.server_app import data_meta, initial_weights, load_server_test_set
from simulation.federation import federation_plan, federation_stats


def pooled_training_data(settings: RunSettings) -> tuple[np.ndarray, np.ndarray]:
    """The union of every simulated client's local training set (their local test sets stay out); with
    server-learning also the public slice, which the federation's server then trains on as often as the sites train
    on theirs, so both sides see every face the same number of times."""
    images, labels = [], []
    if settings.server_learning:
        public_images, public_labels, _ = public_training_data(settings)
        images.append(public_images)
        labels.append(public_labels)
    for index, plan in enumerate(federation_plan(settings)):
        dataset = cached_dataset(plan.dataset_spec, settings.image_size, settings.seed)
        data = node_data_from_indices(
            dataset, plan.indices, client_id=plan.client_id,
            test_fraction=settings.local_test_fraction, seed=settings.seed + index,
        )
        images.append(data.train_images)
        labels.append(data.train_labels)
    return np.concatenate(images), np.concatenate(labels)


def run_centralized(
    settings: RunSettings, *, run_dir: RunDirectory, on_round: Callable[[RoundRecord], None] | None = None
) -> RunSummary:
    """Trains on the pooled data and writes the same run directory as a federated run (summary.json says
    mode "centralized")."""
    started = time.perf_counter()
    run_dir.write_config(settings.to_run_config())
    run_dir.write_partition(federation_stats(settings))
    images, labels = pooled_training_data(settings)
    test_set = load_server_test_set(settings)
    synthetic = any(p.dataset_spec.startswith("synthetic") for p in federation_plan(settings))
    recipe = settings.recipe(synthetic=synthetic)
    evaluator = ServerEvaluator(model_name=settings.model, images=test_set[0], labels=test_set[1],
                                flip_tta=recipe.flip_tta) if test_set else None

    model = create_model(settings.model, dp=True)
    wire.set_weights(model, initial_weights(settings))
    # The recipe's schedule runs over the same "rounds" (groups of local-epochs epochs) as the federation's; one
    # optimiser for the whole run (its momentum carries on, as centralised training's does).
    local = task.prepare_training(model, images, labels, recipe=recipe, batch_size=settings.batch_size,
                                  seed=settings.seed, server_round=1, num_rounds=settings.num_server_rounds,
                                  label_prior=target_label_prior(settings))

    def score(server_round: int, weights: list[np.ndarray]) -> dict | None:
        if evaluator is None:
            return None
        loss, metrics = evaluator(server_round, weights)
        return {"loss": loss, **metrics}

    def record(server_round: int, seconds: float, train_loss: float | None, head_refit=None) -> None:
        server = score(server_round, wire.get_weights(model))
        # One "client" (the pooled data) whose update is always accepted.
        tally = RoundReport(num_results=1, num_accepted=1, train_loss=train_loss, head_refit=head_refit)
        entry = build_round(server_round, seconds=seconds, report=tally, server=server)
        run_dir.append_round(entry)
        if on_round is not None:
            on_round(entry)

    torch.manual_seed(settings.seed)
    record(0, 0.0, None)
    for server_round in range(1, settings.num_server_rounds + 1):
        round_started = time.perf_counter()
        result = task.train(
            model, local.loader, epochs=settings.local_epochs, optimizer=local.optimizer, criterion=local.criterion,
            lr_at=recipe.round_schedule(server_round=server_round, num_rounds=settings.num_server_rounds),
        )
        refit = None
        if settings.head_refit and server_round == settings.num_server_rounds:
            # The federation's end-of-run step, taken the same way here so that the comparison stays fair.
            weights, refit = HeadRefit(settings)(wire.get_weights(model),
                                                 evaluate=lambda w: score(server_round, w))
            wire.set_weights(model, weights)
        record(server_round, time.perf_counter() - round_started, result.loss, refit)
        run_dir.save_model(model.state_dict(), model_name=settings.model, model_cfg={"dp": True},
                           round=server_round, checkpoint=True, **data_meta(settings))
    run_dir.save_model(model.state_dict(), model_name=settings.model, model_cfg={"dp": True},
                       round=settings.num_server_rounds, **data_meta(settings))
    public = public_data(settings)
    if public is not None:
        # The baseline trains without DP; privacy.json then only says which data round 0 learnt from in the clear.
        run_dir.write_privacy(privacy_report(clients=[], central=None, secure_aggregation=False, public_data=public))
    summary = summarize(run_dir.rounds(), seconds=time.perf_counter() - started, settings=settings,
                        mode="centralized").replace(train_examples=int(len(labels)), synthetic=synthetic)
    run_dir.write_summary(summary)
    write_report(run_dir.path)
    return summary
