"""Client profiles: what kind of site a simulated client stands for, and how much data and compute it has.

Two kinds of site take part in a healthcare FER federation: hospitals (many patients, a server-class machine, a
larger model, longer local training) and home IoT hubs (one household's images, a small device, a small model, short
training in small batches). A profile mix such as "hospital=0.2,iot=0.8" says which fraction of the clients is which.

It lives in `client/` because a deployed node (`fer-client --profile iot`) applies its own profile
(client/node_setup.py), and client/ may not import simulation/; the simulator imports it from here.

Every site trains the run's one model (weight averaging needs one architecture), so a profile sets how a site trains,
not what: a profile that named its own model would promise something no run does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
        description: one line for reports.
    """

    name: str
    data_weight: float
    local_epochs: int
    batch_size: int
    description: str = ""


PROFILES: dict[str, ClientProfile] = {
    "hospital": ClientProfile(
        name="hospital", data_weight=4.0, local_epochs=2, batch_size=32,
        description="hospital site: 4x the data, 2 local epochs, batches of 32",
    ),
    "iot": ClientProfile(
        name="iot", data_weight=1.0, local_epochs=1, batch_size=16,
        description="home IoT hub: few samples, 1 local epoch, batches of 16",
    ),
}

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


def _known() -> str:
    return ", ".join(PROFILES)


__all__ = ["PROFILES", "ClientProfile", "assign_profiles", "parse_profile_mix"]
