"""Client profiles: what kind of site a simulated client stands for, and how much data and compute it has.

Two kinds of site take part in a healthcare FER federation: hospitals (many patients, a server-class machine, a
larger model, longer local training) and home IoT hubs (one household's images, a small device, a small model, short
training in small batches). A profile mix such as "hospital=0.2,iot=0.8" says which fraction of the clients is which.

It lives in `client/` because a deployed node (`fer-client --profile iot`) applies its own profile, and client/ may
not import simulation/; `simulation.profiles` re-exports it for the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClientProfile:
    """One kind of client.

    Attributes:
        name: the profile's key in PROFILES.
        data_weight: relative share of the data a client of this kind holds (the partitioner's size weight).
        local_epochs: local epochs per round.
        batch_size: local batch size.
        model: the architecture this kind of device would run on its own (see `federation_model` for what is
            actually trained when profiles differ).
        lr: local learning rate; None means the run's learning rate.
        description: one line for reports.
    """

    name: str
    data_weight: float
    local_epochs: int
    batch_size: int
    model: str
    lr: float | None = None
    description: str = ""


PROFILES: dict[str, ClientProfile] = {
    "hospital": ClientProfile(
        name="hospital", data_weight=4.0, local_epochs=2, batch_size=32, model="cnn_am",
        description="hospital site: 4x the data, 2 local epochs, batches of 32, CNN-AM",
    ),
    "iot": ClientProfile(
        name="iot", data_weight=1.0, local_epochs=1, batch_size=16, model="dmsnet_iot",
        description="home IoT hub: few samples, 1 local epoch, batches of 16, DMSNet-IoT",
    ),
}

# Used only when the model registry cannot be imported: smallest first, by the architectures' published sizes.
_FALLBACK_SIZE_ORDER = ("dmsnet_iot", "cnn_am", "dmsnet_light", "dmsnet_heavy")
_FRACTION_TOLERANCE = 1e-6


def parse_profile_mix(spec: str) -> dict[str, float]:
    """Parses "hospital=0.3,iot=0.7" (or a lone "hospital") into fractions that sum to 1.

    Fractions must be in (0, 1] and sum to 1 within 1e-6; they are not silently normalised, because
    "hospital=0.3,iot=0.6" is more likely a typo than a wish for 33 %/67 %.

    Raises:
        ValueError: one line naming the bad part (unknown profile, repeated name, bad number, wrong sum).
    """
    parts = [part.strip() for part in spec.split(",")]
    if not spec.strip():
        raise ValueError(f"empty profile mix; expected e.g. 'hospital=0.3,iot=0.7' (profiles: {_known()})")
    mix: dict[str, float] = {}
    for part in parts:
        if not part:
            raise ValueError(f"empty entry in profile mix {spec!r}")
        name, sep, value = (piece.strip() for piece in part.partition("="))
        name = name.lower()
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r} in {part!r}; known profiles: {_known()}")
        if name in mix:
            raise ValueError(f"profile {name!r} given twice in {spec!r}")
        if not sep:
            if len(parts) > 1:
                raise ValueError(f"{part!r} needs a fraction (e.g. '{name}=0.5') when several profiles are mixed")
            fraction = 1.0
        else:
            try:
                fraction = float(value)
            except ValueError:
                raise ValueError(f"fraction {value!r} in {part!r} is not a number") from None
            if not (math.isfinite(fraction) and 0 < fraction <= 1):
                raise ValueError(f"fraction in {part!r} must be in (0, 1]")
        mix[name] = fraction
    total = sum(mix.values())
    if abs(total - 1.0) > _FRACTION_TOLERANCE:
        raise ValueError(f"profile fractions in {spec!r} sum to {total:g}, not 1")
    return mix


def assign_profiles(num_clients: int, mix: Mapping[str, float], *, seed: int) -> list[ClientProfile]:
    """Gives each of `num_clients` clients a profile: exact counts by largest remainder, then a seeded shuffle.

    Largest remainder makes the counts as close to the fractions as integers allow (0.3 of 10 is exactly 3; a
    fraction too small for the client count can round to 0 clients). Ties go to the profile listed first. The
    shuffle keeps "client 0 is always a hospital" from coupling with anything else indexed by client id.

    Raises:
        ValueError: fewer than one client, an empty mix or an unknown profile name.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not mix:
        raise ValueError("empty profile mix")
    unknown = [name for name in mix if name not in PROFILES]
    if unknown:
        raise ValueError(f"unknown profile {unknown[0]!r}; known profiles: {_known()}")
    names = list(mix)
    fractions = np.array([mix[name] for name in names], dtype=float)
    exact = num_clients * fractions / fractions.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: num_clients - counts.sum()]] += 1
    assigned = [PROFILES[name] for name, count in zip(names, counts) for _ in range(count)]
    permutation = np.random.default_rng(seed).permutation(num_clients)
    return [assigned[i] for i in permutation]


def federation_model(profiles: Sequence[ClientProfile], requested: str | None) -> str:
    """The one architecture the federation trains.

    Weight averaging (FedAvg and every strategy here) needs every client to train the same architecture, so
    profiles cannot each keep their own. The rule:

    1. a model the user asked for wins;
    2. otherwise the profiles' model, if they all agree;
    3. otherwise the smallest of the profiles' models (by parameter count from the model registry), because every
       client must be able to train it: an IoT hub cannot train a hospital's model, a hospital can train a hub's.

    Raises:
        ValueError: no profiles and no requested model.
    """
    if requested:
        return requested
    if not profiles:
        raise ValueError("no profiles and no model requested")
    models = sorted({profile.model for profile in profiles})
    if len(models) == 1:
        return models[0]
    sizes = _model_sizes(models)
    return min(models, key=lambda name: (sizes[name], name))


def _model_sizes(names: Sequence[str]) -> dict[str, float]:
    """Parameter counts from the model registry; the published size order where the registry can't say."""
    try:
        from models import create_model
        return {name: float(sum(p.numel() for p in create_model(name).parameters())) for name in names}
    except (ImportError, KeyError, ValueError):
        # One measure for all names: mixing parameter counts with ranks would compare unlike things.
        last = len(_FALLBACK_SIZE_ORDER)
        return {name: float(_FALLBACK_SIZE_ORDER.index(name) if name in _FALLBACK_SIZE_ORDER else last)
                for name in names}


def _known() -> str:
    return ", ".join(PROFILES)


__all__ = ["PROFILES", "ClientProfile", "assign_profiles", "federation_model", "parse_profile_mix"]
