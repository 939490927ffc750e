"""How a simulated federation is laid out: which client holds which samples, with which profile.

Every simulated client computes the same plan from the same settings (it is deterministic and cached per process),
so nothing but the run settings has to travel to the Ray workers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.client_app import setup_from_node_config
from client.config import ConfigError, RunSettings
from client.node_config import NodeSettings
from client.node_data import cached_dataset, node_data_from_indices, parse_dataset_list
from client.node_setup import NodeSetup
from client.profiles import ClientProfile, assign_profiles, parse_profile_mix
from simulation.attacks import ATTACK_REGISTRY, attacker_partitions, flip_labels
from simulation.partition import partition_labels, partition_stats


@dataclass(frozen=True)
class ClientPlan:
    client_id: str
    dataset_spec: str
    indices: np.ndarray
    profile: ClientProfile | None


def clients_per_dataset(settings: RunSettings) -> list[tuple[str, int]]:
    """Splits `num-clients` over the dataset entries: explicit `@N` counts win, the rest share the remainder."""
    entries = parse_dataset_list(settings.dataset)
    fixed = sum(e.clients for e in entries if e.clients)
    open_entries = [e for e in entries if not e.clients]
    if fixed and not open_entries:
        return [(e.spec, e.clients) for e in entries]
    remaining = settings.num_clients - fixed
    if remaining < len(open_entries):
        raise ConfigError(
            f"num-clients {settings.num_clients} leaves too few clients for the datasets without an @N count"
        )
    share, extra = divmod(remaining, len(open_entries))
    counts = {id(e): share + (1 if i < extra else 0) for i, e in enumerate(open_entries)}
    return [(e.spec, e.clients or counts[id(e)]) for e in entries]


@functools.lru_cache(maxsize=2)
def federation_plan(settings: RunSettings) -> tuple[ClientPlan, ...]:
    """The whole federation's layout for these settings."""
    from server.public_pretrain import public_split  # torch: the ClientApp imports this module and stays light

    layout = clients_per_dataset(settings)
    total = sum(n for _, n in layout)
    profiles: list[ClientProfile | None] = [None] * total
    if settings.profile_mix:
        profiles = list(assign_profiles(total, parse_profile_mix(settings.profile_mix), seed=settings.seed))
    plans, offset = [], 0
    for spec, count in layout:
        labels = cached_dataset(spec, settings.image_size, settings.seed).splits["train"].labels
        # The public slice (public-fraction) belongs to no site: the partitioner sees only the rest.
        private = public_split(settings, spec).private
        block = profiles[offset : offset + count]
        weights = [p.data_weight for p in block] if settings.profile_mix else None
        parts = partition_labels(
            labels[private],
            num_partitions=count,
            scheme=settings.partition,
            alpha=settings.alpha,
            classes_per_client=settings.classes_per_client,
            size_weights=weights,
            seed=settings.seed + offset,
        )
        for local_index, indices in enumerate(parts):
            client = offset + local_index
            plans.append(ClientPlan(f"client-{client:03d}", spec, private[np.asarray(indices)], block[local_index]))
        offset += count
    return tuple(plans)


def federation_stats(settings: RunSettings) -> dict:
    """Per-client label counts and skew for partition.json and the report's partition plot; hostile sites
    (simulation.attacks) are marked `attacker`; with public-fraction, `public_slice` records the public slice (its
    faces count as `unassigned` in each dataset's block: no site holds them)."""
    plans = federation_plan(settings)
    hostile = {plans[i].client_id for i in attacker_partitions(settings, num_sites=len(plans))}
    stats: dict = {"clients": {}, "datasets": {}}
    for spec, _ in clients_per_dataset(settings):
        members = [p for p in plans if p.dataset_spec == spec]
        labels = cached_dataset(spec, settings.image_size, settings.seed).splits["train"].labels
        block = partition_stats(labels, [p.indices for p in members])
        stats["datasets"][spec] = block
        for plan, counts in zip(members, block["per_client"]):
            stats["clients"][plan.client_id] = {
                "dataset": spec,
                "profile": plan.profile.name if plan.profile else None,
                "per_class": counts,
                "size": int(len(plan.indices)),
                "attacker": plan.client_id in hostile,
            }
    from server.public_pretrain import public_slices

    slices = public_slices(settings)
    if slices:
        stats["public_slice"] = {
            "public": True,
            "note": "held by no site; the server pretrained round 0's model on it in the clear (no DP, no epsilon)",
            "fraction": settings.public_fraction,
            "seed": settings.seed,
            "pretrain_epochs": settings.public_epochs,
            "server_learning": settings.server_learning,
            "head_refit": settings.head_refit,
            "faces": sum(s.faces for s in slices),
            "per_class": [int(n) for n in np.sum([s.per_class for s in slices], axis=0)],
            "datasets": {s.dataset: s.to_json() for s in slices},
        }
    return stats


def simulated_setup(node: NodeSettings, settings: RunSettings) -> NodeSetup:
    """The data provider of simulated nodes: its partition of the plan, with the plan's profile (a node with a real
    `dataset` in its node config uses that, as a deployed node does)."""
    if node.dataset is not None:
        return setup_from_node_config(node, settings)
    partition_id = node.partition_id
    plans = federation_plan(settings)
    if partition_id >= len(plans):
        raise ConfigError(f"simulated node {partition_id} has no partition: the plan has {len(plans)} clients")
    plan = plans[partition_id]
    dataset = cached_dataset(plan.dataset_spec, settings.image_size, settings.seed)
    data = node_data_from_indices(
        dataset,
        plan.indices,
        client_id=plan.client_id,
        test_fraction=settings.local_test_fraction,
        seed=settings.seed + partition_id,
    )
    if partition_id in attacker_partitions(settings, num_sites=len(plans)):
        if ATTACK_REGISTRY[settings.attack].flips_labels:
            data = dataclasses.replace(data, train_labels=flip_labels(data.train_labels))
    return NodeSetup.with_profile(data=data, profile=plan.profile, settings=settings,
                                  state_dir=Path(settings.out_dir) / "clients" / plan.client_id)
