"""Byzantine sites for simulations: which sites are hostile, what they send, and the client mod that makes them so.

A hostile site runs the honest training (client/trainer.py) and then tampers with what leaves it, as modified
client software would: the Flower mod below sits between the trainer and the wire. `label-flip` instead poisons
the site's training data (simulation.federation.simulated_setup), so the update is honestly computed on lies.

The attacks and their strengths are the ones the robust-aggregation literature evaluates with (Blanchard et al.
2017, Krum; Yin et al. 2018, median and trimmed mean; Baruch et al. 2019): a scaled update, a reversed and
amplified update, an inflated example count (FedAvg weighs by it), random noise of the honest update's norm, and
flipped labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.config import ATTACKS, RunSettings
from client.data.labels import NUM_CLASSES
from client.node_config import NodeSettings

SCALE_FACTOR = 100.0
SIGN_FLIP_FACTOR = -10.0
LIED_COUNT = 1_000_000

Poison = Callable[[list[np.ndarray], int, np.random.Generator], tuple[list[np.ndarray], int]]


@dataclass(frozen=True)
class Attack:
    """One hostile behaviour.

    Attributes:
        name: the `attack` run-config value.
        description: one line for summary.json and the report.
        poison: (honest delta, honest count, rng) -> what the site sends instead.
        flips_labels: the site trains on flipped labels (the update itself is then sent unchanged).
    """

    name: str
    description: str
    poison: Poison
    flips_labels: bool = False


def _scaled(factor: float) -> Poison:
    return lambda delta, count, rng: ([(d * np.float32(factor)).astype(np.float32) for d in delta], count)


def _noise(delta: list[np.ndarray], count: int, rng: np.random.Generator) -> tuple[list[np.ndarray], int]:
    """Gaussian noise with the honest update's L2 norm: no norm check can tell it from a real update."""
    noise = [rng.standard_normal(d.shape) for d in delta]
    norm = np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta))
    noise_norm = np.sqrt(sum(float(np.sum(np.square(n))) for n in noise)) or 1.0
    return [(n * (norm / noise_norm)).astype(np.float32) for n in noise], count


ATTACK_REGISTRY: dict[str, Attack] = {
    attack.name: attack
    for attack in (
        Attack("scale", f"updates multiplied by {SCALE_FACTOR:g}", _scaled(SCALE_FACTOR)),
        Attack("sign-flip", f"updates multiplied by {SIGN_FLIP_FACTOR:g}", _scaled(SIGN_FLIP_FACTOR)),
        Attack("lie-count", f"honest updates claiming {LIED_COUNT:,} examples", lambda d, c, r: (d, LIED_COUNT)),
        Attack("noise", "Gaussian noise with the norm of the honest update", _noise),
        Attack("label-flip", "trained on flipped labels (class k -> 6 - k)", lambda d, c, r: (d, c),
               flips_labels=True),
    )
}
assert tuple(ATTACK_REGISTRY) == ATTACKS, "client.config.ATTACKS must list simulation.attacks.ATTACK_REGISTRY"


def attacker_partitions(settings: RunSettings, *, num_sites: int) -> tuple[int, ...]:
    """The partition IDs of the hostile sites: `attackers` of `num_sites`, drawn from the seed (reproducible, and
    not simply the first sites, whose data a skewed partition may make special)."""
    if settings.attackers == 0:
        return ()
    rng = np.random.default_rng([settings.seed, 0xB42])
    return tuple(sorted(int(i) for i in rng.choice(num_sites, size=settings.attackers, replace=False)))


def flip_labels(labels: np.ndarray) -> np.ndarray:
    """Class k becomes NUM_CLASSES - 1 - k (angry <-> neutral, fear <-> sad, ...): every label is wrong but one
    (disgust <-> surprise pairs, happy stays: 3 -> 3), as in the label-flipping attacks of Tolpegin et al. 2020."""
    return (NUM_CLASSES - 1 - np.asarray(labels)).astype(labels.dtype)


class ByzantineMod:
    """Flower client mod that makes the listed simulated sites tamper with their train replies.

    A class (not a closure) so that Ray can pickle it to its workers.

    Args:
        partitions: partition IDs of the hostile sites.
        attack: an ATTACK_REGISTRY name.
        seed: the run's seed (the noise attack draws from it, per site and round).
    """

    def __init__(self, *, partitions: tuple[int, ...], attack: str, seed: int) -> None:
        self.partitions = frozenset(partitions)
        self.attack = ATTACK_REGISTRY[attack]
        self.seed = seed

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        node = NodeSettings.from_node_config(ctxt.node_config, node_id=ctxt.node_id)
        partition = node.partition_id if node.simulated else -1
        if msg.metadata.message_type != MessageType.TRAIN or partition not in self.partitions or reply.has_error():
            return reply
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        server_round = int(compat.recorddict_to_fitins(msg.content, keep_input=True).config.get("server-round", 0))
        rng = np.random.default_rng([self.seed, partition, server_round])
        delta, count = self.attack.poison(parameters_to_ndarrays(fitres.parameters), fitres.num_examples, rng)
        fitres.parameters, fitres.num_examples = ndarrays_to_parameters(delta), count
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def describe(settings: RunSettings, *, client_ids: list[str]) -> dict:
    """What summary.json records about the hostile sites (empty when there are none)."""
    if settings.attackers == 0:
        return {}
    hostile = [client_ids[i] for i in attacker_partitions(settings, num_sites=len(client_ids))]
    attack = ATTACK_REGISTRY[settings.attack]
    return {
        "attack": attack.name,
        "attackers": hostile,
        "byzantine": f"{len(hostile)} of {len(client_ids)} sites hostile ({attack.name}: {attack.description}): "
                     + ", ".join(hostile),
    }
