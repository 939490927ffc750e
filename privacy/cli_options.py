"""The privacy options that `fer-sim run` and `fer-server start` share, as one group of Typer options.

Each maps to one run-config key (`PrivacyOptions.overrides`), so the command line, a TOML file and `flwr run
--run-config` all say the same thing. None means "not given": the TOML file or the default then decides.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any

import typer


def _option(help: str) -> Any:
    """A Typer option in the "Privacy" panel of `--help` (the flag is the field's name, kebab-cased)."""
    return typer.Option(help=help, rich_help_panel="Privacy")


@dataclass(frozen=True)
class PrivacyOptions:
    """The privacy options of a run command (see `client.cli.runner.option_group`); None = not given."""

    dp_epsilon: Annotated[
        float | None, _option("Each client's DP-SGD budget ε for the WHOLE federation (0 = no local DP).")
    ] = None
    dp_delta: Annotated[
        float | None, _option("δ of local and central DP (keep it below 1/examples per client).")
    ] = None
    max_grad_norm: Annotated[float | None, _option("DP-SGD per-sample gradient clipping norm.")] = None
    accountant: Annotated[str | None, _option("rdp (default) | prv.")] = None
    dp_optimizer: Annotated[
        str | None, _option("Local optimiser under DP-SGD: sgd (default, momentum 0.9) | adam.")
    ] = None
    dp_lr: Annotated[float | None, _option("Local learning rate under DP-SGD (--lr is the non-private one).")] = None
    dp_batch_size: Annotated[
        int | None, _option("Expected (Poisson) batch size under DP-SGD (--batch-size is the non-private one).")
    ] = None
    dp_train: Annotated[
        str | None, _option("Which parameters train under DP-SGD or central DP: all (default) | head (the "
                            "classifier) | last (the last block and the head); the rest stay frozen: no noise.")
    ] = None
    aug_mult: Annotated[
        int | None, _option("Augmentation multiplicity K: DP-SGD clips the mean gradient of K augmented views of "
                            "each sample (1 = off).")
    ] = None
    secure_agg: Annotated[bool | None, _option("Flower's SecAgg+: the server sees only the sum.")] = None
    secagg_shares: Annotated[int | None, _option("SecAgg+ secret shares per client (> 2).")] = None
    secagg_threshold: Annotated[
        int | None, _option("Shares needed to rebuild a secret (shares/2 < t < shares; sites refuse less).")
    ] = None
    central_dp_noise: Annotated[
        float | None, _option("Central (client-level) DP noise multiplier σ (0 = off).")
    ] = None
    central_clip: Annotated[float | None, _option("L2 norm each client clips its update to under central DP.")] = None

    def overrides(self) -> dict[str, Any]:
        """The run-config keys of these options (the field name, kebab-cased; None = not given)."""
        return {field.name.replace("_", "-"): getattr(self, field.name) for field in fields(self)}
