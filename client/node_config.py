"""A node's own configuration: what its site's operator set (`fer-client start` writes it as the SuperNode's
`--node-config`), or what Flower's simulation engine gives a simulated node, read ONCE where the ClientApp starts.

`NodeSettings` is to the node config what `RunSettings` is to the run config: one typed, validated object whose
field names are the node-config keys with `_` for `-`. `fer-client start` builds one and writes it with
`to_node_config`; the ClientApp parses it with `from_node_config` and hands the values down as arguments, so no
module below reads a key, and a misspelt or malformed key (`require-secure-agg = "ture"`, which a lenient reader
would take for "no") is one line naming it instead of a silently weaker node.

The SecAgg+ mod (privacy/secagg.py) lives below client/ and cannot import this module: it gets its part of these
settings through `secagg_options`, which the client layer hands it when it builds the mod.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.constant import PARTITION_ID_KEY

from client.config import ConfigError
from client.dp_training import LedgerFiles
from client.profiles import PROFILES, ClientProfile
from privacy.secagg import DEFAULT_MIN_THRESHOLD, SecAggNodeOptions

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class NodeConfigError(ConfigError):
    """A node-config entry is missing, unknown or malformed; the one-line message names the key."""


@dataclass(frozen=True)
class NodeSettings:
    """One node's settings. Field names are the node-config keys with `_` for `-` (`simulated` is not a key); each
    field's comment is what its key means, as RunSettings' comments are for the run config.

    `simulated` marks a node of a simulation: its config came from the simulation engine, which sets partition-id
    (an operator's `--node-config` never does). A simulated node seeds from the run's seed and keeps its ledger in
    the run directory; a deployed one draws from the OS and keeps its state on its own machine.
    """

    dataset: str | None = None  # KIND=PATH, required on a deployed node (a simulated one gets a partition)
    client_id: str | None = None  # the name in the coordinator's metrics and the ledger (default: the Flower id)
    profile: str | None = None  # a client profile (client/profiles.py): local epochs and batch size
    state_dir: Path | None = None  # the node's private folder: ledger, released update, SecAgg+ contributions
    ledger_key: Path | None = None  # the privacy ledger's key file (default STATE_DIR/ledger.key)
    ledger_anchor: Path | None = None  # the ledger's rollback anchor (default STATE_DIR/ledger.anchor)
    dp_epsilon: float | None = None  # the node's own budget: caps the run's, imposes DP-SGD on a run without one
    require_secure_agg: bool = False  # refuse to train in a round without SecAgg+
    share_metrics: bool = False  # release per-site figures under SecAgg+ or DP-SGD (withheld by default)
    secagg_min_threshold: int = DEFAULT_MIN_THRESHOLD  # the lowest SecAgg+ reconstruction threshold accepted
    secagg_roster: Path | None = None  # the coordinator's roster of enrolled sites' keys, pinned by the node
    node_key: Path | None = None  # the node's enrolled private key, which signs its SecAgg+ keys
    partition_id: int | None = None  # set by Flower's simulation engine only: the node's partition
    num_partitions: int | None = None  # set by Flower's simulation engine only: how many partitions there are
    simulated: bool = False  # see above; derived from partition-id by from_node_config

    def __post_init__(self) -> None:
        if self.simulated != (self.partition_id is not None):
            raise NodeConfigError(
                f"node config: {PARTITION_ID_KEY} is set by Flower's simulation engine only; a simulated node needs "
                "one and a deployed node must not carry it"
            )
        if not self.simulated and not self.dataset:
            raise NodeConfigError("node config has no 'dataset' (start the node with fer-client --dataset KIND=PATH)")
        if self.profile is not None and self.profile not in PROFILES:
            raise NodeConfigError(f"node config: profile must be one of {', '.join(PROFILES)}; got {self.profile!r}")
        if self.dp_epsilon is not None and not (math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0):
            raise NodeConfigError(f"node-config dp-epsilon must be positive, got {self.dp_epsilon}")

    @classmethod
    def keys(cls) -> list[str]:
        """The node-config keys, in declaration order."""
        return [_key(f.name) for f in fields(cls) if f.name != "simulated"]

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], *, node_id: int | None = None) -> NodeSettings:
        """Parses a SuperNode's node config (or a simulated node's); raises NodeConfigError in one line naming the key.

        Args:
            node_config: Flower's `context.node_config`: strings from `--node-config`, or the simulation engine's
                partition-id and num-partitions (plus whatever a test or a simulation adds).
            node_id: the node's Flower id: the client id of a node that sets none. The state folder of a node with
                its own dataset defaults to ~/.fer-fl/CLIENT_ID.
        """
        by_key = {_key(f.name): f for f in fields(cls) if f.name != "simulated"}
        kwargs: dict[str, Any] = {}
        for key, value in node_config.items():
            field = by_key.get(key)
            if field is None:
                raise NodeConfigError(f"unknown node-config key {key!r}; known keys: {', '.join(by_key)}")
            kwargs[field.name] = _parse(key, value, str(field.type))
        kwargs["simulated"] = kwargs.get("partition_id") is not None
        if kwargs.get("client_id") is None and node_id is not None:
            kwargs["client_id"] = str(node_id)
        if kwargs.get("dataset") and kwargs.get("state_dir") is None and kwargs.get("client_id"):
            # A node with its own data keeps its own state (a simulated node's is in the run directory).
            kwargs["state_dir"] = Path.home() / ".fer-fl" / kwargs["client_id"]
        return cls(**kwargs)

    def to_node_config(self) -> dict[str, str | int | float | bool]:
        """The node config `fer-client start` passes to its SuperNode: every set field, under its key."""
        config: dict[str, str | int | float | bool] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "simulated" or value is None or value is False:
                continue
            config[_key(f.name)] = str(value) if isinstance(value, Path) else value
        return config

    @property
    def client_profile(self) -> ClientProfile | None:
        """The node's client profile (`NodeSetup.with_profile` applies it); None trains as the run says."""
        return PROFILES[self.profile] if self.profile else None

    def ledger_files(self, *, state_dir: Path) -> LedgerFiles:
        """The node's privacy-ledger files in `state_dir` (its own folder, or a simulated node's in the run
        directory), with the key and anchor where its operator placed them."""
        return LedgerFiles.of(state_dir=state_dir, key_file=self.ledger_key, anchor_path=self.ledger_anchor)

    def secagg_options(self) -> SecAggNodeOptions:
        """What the SecAgg+ mod needs of these settings (a floor below the protocol's 2 counts as 2)."""
        return SecAggNodeOptions(
            require_secure_agg=self.require_secure_agg,
            min_threshold=max(self.secagg_min_threshold, DEFAULT_MIN_THRESHOLD),
            node_key=self.node_key,
            roster=self.secagg_roster,
            state_dir=self.state_dir,
        )


def secagg_options(context: Context) -> SecAggNodeOptions:
    """The SecAgg+ mod's view of a node's config (`privacy.secagg.make_secagg_mod(node_options=...)`).

    A module-level function, not a closure, so that the mod that holds it pickles to Ray's workers.
    """
    return NodeSettings.from_node_config(context.node_config, node_id=context.node_id).secagg_options()


def _key(name: str) -> str:
    return name.replace("_", "-")


def _parse(key: str, value: Any, annotation: str) -> Any:
    """`value` as the field's type: node configs hold strings (`--node-config`) or Flower's scalar types."""
    kind = annotation.split("|")[0].strip()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise NodeConfigError(f"node-config key {key!r} expects true or false, got {value!r}")
    if kind in ("int", "float"):
        try:
            number = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (number.is_integer() if kind == "int" else math.isfinite(number)):
            raise NodeConfigError(f"node-config key {key!r} expects {'an integer' if kind == 'int' else 'a number'}, "
                                  f"got {value!r}")
        return int(number) if kind == "int" else number
    text = str(value).strip()
    if not isinstance(value, str) or not text:
        raise NodeConfigError(f"node-config key {key!r} expects a non-empty string, got {value!r}")
    return Path(text) if kind == "Path" else text
