"""Hardened SecAgg+ on Flower's real protocol: the real workflow and the real client mod, message by message.

Rounds run through `tests.secagg_runtime` (Flower's link state and grid in one process, protobuf on the wire);
one slow test runs the same round on Flower's Ray simulation (`run_simulation`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import ConfigRecord, Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.compat.common import recorddict_compat as compat
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key

from client.node_config import secagg_options
from privacy.secagg import UnmaskRequestRefused, check_unmask_request, decode_secret_key, make_secagg_mod
from privacy.secagg_masks import apply_mask, derive_mask_vector, derive_masks
from server.secagg import HardenedSecAggPlusWorkflow, make_secagg_workflow
from server.strategy import GuardedStrategy
from tests.secagg_runtime import InProcessRun, run_in_process

SHAPES = [(40, 30), (30,), (7, 30), (7,)]
NUM_NODES = 5
CLIPPING_RANGE = 0.5
QUANTIZATION_RANGE = 2**24
MAX_WEIGHT = 1000.0


def _delta(partition: int) -> list[np.ndarray]:
    """A client's update: small, like a real model delta, different per client."""
    rng = np.random.default_rng(1000 + partition)
    return [(rng.standard_normal(shape) * 0.01).astype(np.float32) for shape in SHAPES]


def _num_examples(partition: int) -> int:
    """Unequal client sizes, so that a wrong weighting shows."""
    return 100 + 50 * partition


def _weighted_average(partitions: list[int], updates=_delta) -> list[np.ndarray]:
    """The plain FedAvg aggregate, computed independently in float64."""
    weights = np.array([_num_examples(p) for p in partitions], dtype=np.float64)
    return [
        sum(w * updates(p)[k].astype(np.float64) for w, p in zip(weights, partitions)) / weights.sum()
        for k in range(len(SHAPES))
    ]


def _quantisation_bound(partitions: list[int]) -> float:
    """Worst-case error of the decoded average: one quantum per client, over the sum of the weights."""
    weight_sum = sum(round(_num_examples(p) / MAX_WEIGHT * QUANTIZATION_RANGE) for p in partitions)
    return len(partitions) * 2 * CLIPPING_RANGE / weight_sum


def _site_metrics(partition: int) -> dict:
    """The clear metrics of an honest site: its name (as GuardedStrategy reads it)."""
    return {"partition": partition, "client-id": f"site-{partition}"}


class _DeltaClient(NumPyClient):
    """Returns its fixed update as a delta (byte-identical each time it is asked for the same round, as a DP node's
    replay of a released update is); a client in `dropping` fails during training instead."""

    def __init__(self, partition: int, *, dropping: frozenset[int], updates, metrics=_site_metrics) -> None:
        self.partition = partition
        self.dropping = dropping
        self.updates = updates
        self.metrics = metrics

    def fit(self, parameters, config):
        if self.partition in self.dropping:
            raise ConnectionError(f"client {self.partition} went offline during training")
        return self.updates(self.partition), _num_examples(self.partition), self.metrics(self.partition)


def _drop_at(stage: str, partitions: frozenset[int]):
    """A mod outside the SecAgg+ mod that makes these nodes vanish when the given stage reaches them."""

    def dropper(msg: Message, context: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if configs.get(Key.STAGE) == stage and int(context.node_config["partition-id"]) in partitions:
            raise ConnectionError(f"node lost at stage {stage}")
        return call_next(msg, context)

    return dropper


def _make_client_app(
    *,
    dropping: frozenset[int] = frozenset(),
    updates=_delta,
    mod=None,
    drop_at: tuple[str, frozenset[int]] | None = None,
    metrics=_site_metrics,
) -> ClientApp:
    """NUM_NODES-ready app of `_DeltaClient`s behind `mod` ("plain" for none); `drop_at` loses nodes at a stage."""
    mod = make_secagg_mod(max_norm=CLIPPING_RANGE, node_options=secagg_options) if mod is None else mod

    def client_fn(context: Context):
        partition = int(context.node_config["partition-id"])
        return _DeltaClient(partition, dropping=dropping, updates=updates, metrics=metrics).to_client()

    mods = [] if mod == "plain" else [mod]
    if drop_at is not None:
        mods.insert(0, _drop_at(*drop_at))
    return ClientApp(client_fn=client_fn, mods=mods)


class _RecordingFedAvg(FedAvg):
    """FedAvg that keeps exactly what `aggregate_fit` was handed."""

    def __init__(self) -> None:
        super().__init__(
            fraction_evaluate=0.0,
            min_fit_clients=NUM_NODES,
            min_available_clients=NUM_NODES,
            initial_parameters=ndarrays_to_parameters([np.zeros(shape, np.float32) for shape in SHAPES]),
        )
        self.received: list[tuple[int, list[np.ndarray], int]] = []

    def aggregate_fit(self, server_round, results: list[tuple[ClientProxy, FitRes]], failures):
        for proxy, fitres in results:
            self.received.append((proxy.node_id, parameters_to_ndarrays(fitres.parameters), fitres.num_examples))
        return super().aggregate_fit(server_round, results, failures)


def _make_workflow(cls=HardenedSecAggPlusWorkflow, **overrides) -> HardenedSecAggPlusWorkflow:
    """The hardened workflow with the test's settings (5 shares, threshold 3), or a subclass of it."""
    settings = {
        "num_shares": NUM_NODES,
        "reconstruction_threshold": 3,
        "clipping_range": CLIPPING_RANGE,
        "quantization_range": QUANTIZATION_RANGE,
        "max_weight": MAX_WEIGHT,
    } | overrides
    if cls is HardenedSecAggPlusWorkflow:
        return make_secagg_workflow(**settings)
    return cls(settings.pop("num_shares"), settings.pop("reconstruction_threshold"), **settings)


@dataclass
class _Round:
    """What one round left: the new global model, the strategy's inputs, the workflow, metrics and wire log."""

    new_global: list[np.ndarray]
    strategy: _RecordingFedAvg
    workflow: HardenedSecAggPlusWorkflow | None
    metrics: dict
    run: InProcessRun


def _run_round(
    *, client_app: ClientApp, workflow: HardenedSecAggPlusWorkflow | None, strategy=None, node_config=None
) -> _Round:
    """One federated round of NUM_NODES nodes; workflow None runs Flower's plain fit workflow."""
    strategy = _RecordingFedAvg() if strategy is None else strategy
    captured = {}

    def server_main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
        record = legacy.state.array_records[MAIN_PARAMS_RECORD]
        captured["global"] = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
        captured["metrics"] = legacy.history.metrics_distributed_fit

    run = run_in_process(server_main, client_app, num_nodes=NUM_NODES, node_config=node_config)
    return _Round(captured["global"], strategy, workflow, captured["metrics"], run)


def _stage_replies(run: InProcessRun, *, key: str) -> list[Message]:
    """Replies of one SecAgg+ stage, recognised by the key their config record carries."""
    return [
        reply
        for reply in run.replies
        if reply.has_content() and key in reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]


def _max_error(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """Largest absolute difference over all tensors, in float64."""
    return max(float(np.abs(a.astype(np.float64) - e).max()) for a, e in zip(actual, expected))


def test_secure_aggregate_equals_plain_aggregate_within_quantisation_error():
    """All five clients: the SecAgg+ global update equals the plain FedAvg one within one quantum per client."""
    # Prepare
    everyone = list(range(NUM_NODES))

    # Execute
    plain = _run_round(client_app=_make_client_app(mod="plain"), workflow=None)
    secure = _run_round(client_app=_make_client_app(), workflow=_make_workflow())

    # Assert
    assert _max_error(plain.new_global, _weighted_average(everyone)) < 1e-8
    error = _max_error(secure.new_global, [p.astype(np.float64) for p in plain.new_global])
    assert error <= _quantisation_bound(everyone)
    assert secure.workflow.failed_rounds == []
    assert secure.metrics["secagg_failed"] == [(1, 0)]
    assert secure.metrics["secagg_clients"] == [(1, NUM_NODES)]


def test_one_of_five_dropping_after_sharing_keys_gives_the_survivors_aggregate():
    """Client 2 shares its keys, then fails in training: the aggregate is the other four's average."""
    # Prepare
    survivors = [0, 1, 3, 4]

    # Execute
    outcome = _run_round(client_app=_make_client_app(dropping=frozenset({2})), workflow=_make_workflow())

    # Assert
    key_share_senders = {r.metadata.src_node_id for r in _stage_replies(outcome.run, key=Key.CIPHERTEXT_LIST)}
    vector_senders = {r.metadata.src_node_id for r in _stage_replies(outcome.run, key=Key.MASKED_PARAMETERS)}
    assert len(key_share_senders) == NUM_NODES and len(vector_senders) == NUM_NODES - 1
    assert _max_error(outcome.new_global, _weighted_average(survivors)) <= _quantisation_bound(survivors)
    assert _max_error(outcome.new_global, _weighted_average(list(range(NUM_NODES)))) > 1e-4
    assert outcome.metrics["secagg_dropped"] == [(1, 1)]
    assert outcome.workflow.failed_rounds == []


@pytest.mark.parametrize(
    ("stage", "lost", "in_sum"),
    [
        (Stage.SETUP, {1}, [0, 2, 3, 4]),
        (Stage.SHARE_KEYS, {1}, [0, 2, 3, 4]),
        (Stage.COLLECT_MASKED_VECTORS, {1, 3}, [0, 2, 4]),
        (Stage.UNMASK, {1}, [0, 1, 2, 3, 4]),
    ],
)
def test_dropouts_at_every_stage_give_the_aggregate_of_the_vectors_sent(stage, lost, in_sum):
    """Nodes lost before key sharing are left out; two neighbours lost together are unmasked correctly; a node lost
    after sending its vector still counts (Flower 1.41's workflow fails or corrupts the first two cases)."""
    # Prepare
    client_app = _make_client_app(drop_at=(stage, frozenset(lost)))

    # Execute
    outcome = _run_round(client_app=client_app, workflow=_make_workflow())

    # Assert
    assert outcome.workflow.failed_rounds == []
    assert _max_error(outcome.new_global, _weighted_average(in_sum)) <= _quantisation_bound(in_sum)
    assert outcome.metrics["secagg_clients"] == [(1, len(in_sum))]


def test_strategy_and_wire_never_carry_an_individual_update():
    """aggregate_fit gets the same average for every client, and no reply carries a client's update in clear."""
    # Prepare
    everyone = list(range(NUM_NODES))
    individual = [_delta(p) for p in everyone]

    # Execute
    outcome = _run_round(client_app=_make_client_app(), workflow=_make_workflow())

    # Assert
    received = outcome.strategy.received
    assert sorted(num for _, _, num in received) == [_num_examples(p) for p in everyone]
    first = received[0][1]
    for _, arrays, _ in received:
        assert all(np.array_equal(a, b) for a, b in zip(arrays, first))
        for update in individual:
            assert _max_error(arrays, [u.astype(np.float64) for u in update]) > 100 * _quantisation_bound(everyone)
    replies = [reply for reply in outcome.run.replies if reply.has_content()]
    assert all(len(record) == 0 for reply in replies for record in reply.content.array_records.values())
    masked = [np.frombuffer(b, dtype=np.uint8) for r in _stage_replies(outcome.run, key=Key.MASKED_PARAMETERS)
              for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    assert masked and all(m.size > 0 for m in masked)


def test_masks_come_from_the_whole_secret():
    """Seeds Flower 1.41 folds to the same 32 bits give one Flower mask but two different hardened masks."""
    # Prepare
    seed = bytes(range(32))
    twin = bytearray(seed)
    for i in range(4):
        # XOR the same byte into two 4-byte words: the XOR fold to 32 bits is unchanged.
        twin[i] ^= 0x5A
        twin[4 + i] ^= 0x5A
    twin = bytes(twin)
    shapes = [(1,), (64, 8)]

    # Execute
    flower_masks = (pseudo_rand_gen(seed, 2**32, shapes), pseudo_rand_gen(twin, 2**32, shapes))
    ours = derive_masks(seed, num_range=2**32, shapes=shapes)
    ours_again = derive_masks(seed, num_range=2**32, shapes=shapes)
    ours_twin = derive_masks(twin, num_range=2**32, shapes=shapes)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(*flower_masks))
    assert all(np.array_equal(a, b) for a, b in zip(ours, ours_again))
    assert np.mean(ours[1] == ours_twin[1]) < 0.01
    assert [m.shape for m in ours] == shapes


@pytest.mark.parametrize("num_range", [2**20, 2**32])
def test_mask_is_the_aes_ctr_keystream_of_the_hkdf_key(num_range):
    """Golden check against `cryptography` directly, over several streaming chunks, reduced modulo the range."""
    # Prepare
    seed, length = bytes(range(7, 39)), 100_003
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fer-fl secagg+ mask v1").derive(seed)
    keystream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * length))
    expected = np.frombuffer(keystream, dtype="<u4").astype(np.uint64) % num_range

    # Execute
    mask = derive_mask_vector(seed, num_range=num_range, length=length)
    vector = np.full(length, 5, dtype=np.uint32)
    apply_mask(vector, seed, num_range=num_range)
    apply_mask(vector, seed, num_range=num_range, subtract=True)

    # Assert
    assert np.array_equal(mask, expected)
    assert np.all(vector == 5)


@pytest.mark.parametrize("num_range", [2**16, 2**32])
def test_masks_are_uniform_over_the_modulus(num_range):
    """Mask values stay below the modulus and average to half of it."""
    # Execute
    (mask,) = derive_masks(b"k" * 32, num_range=num_range, shapes=[(200_000,)])

    # Assert
    assert int(mask.max()) < num_range
    assert float(mask.mean()) / num_range == pytest.approx(0.5, abs=0.005)


def test_server_rebuilds_a_dropped_nodes_pairwise_mask_exactly():
    """The mask a neighbour added equals the one the server derives from 3 of the dropped node's 5 key shares."""
    # Prepare
    dropped_key, neighbour_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    dropped_scalar = dropped_key.private_numbers().private_value.to_bytes(48, "big")
    shares = create_shares(dropped_scalar, 3, 5)

    # Execute
    neighbour_side = derive_masks(
        generate_shared_key(neighbour_key, dropped_key.public_key()), num_range=2**32, shapes=[(1000,)]
    )
    rebuilt = decode_secret_key(combine_shares(shares[1:4]))
    server_side = derive_masks(
        generate_shared_key(rebuilt, neighbour_key.public_key()), num_range=2**32, shapes=[(1000,)]
    )
    other = derive_masks(
        generate_shared_key(ec.generate_private_key(ec.SECP384R1()), neighbour_key.public_key()),
        num_range=2**32,
        shapes=[(1000,)],
    )

    # Assert
    assert np.array_equal(neighbour_side[0], server_side[0])
    assert not np.array_equal(neighbour_side[0], other[0])


class _MaliciousWorkflow(HardenedSecAggPlusWorkflow):
    """A server that lists one node as both active and dropped, to get both of its secrets."""

    victim: int | None = None

    def unmask_request(self, nid, active, dropped):
        type(self).victim = min(active)
        return sorted(active), sorted(dropped | {min(active)})


def test_malicious_unmask_request_is_refused_and_the_round_fails():
    """Every client refuses, no key share leaves any client, the shares are wiped and the round is failed."""
    # Execute
    outcome = _run_round(client_app=_make_client_app(), workflow=_make_workflow(_MaliciousWorkflow))

    # Assert
    masked_senders = {r.metadata.src_node_id for r in _stage_replies(outcome.run, key=Key.MASKED_PARAMETERS)}
    unmask_replies = [r for r in outcome.run.replies if r.has_error()]
    assert {r.metadata.src_node_id for r in unmask_replies} == masked_senders
    assert all("listed both as active and as dropped" in r.error.reason for r in unmask_replies)
    assert _stage_replies(outcome.run, key=Key.SHARE_LIST) == []
    (failure,) = outcome.workflow.failed_rounds
    assert failure.stage == "unmask"
    assert outcome.metrics["secagg_failed"] == [(1, 1)]
    for context in outcome.run.node_contexts.values():
        state = SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])
        assert state.rd_seed_share_dict == {} and state.sk1_share_dict == {}


def test_stock_flower_mod_answers_the_same_malicious_request():
    """The attack the refusal stops: Flower 1.41's own mod hands over both secrets of the victim."""
    # Execute
    outcome = _run_round(client_app=_make_client_app(mod=secaggplus_mod), workflow=_make_workflow(_MaliciousWorkflow))

    # Assert
    victim = _MaliciousWorkflow.victim
    seed_shares, key_shares = [], []
    for reply in _stage_replies(outcome.run, key=Key.SHARE_LIST):
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        positions = [i for i, nid in enumerate(configs[Key.NODE_ID_LIST]) if nid == victim]
        seed_shares.append(configs[Key.SHARE_LIST][positions[0]])
        key_shares.append(configs[Key.SHARE_LIST][positions[1]])
    assert len(seed_shares) >= 3
    assert len(combine_shares(seed_shares[:3])) == 32
    assert isinstance(bytes_to_private_key(combine_shares(key_shares[:3])), ec.EllipticCurvePrivateKey)


@pytest.mark.parametrize(
    ("active", "dropped", "message"),
    [
        ([1, 2, 3], [3], "both as active and as dropped"),
        ([1, 2, 2], [], "listed twice"),
        ([2, 3], [1], "listed as dropped while it is answering"),
        ([1, 2, 9], [], "holds no shares of node(s) [9]"),
    ],
)
def test_unmask_request_checks(active, dropped, message):
    """Each request that could expose a node's masks is refused with a message naming why."""
    # Prepare
    state = SecAggPlusState(nid=1)
    state.rd_seed_share_dict = {1: b"a", 2: b"b", 3: b"c"}
    state.sk1_share_dict = dict(state.rd_seed_share_dict)
    configs = {Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dropped}

    # Execute / Assert
    with pytest.raises(UnmaskRequestRefused, match=re.escape(message)):
        check_unmask_request(state, configs)


def test_too_many_dropouts_fail_the_round_visibly():
    """Three of five drop (threshold 3): the round is recorded failed, the model and strategy untouched."""
    # Execute
    outcome = _run_round(client_app=_make_client_app(dropping=frozenset({0, 1, 2})), workflow=_make_workflow())

    # Assert
    (failure,) = outcome.workflow.failed_rounds
    assert (failure.server_round, failure.stage) == (1, "collect_masked_vectors")
    assert "too few clients left" in failure.reason
    assert len(failure.client_errors) == 3
    assert outcome.metrics == {"secagg_failed": [(1, 1)]}
    assert outcome.strategy.received == []
    assert all(not a.any() for a in outcome.new_global)


def _poisoned(kind: str):
    """Updates where client 3's is spoiled in the given way (NaN, Inf, wrong shape, oversized)."""

    def updates(partition: int) -> list[np.ndarray]:
        arrays = _delta(partition)
        if partition != 3:
            return arrays
        if kind == "nan":
            arrays[0][5, 5] = np.nan
        elif kind == "inf":
            arrays[2][0, 0] = -np.inf
        elif kind == "shape":
            arrays[1] = np.zeros(31, np.float32)
        elif kind == "oversized":
            # Weighted by 250/1000 this still exceeds the clipping range 4-fold.
            arrays[3][:] = 16 * CLIPPING_RANGE
        return arrays

    return updates


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan", "tensor 0 contains NaN or Inf"),
        ("inf", "tensor 2 contains NaN or Inf"),
        ("shape", "tensor 1 has shape (31,)"),
        ("oversized", "exceeds the SecAgg+ clipping_range"),
    ],
)
def test_bad_update_is_refused_before_masking(kind, message):
    """A NaN/Inf/mis-shaped/oversized update never gets masked; the round goes on with the other four."""
    # Prepare: validation only, so an oversized update is refused rather than clipped.
    client_app = _make_client_app(updates=_poisoned(kind), mod=make_secagg_mod(max_norm=None, node_options=secagg_options))
    survivors = [0, 1, 2, 4]

    # Execute
    outcome = _run_round(client_app=client_app, workflow=_make_workflow())

    # Assert
    (error,) = [r for r in outcome.run.replies if r.has_error()]
    assert message in error.error.reason
    assert len(_stage_replies(outcome.run, key=Key.MASKED_PARAMETERS)) == NUM_NODES - 1
    assert _max_error(outcome.new_global, _weighted_average(survivors)) <= _quantisation_bound(survivors)


def test_oversized_update_is_norm_clipped_when_the_mod_clips():
    """With max_norm set, client 3's huge update is scaled to that norm and aggregated, not refused."""
    # Prepare
    updates = _poisoned("oversized")
    huge = updates(3)
    norm = float(np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in huge)))

    def clipped(partition: int) -> list[np.ndarray]:
        arrays = updates(partition)
        return [a * (CLIPPING_RANGE / norm) for a in arrays] if partition == 3 else arrays

    # Execute
    outcome = _run_round(client_app=_make_client_app(updates=updates), workflow=_make_workflow())

    # Assert
    everyone = list(range(NUM_NODES))
    assert not [r for r in outcome.run.replies if r.has_error()]
    assert _max_error(outcome.new_global, _weighted_average(everyone, clipped)) <= _quantisation_bound(everyone)


@pytest.mark.parametrize(
    ("client_max_norm", "overrides", "reason"),
    [
        (2 * CLIPPING_RANGE, {}, "max_norm 1.0 exceeds the server's clipping_range"),
        (CLIPPING_RANGE, {"quantization_range": 2**30}, "overflows modulus"),
    ],
)
def test_unsafe_configuration_fails_at_setup(client_max_norm, overrides, reason):
    """A clip the quantiser could still cut, or a sum that would wrap the modulus, stops the round at setup."""
    # Execute
    outcome = _run_round(
        client_app=_make_client_app(mod=make_secagg_mod(max_norm=client_max_norm, node_options=secagg_options)),
        workflow=_make_workflow(**overrides),
    )

    # Assert
    (failure,) = outcome.workflow.failed_rounds
    assert failure.stage == "setup"
    assert reason in failure.reason or any(reason in e for e in failure.client_errors)


@pytest.mark.slow
def test_round_on_flowers_ray_simulation():
    """The same round on `flwr.simulation.run_simulation` (Ray actors, pickled mod): survivors' average."""
    # Prepare
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    strategy = _RecordingFedAvg()
    workflow = _make_workflow()
    captured = {}
    server_app = ServerApp()

    @server_app.main()
    def _(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
        record = legacy.state.array_records[MAIN_PARAMS_RECORD]
        captured["global"] = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))

    # Execute
    run_simulation(
        server_app=server_app,
        client_app=_make_client_app(dropping=frozenset({2})),
        num_supernodes=NUM_NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )

    # Assert
    survivors = [0, 1, 3, 4]
    assert workflow.failed_rounds == []
    assert _max_error(captured["global"], _weighted_average(survivors)) <= _quantisation_bound(survivors)


# --- Issue 10 items 5, 6, 7 and 11: a curious or malicious coordinator ------------------------------------------


def _make_guard(*, max_examples: int = 10_000) -> GuardedStrategy:
    """GuardedStrategy over FedAvg, as the ServerApp wraps it, for NUM_NODES clients and a zero initial model."""
    initial = [np.zeros(shape, np.float32) for shape in SHAPES]
    inner = FedAvg(
        fraction_evaluate=0.0,
        min_fit_clients=NUM_NODES,
        min_available_clients=NUM_NODES,
        initial_parameters=ndarrays_to_parameters(initial),
    )
    return GuardedStrategy(inner, expected_shapes=SHAPES, max_update_norm=10.0, max_examples=max_examples)


def _run_guarded_round(guard: GuardedStrategy, client_app: ClientApp) -> tuple[list[np.ndarray], dict]:
    """One SecAgg+ round through the ServerApp's own FerWorkflow; returns the new global model and round 1's record."""
    from server.server_app import FerWorkflow

    records: list[dict] = []
    captured = {}

    def server_main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=guard)
        workflow = FerWorkflow(
            strategy=guard, num_rounds=1, start_weights=[np.zeros(shape, np.float32) for shape in SHAPES],
            fit_workflow=_make_workflow(), evaluate_clients=False, on_round=records.append,
        )
        workflow(grid, legacy)
        captured["global"] = workflow.final_weights

    run_in_process(server_main, client_app, num_nodes=NUM_NODES)
    (record,) = [r.to_json() for r in records if r.round == 1]
    return captured["global"], record


def _rolled_back_ledger(partition: int) -> dict:
    """Site 2 reports ledger sequence 3 after the server recorded 7 for the same ledger: a rolled-back budget."""
    metrics = _site_metrics(partition)
    if partition == 2:
        metrics |= {"dp-ledger-id": "ledger-of-site-2", "dp-ledger-seq": 3}
    return metrics


@pytest.mark.parametrize(
    ("refused", "max_examples", "metrics", "reason"),
    [
        (2, 10_000, _rolled_back_ledger, "went back from sequence 7 (round 0) to 3 (round 1)"),
        (4, 280, _site_metrics, "num-examples 300 exceeds the plausible maximum 280"),
    ],
)
def test_node_refused_under_secagg_is_out_of_the_sum(refused, max_examples, metrics, reason):
    """A node the guard refuses (ledger rollback, implausible count) is not in the SecAgg+ aggregate, and the round's
    record names it (before the fix every FitRes carried the same sum, so the refusal removed nothing)."""
    # Prepare
    guard = _make_guard(max_examples=max_examples)
    guard.ledgers.accept("site-2", {"ledger_id": "ledger-of-site-2", "ledger_seq": 7}, server_round=0)
    others = [p for p in range(NUM_NODES) if p != refused]

    # Execute
    new_global, record = _run_guarded_round(guard, _make_client_app(metrics=metrics))

    # Assert
    assert _max_error(new_global, _weighted_average(others)) <= _quantisation_bound(others)
    assert _max_error(new_global, _weighted_average(list(range(NUM_NODES)))) > 1e-4
    fit = record["fit"]
    assert fit["failed"] is False
    assert fit["secagg_excluded"] == [f"site-{refused}"]
    assert [(r["client"], reason in r["reason"]) for r in fit["rejected"]] == [(f"site-{refused}", True)]
    assert (fit["num_clients"], fit["num_accepted"]) == (NUM_NODES, NUM_NODES - 1)


@pytest.mark.parametrize(
    ("overrides", "floor", "message"),
    [
        ({"num_shares": 5, "reconstruction_threshold": 2}, None, "threshold 2 is not more than half of 5 shares"),
        ({}, 4, "threshold 3 is below this site's floor 4"),
    ],
)
def test_site_refuses_a_threshold_the_server_could_split(overrides, floor, message):
    """A threshold of at most half the shares (or below the site's own floor) stops the round at setup, before any
    key share exists: otherwise two halves of a node's neighbours, sent different unmask lists, hand over both of
    its secrets."""
    # Prepare
    node_config = (lambda partition: {"secagg-min-threshold": floor}) if floor else None

    # Execute
    outcome = _run_round(client_app=_make_client_app(), workflow=_make_workflow(**overrides), node_config=node_config)

    # Assert
    (failure,) = outcome.workflow.failed_rounds
    assert failure.stage == "setup"
    assert len(failure.client_errors) == NUM_NODES
    assert all(message in error for error in failure.client_errors)
    assert _stage_replies(outcome.run, key=Key.CIPHERTEXT_LIST) == []


def _signed_sites(tmp_path, *, roster_for=None):
    """Node keys for every site, the roster of their public keys, and a node-config function (roster pinned by the
    partitions in `roster_for`, all of them when None)."""
    from client.deploy import generate_node_keys

    keys = {p: generate_node_keys(out_dir=tmp_path, name=f"site-{p}") for p in range(NUM_NODES)}
    roster = tmp_path / "secagg-roster.yaml"
    roster.write_text("".join(f"site-{p}: {k.public_key.read_text().strip()}\n" for p, k in keys.items()))

    def node_config(partition: int) -> dict:
        config = {"node-key": str(keys[partition].private_key)}
        if roster_for is None or partition in roster_for:
            config["secagg-roster"] = str(roster)
        return config

    return node_config


def test_signed_keys_and_a_pinned_roster_give_the_plain_aggregate(tmp_path):
    """Every site signs its SecAgg+ keys and checks its neighbours' against the roster: the honest round succeeds."""
    # Execute
    outcome = _run_round(client_app=_make_client_app(), workflow=_make_workflow(),
                         node_config=_signed_sites(tmp_path))

    # Assert
    everyone = list(range(NUM_NODES))
    assert outcome.workflow.failed_rounds == []
    assert _max_error(outcome.new_global, _weighted_average(everyone)) <= _quantisation_bound(everyone)


class _KeySwappingWorkflow(HardenedSecAggPlusWorkflow):
    """A server that hands the victim's neighbours key pairs of its own in place of the victim's, so that it can
    decrypt the key shares they encrypt "to the victim"."""

    victim: int | None = None
    server_sk2: bytes = b""
    public_keys: dict = {}

    def share_keys_stage(self, grid, context, state):
        from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes

        victim = min(state.active_node_ids)
        (_, pk1), (sk2, pk2) = generate_key_pairs(), generate_key_pairs()
        type(self).victim, type(self).server_sk2 = victim, private_key_to_bytes(sk2)
        type(self).public_keys = {nid: list(keys) for nid, keys in state.nid_to_publickeys.items()}
        state.nid_to_publickeys[victim] = [public_key_to_bytes(pk1), public_key_to_bytes(pk2)]
        return super().share_keys_stage(grid, context, state)


def _shares_the_server_decrypts(outcome: _Round) -> int:
    """How many key-share ciphertexts meant for the victim the key-swapping server can open with its own key."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    opened = 0
    for reply in _stage_replies(outcome.run, key=Key.CIPHERTEXT_LIST):
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        sender_pk2 = _KeySwappingWorkflow.public_keys[reply.metadata.src_node_id][1]
        server_sk2 = bytes_to_private_key(_KeySwappingWorkflow.server_sk2)
        key = generate_shared_key(server_sk2, bytes_to_public_key(sender_pk2))
        for dst, ciphertext in zip(configs[Key.DESTINATION_LIST], configs[Key.CIPHERTEXT_LIST]):
            if dst == _KeySwappingWorkflow.victim:
                decrypt(key, ciphertext)  # raises unless the server's key opens it
                opened += 1
    return opened


def test_neighbours_pinning_the_roster_refuse_substituted_keys(tmp_path):
    """The server swaps in its own keys for one node: every neighbour that pins the roster refuses before
    encrypting a single share to them (before the fix they sent shares the server could open)."""
    # Execute
    outcome = _run_round(client_app=_make_client_app(), workflow=_make_workflow(_KeySwappingWorkflow),
                         node_config=_signed_sites(tmp_path))

    # Assert
    (failure,) = outcome.workflow.failed_rounds
    assert failure.stage == "share_keys"
    refusals = [e for e in failure.client_errors if "do not match the signature" in e]
    assert len(refusals) == NUM_NODES - 1
    assert all(f"neighbour {_KeySwappingWorkflow.victim}'s SecAgg+ keys" in e for e in refusals)
    assert _shares_the_server_decrypts(outcome) == 0


def test_without_a_pinned_roster_substituted_keys_leak_shares(tmp_path):
    """The residual risk of a site that pins no roster (docs/deployment.md): it encrypts its shares to the server."""
    # Execute
    outcome = _run_round(client_app=_make_client_app(), workflow=_make_workflow(_KeySwappingWorkflow),
                         node_config=_signed_sites(tmp_path, roster_for=set()))

    # Assert
    assert _shares_the_server_decrypts(outcome) == NUM_NODES - 1


def test_roster_refuses_strangers_and_one_member_posing_as_two(tmp_path):
    """A neighbour signed by a key outside the roster, or two neighbours signed by one member, are refused."""
    # Prepare
    from client.deploy import generate_node_keys
    from privacy.secagg_identity import NeighbourKeysRefused, load_roster, sign_keys, verify_neighbour_keys

    member = generate_node_keys(out_dir=tmp_path, name="member")
    stranger = generate_node_keys(out_dir=tmp_path, name="stranger")
    roster_file = tmp_path / "roster.yaml"
    roster_file.write_text(f"member: {member.public_key.read_text().strip()}\n")
    keys = {7: (b"pk1-7", b"pk2-7"), 8: (b"pk1-8", b"pk2-8")}

    def signed(key_file, node_id):
        return sign_keys(key_file, run_id=1, group_id="3", node_id=node_id, pk1=keys[node_id][0], pk2=keys[node_id][1])

    cases = [
        ({7: signed(stranger.private_key, 7)}, {7: keys[7]}, "signed by a key not in the pinned roster"),
        ({7: signed(member.private_key, 7), 8: signed(member.private_key, 8)}, keys, "both signed by roster member"),
        ({7: signed(member.private_key, 8)}, {7: keys[7]}, "carry a signature for node 8"),
        ({}, {7: keys[7]}, "sent no signature"),
    ]

    # Execute / Assert
    for attestations, public_keys, message in cases:
        with pytest.raises(NeighbourKeysRefused, match=re.escape(message)):
            verify_neighbour_keys(roster=load_roster(roster_file), public_keys=public_keys,
                                  attestations=attestations, own_node_id=1, run_id=1, group_id="3")
    verify_neighbour_keys(roster=load_roster(roster_file), public_keys={7: keys[7]},
                          attestations={7: signed(member.private_key, 7)}, own_node_id=1, run_id=1, group_id="3")


class _SubsetFedAvg(_RecordingFedAvg):
    """FedAvg that samples every node except `left_out` (a server choosing a round's participants)."""

    def __init__(self, left_out: int) -> None:
        super().__init__()
        self.min_fit_clients = self.min_available_clients = NUM_NODES - 1
        self.left_out = left_out

    def configure_fit(self, server_round, parameters, client_manager):
        chosen = super().configure_fit(server_round, parameters, client_manager)
        return [(proxy, ins) for proxy, ins in chosen if proxy.node_id != self.left_out]


def test_repeated_round_with_another_participant_set_reveals_no_update():
    """A server runs round 1 with all five nodes, then round 1 again from the same global model without one node:
    the difference of the two sums would be that node's update. The nodes decline the repeat, so there is no second
    sum (before the fix the difference gave the left-out node's update to within quantisation)."""
    # Prepare
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    workflow = _make_workflow()
    first, repeat = _RecordingFedAvg(), None
    sums: list[list[np.ndarray]] = []

    def server_main(grid: Grid, context: Context) -> None:
        nonlocal repeat
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=first)
        thread, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
        ready.wait()
        try:
            initial = first.initial_parameters
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
            repeat = _SubsetFedAvg(left_out=max(p.node_id for p in legacy.client_manager.all().values()))
            for strategy in (first, repeat):
                legacy.strategy = strategy
                legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(initial, True)
                workflow(grid, legacy)
                record = legacy.state.array_records[MAIN_PARAMS_RECORD]
                sums.append(parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True)))
        finally:
            stop.set()
            thread.join()

    # Execute
    run = run_in_process(server_main, _make_client_app(), num_nodes=NUM_NODES)

    # Assert
    victim_partition = int(run.node_contexts[repeat.left_out].node_config["partition-id"])
    others = [p for p in range(NUM_NODES) if p != victim_partition]
    weight = {p: _num_examples(p) for p in range(NUM_NODES)}
    # What the server would compute: the victim's update as the difference of the two weighted sums.
    difference = [
        (a.astype(np.float64) * sum(weight.values()) - b.astype(np.float64) * sum(weight[p] for p in others))
        / weight[victim_partition]
        for a, b in zip(*sums)
    ]
    assert _max_error(difference, [u.astype(np.float64) for u in _delta(victim_partition)]) > 1e-3
    assert [f.server_round for f in workflow.failed_rounds] == [1]
    declined = workflow.failed_rounds[0].client_errors
    assert len(declined) == NUM_NODES - 1 and all("declining the repeated round" in e for e in declined)
    assert repeat.received == []


def test_repeated_round_is_declined_across_runs_through_the_state_dir(tmp_path):
    """After a restart (a resumed run: new run, fresh node Contexts) the same round from the same global model is
    still declined: the contribution is remembered in the node's state directory, digests only."""
    # Prepare
    def node_config(partition: int) -> dict:
        return {"state-dir": str(tmp_path / f"node-{partition}")}

    first = _run_round(client_app=_make_client_app(), workflow=_make_workflow(), node_config=node_config)

    # Execute
    again = _run_round(client_app=_make_client_app(), workflow=_make_workflow(), node_config=node_config)

    # Assert
    assert first.workflow.failed_rounds == []
    (failure,) = again.workflow.failed_rounds
    assert failure.stage == "collect_masked_vectors"
    assert len(failure.client_errors) == NUM_NODES
    assert all("declining the repeated round" in error for error in failure.client_errors)
    assert _stage_replies(again.run, key=Key.MASKED_PARAMETERS) == []
    record = (tmp_path / "node-0" / "secagg-contributed.json").read_text()
    assert record.startswith('{"identities": ["1:') and len(record) < 200


def test_quantisation_cost_bounds_the_measured_error():
    """The recorded worst-case error is the independent bound, and the measured error of the decoded average stays
    within it (RMS within its expectation bound)."""
    # Execute
    everyone = list(range(NUM_NODES))
    outcome = _run_round(client_app=_make_client_app(), workflow=_make_workflow())

    # Assert
    cost = outcome.workflow.quantization[1]
    errors = np.concatenate([(a.astype(np.float64) - e).ravel()
                             for a, e in zip(outcome.new_global, _weighted_average(everyone))])
    assert cost.max_abs_error == pytest.approx(_quantisation_bound(everyone), rel=1e-12)
    assert cost.step == pytest.approx(2 * CLIPPING_RANGE / QUANTIZATION_RANGE)
    assert 0 < float(np.abs(errors).max()) <= cost.max_abs_error
    # float32 rounding of the stored average adds at most ~1e-10 here; the RMS bound is an upper bound on variance.
    assert float(np.sqrt(np.mean(errors**2))) <= 1.2 * cost.rms_error
    smallest_weight = round(_num_examples(0) / MAX_WEIGHT * QUANTIZATION_RANGE) / QUANTIZATION_RANGE
    assert cost.max_abs_error_per_update == pytest.approx(cost.step / smallest_weight)


@pytest.mark.parametrize(("shares", "threshold"), [(4, 2), (5, 2), (6, 3)])
def test_coordinator_refuses_a_threshold_sites_would_refuse(shares, threshold):
    """fer-server/fer-sim refuse secagg-threshold <= secagg-shares/2 up front, naming the key."""
    from client.config import ConfigError, RunSettings

    with pytest.raises(ConfigError, match="secagg-threshold must be more than half of secagg-shares"):
        RunSettings(secure_agg=True, secagg_shares=shares, secagg_threshold=threshold).validate()
    RunSettings(secure_agg=True, secagg_shares=shares, secagg_threshold=shares // 2 + 1).validate()
