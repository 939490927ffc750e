"""What a hardened SecAgg+ round reports: why it failed, or what its integer encoding cost the aggregate.

`server.secagg.HardenedSecAggPlusWorkflow` appends a `SecAggRoundFailed` to `failed_rounds` for every round that
produced no aggregate, and keeps one `QuantizationCost` per aggregated round for privacy.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState


class SecAggRoundFailed(Exception):
    """A SecAgg+ round that produced no aggregate; the global model was left unchanged.

    Attributes:
        server_round: The round that failed.
        stage: The protocol stage at which it stopped ("setup", "share_keys", "collect_masked_vectors", "unmask",
            or "aggregate" when the strategy returned no parameters).
        reason: One line saying why.
        client_errors: The error replies received from clients during the round.
    """

    def __init__(self, *, server_round: int, stage: str, reason: str, client_errors: tuple[str, ...] = ()) -> None:
        super().__init__(f"SecAgg+ round {server_round} failed at stage {stage}: {reason}")
        self.server_round = server_round
        self.stage = stage
        self.reason = reason
        self.client_errors = client_errors


@dataclass(frozen=True)
class QuantizationCost:
    """What SecAgg+'s integer encoding cost one round's decoded average, per model value.

    Each survivor i sends round_stochastic((w_i x_i + c) T / 2c) with w_i = q_i / T its quantised weight, so each
    encoded value is off by less than one step 2c/T (unbiased; variance at most step^2 / 4); the average divides
    the sum by sum_i w_i.

    Attributes:
        server_round: The round.
        num_clients: Survivors whose vectors are in the sum.
        clipping_range: c, the bound on every weighted value.
        quantization_range: T, levels per value.
        total_weight: sum_i q_i / T as decoded from the sum.
        step: 2c/T, one level in weighted-value units.
        max_abs_error: Worst case per value of the decoded average, num_clients * step / total_weight.
        rms_error: Expected root-mean-square error per value of the average, sqrt(num_clients) * step / 2 /
            total_weight (a bound: stochastic rounding's variance is at most step^2 / 4).
        max_abs_error_per_update: Worst case per value of the smallest-weight survivor's own update once decoded,
            step / min_i w_i (computed from the clear example counts; None when they are unknown).
    """

    server_round: int
    num_clients: int
    clipping_range: float
    quantization_range: int
    total_weight: float
    step: float
    max_abs_error: float
    rms_error: float
    max_abs_error_per_update: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def _quantization_cost(
    state: WorkflowState, *, server_round: int, total_weight: int, num_clients: int
) -> QuantizationCost:
    """The round's `QuantizationCost`, from the decoded total weight and the survivors' clear example counts."""
    levels = state.quantization_range
    step = 2 * state.clipping_range / levels
    weight = total_weight / levels
    counts = [res.num_examples for _, res in state.legacy_results if res.num_examples > 0]
    per_update = None
    if counts:
        # A survivor's weight as its mod quantised it: round(num_examples / max_weight * T) / T.
        smallest = max(round(min(counts) / state.max_weight * levels), 1) / levels
        per_update = step / smallest
    return QuantizationCost(
        server_round=server_round,
        num_clients=num_clients,
        clipping_range=float(state.clipping_range),
        quantization_range=int(levels),
        total_weight=weight,
        step=step,
        max_abs_error=num_clients * step / weight,
        rms_error=math.sqrt(num_clients) * step / 2 / weight,
        max_abs_error_per_update=per_update,
    )

