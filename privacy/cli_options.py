"""The privacy options that `fer-sim run` and `fer-server start` share, as Typer parameter types.

Each maps to one run-config key (`privacy_overrides`), so the command line, a TOML file and `flwr run
--run-config` all say the same thing. None means "not given": the TOML file or the default then decides.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

_PANEL = "Privacy"

DpEpsilonOpt = Annotated[
    float | None,
    typer.Option("--dp-epsilon", help="Each client's DP-SGD budget ε for the WHOLE federation (0 = no local DP).",
                 rich_help_panel=_PANEL),
]
DpDeltaOpt = Annotated[
    float | None,
    typer.Option("--dp-delta", help="δ of local and central DP (keep it below 1/examples per client).",
                 rich_help_panel=_PANEL),
]
MaxGradNormOpt = Annotated[
    float | None,
    typer.Option("--max-grad-norm", help="DP-SGD per-sample gradient clipping norm.", rich_help_panel=_PANEL),
]
DpOptimizerOpt = Annotated[
    str | None,
    typer.Option("--dp-optimizer", help="Local optimiser under DP-SGD: sgd (default, momentum 0.9) | adam.",
                 rich_help_panel=_PANEL),
]
DpLrOpt = Annotated[
    float | None,
    typer.Option("--dp-lr", help="Local learning rate under DP-SGD (--lr is the non-private one).",
                 rich_help_panel=_PANEL),
]
DpBatchSizeOpt = Annotated[
    int | None,
    typer.Option("--dp-batch-size", help="Expected (Poisson) batch size under DP-SGD (--batch-size is the "
                 "non-private one).", rich_help_panel=_PANEL),
]
AccountantOpt = Annotated[
    str | None, typer.Option("--accountant", help="rdp (default) | prv.", rich_help_panel=_PANEL)
]
SecureAggOpt = Annotated[
    bool | None,
    typer.Option("--secure-agg/--no-secure-agg", help="Flower's SecAgg+: the server sees only the sum.",
                 rich_help_panel=_PANEL),
]
SecaggSharesOpt = Annotated[
    int | None, typer.Option("--secagg-shares", help="SecAgg+ secret shares per client (> 2).", rich_help_panel=_PANEL)
]
SecaggThresholdOpt = Annotated[
    int | None,
    typer.Option("--secagg-threshold",
                 help="Shares needed to rebuild a secret (shares/2 < t < shares; sites refuse less).",
                 rich_help_panel=_PANEL),
]
CentralNoiseOpt = Annotated[
    float | None,
    typer.Option("--central-dp-noise", help="Central (client-level) DP noise multiplier σ (0 = off).",
                 rich_help_panel=_PANEL),
]
CentralClipOpt = Annotated[
    float | None,
    typer.Option("--central-clip", help="L2 norm each client clips its update to under central DP.",
                 rich_help_panel=_PANEL),
]


def privacy_overrides(
    *,
    dp_epsilon: float | None,
    dp_delta: float | None,
    max_grad_norm: float | None,
    accountant: str | None,
    dp_optimizer: str | None = None,
    dp_lr: float | None = None,
    dp_batch_size: int | None = None,
    secure_agg: bool | None,
    secagg_shares: int | None,
    secagg_threshold: int | None,
    central_dp_noise: float | None,
    central_clip: float | None,
) -> dict[str, Any]:
    """The run-config keys of the privacy options (None = not given)."""
    return {
        "dp-epsilon": dp_epsilon,
        "dp-delta": dp_delta,
        "max-grad-norm": max_grad_norm,
        "accountant": accountant,
        "dp-optimizer": dp_optimizer,
        "dp-lr": dp_lr,
        "dp-batch-size": dp_batch_size,
        "secure-agg": secure_agg,
        "secagg-shares": secagg_shares,
        "secagg-threshold": secagg_threshold,
        "central-dp-noise": central_dp_noise,
        "central-clip": central_clip,
    }
