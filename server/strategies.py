"""The registry of Flower server strategies a run can name (`strategy`), each built with its options.

Kept apart from the guard (server/strategy.py): naming and building Flower's strategies is one job, checking what
sites send them another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

StrategyFactory = Callable[..., Strategy]
_STRATEGIES: dict[str, StrategyFactory] = {}


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    """Registers a factory `(**common, options) -> Strategy` under `name`."""

    def decorator(factory: StrategyFactory) -> StrategyFactory:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        _STRATEGIES[name] = factory
        return factory

    return decorator


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def create_strategy(name: str, *, common: dict[str, Any], options: dict[str, Any]) -> Strategy:
    """Builds a registered Flower strategy.

    Args:
        name: registry name, e.g. "fedavg".
        common: keyword arguments every Flower strategy takes (fractions, minimum clients, initial parameters).
        options: strategy-specific knobs (`proximal_mu`, `server_lr`, `server_momentum`, `trimmed_beta`,
            `server_tau`, `krum_malicious`).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(list_strategies())}")
    return _STRATEGIES[name](common=common, **options)


@register_strategy("fedavg")
def _fedavg(*, common: dict, **_: Any) -> Strategy:
    return FedAvg(**common)


@register_strategy("fedavgm")
def _fedavgm(*, common: dict, server_lr: float, server_momentum: float = 0.9, **_: Any) -> Strategy:
    # Hsu et al. 2019: SGD with momentum on the server, the averaged update taken as the negative gradient.
    return FedAvgM(**common, server_learning_rate=server_lr or 1.0, server_momentum=server_momentum)


@register_strategy("fedprox")
def _fedprox(*, common: dict, proximal_mu: float, **_: Any) -> Strategy:
    return FedProx(**common, proximal_mu=proximal_mu)


def _adaptive(strategy_class: type[Strategy]) -> StrategyFactory:
    """FedAdam / FedYogi (Reddi et al. 2021; Yogi grows the second moment additively, so it adapts more gently) at
    server-lr (0.01 when unset) over sqrt(v) + server-tau. eta_l is only Flower's log; the sites' lr trains."""

    def factory(*, common: dict, server_lr: float, server_tau: float = 1e-3, **_: Any) -> Strategy:
        server_lr = server_lr or 0.01
        return strategy_class(**common, eta=server_lr, eta_l=server_lr, beta_1=0.9, beta_2=0.99, tau=server_tau)

    return factory


register_strategy("fedadam")(_adaptive(FedAdam))
register_strategy("fedyogi")(_adaptive(FedYogi))


@register_strategy("fedmedian")
def _fedmedian(*, common: dict, **_: Any) -> Strategy:
    return FedMedian(**common)


@register_strategy("fedtrimmedavg")
def _fedtrimmedavg(*, common: dict, trimmed_beta: float, **_: Any) -> Strategy:
    return FedTrimmedAvg(**common, beta=trimmed_beta)


@register_strategy("krum")
def _krum(*, common: dict, krum_malicious: int, **_: Any) -> Strategy:
    return Krum(**common, num_malicious_clients=krum_malicious, num_clients_to_keep=0)
