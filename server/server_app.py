"""The Flower ServerApp: builds the strategy, runs the rounds, and writes the run directory.

It runs on Flower's legacy workflow path (LegacyContext + a `flwr.server.strategy` strategy): in Flower 1.41 that is
the only path on which SecAgg+ works, so plain, DP and secure-aggregation runs all share it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.compat.common import recorddict_compat as compat
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_evaluate_workflow,
    default_fit_workflow,
)
from flwr.serverapp import Grid, ServerApp

from client import wire
from client.config import RunSettings
from client.node_data import cached_dataset, parse_dataset_list
from models import create_model
from models.finetune import trainable_mask
from privacy.central import CentralDP
from privacy.report import PrivacyReport, privacy_report
from server.delivery import deliver_at_end
from server.ema import ParameterEMA
from server.evaluation import ServerEvaluator
from server.init_model import init_model_weights
from server.public_pretrain import pretrain_on_public, public_data, target_label_prior
from server.head_refit import HeadRefit
from server.server_learning import ServerLearning
from server.ledger_registry import NodeLedgers
from server.records import RoundRecord, build_round, format_round, summarize
from server.replies import is_finite_number
from server.rundir import RunDirectory
from server.secagg import QuantizationCost, make_secagg_workflow
from server.strategies import create_strategy
from server.strategy import GuardedStrategy

log = logging.getLogger("fer_fl.server")

RoundCallback = Callable[[RoundRecord], None]

# 2**24 levels per value keeps clients x levels below the 2**32 modulus for up to 255 clients per round.
SECAGG_QUANTIZATION_RANGE = 2**24


@dataclass(frozen=True)
class ResumeState:
    """Where a resumed run starts: the weights after `completed_round`."""

    weights: list[np.ndarray]
    completed_round: int


def data_meta(settings: RunSettings) -> dict[str, Any]:
    """What a saved model's card needs to rebuild its test data (RunDirectory.save_model's keywords): the synthetic
    faces depend on the seed."""
    return {"data_seed": settings.seed, "image_size": settings.image_size, "dataset": settings.dataset}


def weighted_mean_of(key: str) -> Callable[[list[tuple[int, dict[str, Any]]]], dict[str, float]]:
    """A Flower metrics aggregator: the example-weighted mean of `key` over the replies that carry it.

    The guard hands it checked metrics only; it still skips anything that is not a finite number (a metric value
    of "oops" once raised ValueError here and ended the round)."""

    def aggregate(replies: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
        pairs = [
            (int(n), float(m[key]))
            for n, m in replies
            if is_finite_number(n) and n > 0 and isinstance(m, dict) and is_finite_number(m.get(key))
        ]
        total = sum(n for n, _ in pairs)
        return {key: sum(n * v for n, v in pairs) / total} if total else {}

    return aggregate


def initial_weights(settings: RunSettings) -> list[np.ndarray]:
    """Round 0's global model: the one `init-model` names (server/init_model.py), else a seeded random one, so the
    same seed gives the same run; then, with `public-fraction`, pretrained on the public slice
    (server/public_pretrain.py), once, here, before round 1."""
    if settings.init_model:
        weights = init_model_weights(settings)
    else:
        torch.manual_seed(settings.seed)
        weights = wire.get_weights(create_model(settings.model, dp=True))
    return pretrain_on_public(settings, weights)


def load_server_test_set(settings: RunSettings) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The held-out test split(s) of the run's dataset(s), pooled; None when no dataset has a test split."""
    images, labels, synthetic = [], [], False
    for entry in parse_dataset_list(settings.dataset):
        dataset = cached_dataset(entry.spec, settings.image_size, settings.seed)
        synthetic = synthetic or dataset.synthetic
        if "test" in dataset.splits:
            images.append(dataset.splits["test"].images)
            labels.append(dataset.splits["test"].labels)
    if not images:
        return None
    return np.concatenate(images), np.concatenate(labels), synthetic


def build_strategy(settings: RunSettings, weights: list[np.ndarray]) -> GuardedStrategy:
    """The configured Flower strategy inside the update guard, with server-side evaluation."""
    proximal_mu = settings.proximal_mu if settings.strategy == "fedprox" else 0.0
    prior = target_label_prior(settings)
    # logit-adjust's target mix, resolved once here (the public slice is the coordinator's): frequencies as text,
    # since a fit config holds scalars only; the sites parse it with client.config.parse_label_prior.
    label_prior = {"label-prior": ",".join(f"{v:.8g}" for v in prior)} if prior is not None else {}

    def fit_config(server_round: int) -> dict[str, Any]:
        return {"server-round": server_round, "proximal-mu": proximal_mu, **label_prior}

    common = {
        "fraction_fit": settings.fraction_fit,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_fit_clients": 1,
        "min_evaluate_clients": 1 if settings.fraction_evaluate > 0 else 0,
        "min_available_clients": settings.min_clients,
        "initial_parameters": ndarrays_to_parameters(weights),
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": lambda r: {"server-round": r},
        "accept_failures": True,
        # The guard already records each client's loss and count; these keep Flower from warning every round.
        "fit_metrics_aggregation_fn": weighted_mean_of("train-loss"),
        "evaluate_metrics_aggregation_fn": weighted_mean_of("accuracy"),
    }
    inner = create_strategy(
        settings.strategy,
        common=common,
        options={
            "proximal_mu": settings.proximal_mu,
            "server_lr": settings.server_lr,
            "server_momentum": settings.server_momentum,
            "server_tau": settings.server_tau,
            "trimmed_beta": settings.trimmed_beta,
            "krum_malicious": settings.krum_malicious,
        },
    )
    test_set = load_server_test_set(settings)
    evaluator = None
    if test_set is not None:
        evaluator = ServerEvaluator(model_name=settings.model, images=test_set[0], labels=test_set[1],
                                    flip_tta=settings.recipe().flip_tta)
    return GuardedStrategy(
        inner,
        ledgers=NodeLedgers(Path(settings.ledger_registry) if settings.ledger_registry else None),
        expected_shapes=[w.shape for w in weights],
        max_update_norm=settings.max_update_norm,
        max_examples=settings.max_examples,
        evaluate_fn=evaluator,
        central_dp=central_dp_of(settings) if settings.central_dp_enabled else None,
        secure_aggregation=settings.secure_agg,
        norm_bound=settings.norm_bound,
        ema=ParameterEMA(decay=settings.server_ema, weights=weights) if settings.server_ema > 0 else None,
        server_step=ServerLearning(settings) if settings.server_learning else None,
        head_refit=HeadRefit(settings) if settings.head_refit else None,
        final_round=settings.num_server_rounds,
    )


def central_dp_of(settings: RunSettings) -> CentralDP:
    """The server's central-DP settings; with dp-train, the part of the model it trains and noises."""
    trainable = None
    if settings.dp_train != "all":
        size = settings.image_size
        mask = trainable_mask(create_model(settings.model, dp=True), settings.dp_train, input_size=(1, size, size))
        trainable = (mask.numpy(),)
    return CentralDP(noise_multiplier=settings.central_dp_noise, clipping_norm=settings.central_clip,
                     trainable=trainable)


@dataclass(kw_only=True)
class FerWorkflow:
    """Flower's DefaultWorkflow loop, plus what a real run needs: a start round (resume), a record and a
    checkpoint after every round, and a callback for progress display.

    Args:
        strategy: the guarded strategy (also the source of each round's report).
        num_rounds: the last round to run.
        start_weights: global weights to start from.
        start_round: first round to run (> 1 when resuming).
        fit_workflow: Flower fit workflow (the default one, or the secure-aggregation one).
        on_round: called with each round's record (round 0 = the initial model), after it is complete.
    """

    strategy: GuardedStrategy
    num_rounds: int
    start_weights: list[np.ndarray]
    start_round: int = 1
    fit_workflow: Callable[[Grid, LegacyContext], None] = default_fit_workflow
    evaluate_clients: bool = True
    on_round: RoundCallback | None = None
    final_weights: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.final_weights = self.start_weights

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        try:
            c_done.wait()
            parameters = ndarrays_to_parameters(self.start_weights)
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, True)
            cfg = ConfigRecord()
            cfg[Key.START_TIME] = time.perf_counter()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            if self.start_round == 1:
                started = time.perf_counter()
                self.strategy.evaluate(0, parameters)
                self._done(self._record(0, time.perf_counter() - started))
            for server_round in range(self.start_round, self.num_rounds + 1):
                started = time.perf_counter()
                cfg[Key.CURRENT_ROUND] = server_round
                self.fit_workflow(grid, context)
                default_centralized_evaluation_workflow(grid, context)
                if self.evaluate_clients:
                    default_evaluate_workflow(grid, context)
                self.final_weights = self._current_weights(context)
                self._done(self._record(server_round, time.perf_counter() - started))
        finally:
            f_stop.set()
            thread.join()

    def _done(self, record: RoundRecord) -> None:
        if self.on_round is not None:
            self.on_round(record)

    @staticmethod
    def _current_weights(context: LegacyContext) -> list[np.ndarray]:
        record = context.state.array_records[MAIN_PARAMS_RECORD]
        from flwr.common import parameters_to_ndarrays

        return parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))

    def _record(self, server_round: int, seconds: float) -> RoundRecord:
        failed = [f for f in getattr(self.fit_workflow, "failed_rounds", []) if f.server_round == server_round]
        cost = getattr(self.fit_workflow, "quantization", {}).get(server_round)
        return build_round(
            server_round, seconds=seconds, report=self.strategy.report(server_round),
            server=self.strategy.server_metrics.get(server_round), privacy=self.strategy.privacy,
            failure=str(failed[0]) if failed else None, quantization=None if cost is None else cost.to_json(),
        )


def run_federation(
    grid: Grid,
    context: Context,
    settings: RunSettings,
    *,
    run_dir: RunDirectory,
    resume: ResumeState | None = None,
    on_round: RoundCallback | None = None,
) -> list[np.ndarray]:
    """Runs the configured federation to its last round, writing every round to `run_dir`. Returns final weights."""
    weights = resume.weights if resume else initial_weights(settings)
    strategy = build_strategy(settings, weights)
    started = time.perf_counter()

    def record_round(record: RoundRecord) -> None:
        # Checkpoint first: a round that shows in metrics.jsonl always has its checkpoint, so a server killed
        # right after logging round r resumes from r, not from an earlier round.
        if record.round > 0:
            run_dir.save_model(
                _state_dict(settings, workflow.final_weights),
                model_name=settings.model,
                model_cfg={"dp": True},
                round=record.round,
                checkpoint=True,
                **data_meta(settings),
            )
        run_dir.append_round(record)
        log.info("%s", format_round(record, num_rounds=settings.num_server_rounds))
        if on_round is not None:
            on_round(record)

    fit_workflow = default_fit_workflow
    if settings.secure_agg:
        fit_workflow = make_secagg_workflow(
            num_shares=settings.secagg_shares,
            reconstruction_threshold=settings.secagg_threshold,
            # Clients bound each delta's L2 norm by update-bound (central-clip under central DP, else max-update-norm),
            # so no coordinate exceeds it: nothing is clipped, and the quantisation step 2c/T is as small as it can be.
            clipping_range=settings.update_bound,
            quantization_range=SECAGG_QUANTIZATION_RANGE,
            # Under central DP every client reports a weight of 1; max-weight 1 then spends all T levels on the value
            # (with 10 000 a weight of 1 quantises to 1678 levels and each value's error grows 10 000-fold).
            max_weight=1.0 if settings.central_dp_enabled else settings.secagg_max_weight,
            timeout=settings.secagg_timeout or None,
        )
    workflow = FerWorkflow(
        fit_workflow=fit_workflow,
        strategy=strategy,
        num_rounds=settings.num_server_rounds,
        start_weights=weights,
        start_round=(resume.completed_round + 1) if resume else 1,
        evaluate_clients=settings.fraction_evaluate > 0,
        on_round=record_round,
    )
    legacy = LegacyContext(context=context, config=ServerConfig(
        num_rounds=settings.num_server_rounds, round_timeout=settings.round_timeout or None
    ), strategy=strategy)
    workflow(grid, legacy)
    # With server-ema the run's model is the average (checkpoints keep the raw model that training resumes from);
    # with head-refit, that model with its classifier re-fitted in the last round.
    final_weights = strategy.ema.weights if strategy.ema is not None else workflow.final_weights
    if strategy.final_weights is not None:
        final_weights = strategy.final_weights
    run_dir.save_model(
        _state_dict(settings, final_weights),
        model_name=settings.model,
        model_cfg={"dp": True},
        round=settings.num_server_rounds,
        **data_meta(settings),
    )
    # strategy.privacy also holds nodes that imposed DP-SGD on a run without it (their own budget binds them).
    # Public data (a public slice, an init-model) is named in privacy.json even without DP: what was not private.
    if (settings.dp_enabled or strategy.privacy or settings.secure_agg or settings.central_dp_enabled
            or settings.public_fraction > 0 or settings.init_model):
        quantization = list(getattr(fit_workflow, "quantization", {}).values())
        run_dir.write_privacy(build_privacy_report(settings, strategy, quantization=quantization))
    run_dir.write_summary(summarize(run_dir.rounds(), seconds=time.perf_counter() - started, settings=settings))
    return final_weights


def build_privacy_report(
    settings: RunSettings, strategy: GuardedStrategy, *, quantization: list[QuantizationCost] | None = None
) -> PrivacyReport:
    """privacy.json: each node's cumulative ε as it last reported it, the central ε, whether SecAgg+ was on and
    what its quantisation cost each round, and which data was public (used in the clear, counted in no ε)."""
    central = None
    if settings.central_dp_enabled:
        central = {
            "noise_multiplier": settings.central_dp_noise,
            "clipping_norm": settings.central_clip,
            "sample_rate": settings.fraction_fit,
            # Rounds whose noisy mean was released; a resumed run's earlier rounds count too (round numbers carry on).
            "rounds": max((n for n, r in strategy.reports.items() if r.central_noise_std is not None), default=0),
            "delta": settings.dp_delta,
            "dp_train": settings.dp_train,
            "noised_values": strategy.central_dp.noised_values if strategy.central_dp else None,
        }
    return privacy_report(
        clients=list(strategy.privacy.values()), central=central, secure_aggregation=settings.secure_agg,
        secagg_quantization=[cost.to_json() for cost in quantization or []] if settings.secure_agg else None,
        public_data=public_data(settings),
    )


def _state_dict(settings: RunSettings, weights: list[np.ndarray]) -> dict[str, torch.Tensor]:
    model = create_model(settings.model, dp=True)
    wire.set_weights(model, weights)
    return model.state_dict()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under `flwr run`: settings come from the run config, the run directory from `out-dir`."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    resume = None
    if settings.resume_from:
        # A resumed run (fer-server resume) continues the same run directory: rounds after the checkpoint's
        # replace whatever the interrupted run had logged for them.
        run_dir = RunDirectory(settings.out_dir, resume=True)
        resume = load_resume_state(settings)
    else:
        run_dir = RunDirectory(settings.out_dir)
    run_dir.write_config(settings.to_run_config())
    weights = run_federation(grid, context, settings, run_dir=run_dir, resume=resume)
    deliver_at_end(grid, settings=settings, run_id=context.run_id, weights=weights, run_dir=run_dir)


def load_resume_state(settings: RunSettings) -> ResumeState:
    """The weights and round number of the checkpoint `resume-from` names (loaded weights-only)."""
    from models.files import load_model

    state, card = load_model(settings.resume_from)
    if card.name != settings.model:
        raise ValueError(f"checkpoint {settings.resume_from} holds model {card.name!r}, not {settings.model!r}")
    model = create_model(settings.model, dp=True)
    model.load_state_dict(state)
    return ResumeState(weights=wire.get_weights(model), completed_round=card.round)
