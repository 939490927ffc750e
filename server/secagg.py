"""Server side of Flower 1.41's SecAgg+ protocol, hardened: the fit workflow for `DefaultWorkflow(fit_workflow=...)`.

Subclasses Flower's `SecAggPlusWorkflow` and keeps its setup, key-sharing and collection stages. What changes:

- Unmasking regenerates masks with `privacy.secagg_masks.apply_masks` (HKDF + AES-CTR from the full secret), the
  generator the clients (`privacy.secagg.make_secagg_mod`) mask with; Flower's folds seeds to 32 bits.
- A dropped node is one that shared its keys but sent no masked vector. Flower 1.41 also counts nodes that never
  shared keys (their shares do not exist, so the round fails) and removes pairwise masks towards neighbours that
  themselves dropped (corrupting the sum when two neighbours drop); both are fixed here.
- The unmask request never lists a node as both active and dropped (the clients refuse such requests).
- A dropped node's first secret key comes back as its 48-byte scalar (the clients share that instead of the PEM
  text, 5x fewer Shamir chunks), and every secret is rebuilt from exactly `threshold` shares.
- Each node's signature over its SecAgg+ public keys (`privacy.secagg_identity`) is relayed to its neighbours with
  the keys, so that a node pinning the coordinator's roster can check them.
- A strategy that implements `screen_masked_reply` (server.strategy.GuardedStrategy) sees each masked reply's
  clear metadata (example count, ledger status) before the vector is summed; a refused node's vector is left out
  and the node is unmasked as a dropped one (its pairwise masks rebuilt, its private mask never), so the
  aggregate is exactly the other nodes' and the refusal really removes it (issue 10 item 5).
- Each round records its quantisation cost (`QuantizationCost`): the worst-case and expected error that the
  integer encoding adds to each value of the decoded average, for privacy.json (issue 10 item 11).
- A halted round is reported as FAILED (fix (d)): Flower 1.41 logs "halted" and the round looks like a success
  with the model unchanged. Here a `SecAggRoundFailed` is appended to `workflow.failed_rounds`, logged at ERROR,
  and the round's distributed-fit metrics carry `secagg_failed = 1`; the run carries on with the model unchanged.

What the strategy receives, on success: `aggregate_fit(server_round, results, failures)` where `results` holds one
`(ClientProxy, FitRes)` per client whose masked vector is in the sum, each FitRes carrying that client's own
`num_examples` and metrics (these travel in the clear) and the SAME parameters: the num_examples-weighted AVERAGE of
the survivors' updates (sum_i w_i x_i / sum_i w_i, w_i = num_examples_i quantised to 1/quantization_range of
max_weight), in the dtypes of the global model. With clients sending deltas this is the average delta; FedAvg on
these results returns it unchanged. The workflow then stores whatever `aggregate_fit` returns as the new global
model, so a strategy fed deltas must return global + average delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Protocol, cast, runtime_checkable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
from flwr.serverapp.grid import Grid
from flwr.supercore import log
from flwr.supercore.primitives.asymmetric import bytes_to_public_key
from numpy.typing import NDArray

from privacy.secagg import decode_secret_key
from privacy.secagg_identity import ATTESTATION_KEY, ATTESTATIONS_KEY
from privacy.secagg_masks import MAX_MODULUS, apply_masks
from server.secagg_outcome import QuantizationCost, SecAggRoundFailed, _quantization_cost
from server.secagg_tap import _GridTap

FAILED_METRIC = "secagg_failed"


@runtime_checkable
class MaskedReplyScreen(Protocol):
    """A strategy that vets the clear part of a masked reply before its vector joins the sum."""

    def screen_masked_reply(self, server_round: int, proxy: ClientProxy, res: FitRes) -> str | None:
        """Why this node must be left out of the sum (its FitRes holds metadata only), or None to keep it."""


@dataclass
class _RoundState(WorkflowState):
    """Flower's workflow state plus what the hardened stages need."""

    keyed_node_ids: set[int] = field(default_factory=set)
    halt_reason: str = ""
    aggregate: list[NDArray[np.floating]] = field(default_factory=list)
    num_dropped: int = 0
    attestations: dict[int, bytes] = field(default_factory=dict)
    excluded_node_ids: set[int] = field(default_factory=set)
    quantization: QuantizationCost | None = None

    def halt(self, reason: str) -> bool:
        """Ends the round with `reason` (kept for the failure report); returns False, a stage's "not completed"."""
        self.halt_reason = reason
        return False


class HardenedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with cryptographic masks, correct dropout handling and visible failures.

    Build it with `make_secagg_workflow`. After a run, `failed_rounds` lists every round that failed.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.modulus_range > MAX_MODULUS:
            raise ValueError(f"`modulus_range` must be at most 2**32, got {self.modulus_range}")
        self.failed_rounds: list[SecAggRoundFailed] = []
        self.quantization: dict[int, QuantizationCost] = {}

    def __call__(self, grid: Grid, context: Context) -> None:
        """Runs one SecAgg+ round; a failure is recorded, never raised, so the run goes on."""
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        server_round = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        state = _RoundState()
        stages = (
            ("setup", self.setup_stage),
            ("share_keys", self.share_keys_stage),
            ("collect_masked_vectors", self.collect_masked_vectors_stage),
            ("unmask", self.unmask_stage),
        )
        log(INFO, "Secure aggregation commencing.")
        for stage, step in stages:
            try:
                completed = step(grid, context, state)
            # Malformed or malicious replies (bad shares, unknown node IDs) end the round, not the whole run.
            except (ValueError, KeyError, TypeError, IndexError) as err:
                completed = state.halt(f"{type(err).__name__}: {err}")
            if not completed:
                self._fail(context, state, server_round=server_round, stage=stage)
                return
        self._aggregate(context, state, server_round=server_round)
        log(INFO, "Secure aggregation completed.")

    def _fail(self, context: LegacyContext, state: _RoundState, *, server_round: int, stage: str) -> None:
        failure = SecAggRoundFailed(
            server_round=server_round,
            stage=stage,
            reason=state.halt_reason or "halted",
            client_errors=tuple(_error_text(err) for err in state.failures),
        )
        self.failed_rounds.append(failure)
        log(ERROR, "%s (model unchanged)", failure)
        context.history.add_metrics_distributed_fit(server_round=server_round, metrics={FAILED_METRIC: 1})

    def _check_threshold(self, state: WorkflowState) -> bool:
        # Flower 1.41's check, keeping the reason for the failure report instead of a bare log line.
        for node_id in state.sampled_node_ids:
            active_neighbours = state.nid_to_neighbours[node_id] & state.active_node_ids
            if len(active_neighbours) < state.threshold:
                return cast(_RoundState, state).halt(
                    f"too few clients left: node {node_id} has {len(active_neighbours)} active neighbours "
                    f"({len(state.active_node_ids)} of {len(state.sampled_node_ids)} clients left), "
                    f"reconstruction threshold {state.threshold}"
                )
        return True

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's setup, refusing a configuration whose sum would overflow the modulus."""
        round_state = cast(_RoundState, state)

        def keep_attestation(reply: Message) -> bool:
            if not reply.has_error():
                blob = reply.content.config_records[RECORD_KEY_CONFIGS].get(ATTESTATION_KEY)
                if isinstance(blob, bytes):
                    round_state.attestations[reply.metadata.src_node_id] = blob
            return True

        completed = super().setup_stage(_GridTap(grid, incoming=keep_attestation), context, state)
        if not state.nid_to_fitins:
            return round_state.halt("the strategy selected no clients")
        if len(state.nid_to_fitins) < 2:
            return round_state.halt("secure aggregation needs at least 2 clients")
        if len(state.sampled_node_ids) * state.quantization_range >= state.mod_range:
            return round_state.halt(f"{len(state.sampled_node_ids)} clients x quantization_range "
                                    f"{state.quantization_range} overflows modulus_range {state.mod_range}")
        return completed

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's key sharing; remembers who shared keys, the only nodes whose secrets can be reconstructed."""
        round_state = cast(_RoundState, state)

        def add_attestations(message: Message) -> None:
            # Each neighbour's signature goes with its keys; the receiving node checks them against its roster.
            if not round_state.attestations:
                return  # no node signed (stock Flower mods would refuse the extra entry)
            configs = message.content.config_records[RECORD_KEY_CONFIGS]
            neighbours = [int(key) for key in configs if key.isdigit()]
            configs[ATTESTATIONS_KEY] = [
                round_state.attestations[nid] for nid in sorted(neighbours) if nid in round_state.attestations
            ]

        completed = super().share_keys_stage(_GridTap(grid, outgoing=add_attestations), context, state)
        round_state.keyed_node_ids = set(state.active_node_ids)
        return completed

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's collection (the masked sum), without the vectors of nodes the strategy refuses.

        A refused reply is taken out before Flower sums the vectors, so the node counts as dropped after sharing
        its keys: the unmask stage rebuilds its pairwise masks from its neighbours' shares and never asks for its
        private-mask seed, so its update stays hidden and is not in the aggregate.
        """
        round_state = cast(_RoundState, state)
        server_round = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        screen = context.strategy if isinstance(context.strategy, MaskedReplyScreen) else None

        def vet(reply: Message) -> bool:
            if screen is None or reply.has_error():
                return True
            node_id = reply.metadata.src_node_id
            try:
                fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            except Exception as err:  # noqa: BLE001 - a peer's malformed reply is refused, never raised
                reason: str | None = f"unreadable fit result ({type(err).__name__})"
            else:
                reason = screen.screen_masked_reply(server_round, state.nid_to_proxies[node_id], fitres)
            if reason is None:
                return True
            round_state.excluded_node_ids.add(node_id)
            log(WARNING, "SecAgg+ round %d: node %d left out of the sum: %s", server_round, node_id, reason)
            return False

        num_failures_before = len(state.failures)
        completed = super().collect_masked_vectors_stage(_GridTap(grid, incoming=vet), context, state)
        # Flower 1.41 appends each error reply of this stage twice (two loops over the replies).
        new_failures = state.failures[num_failures_before:]
        state.failures[num_failures_before:] = new_failures[: len(new_failures) // 2]
        return completed

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Collects key shares, removes every mask and decodes the weighted average of the survivors' updates.

        Adapted from flwr 1.41 `SecAggPlusWorkflow.unmask_stage`; the strategy call moved to `_aggregate`.
        """
        round_state = cast(_RoundState, state)
        current_round = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        active_nids = set(state.active_node_ids)
        dropped_nids = round_state.keyed_node_ids - active_nids
        round_state.num_dropped = len(state.sampled_node_ids) - len(active_nids)

        requested: dict[int, set[int]] = {}

        def make(nid: int) -> Message:
            neighbours = state.nid_to_neighbours[nid]
            active, dropped = self.unmask_request(nid, neighbours & active_nids, neighbours & dropped_nids)
            requested[nid] = set(active) | set(dropped)
            cfg_record = ConfigRecord(
                {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dropped}
            )
            return Message(
                content=RecordDict({RECORD_KEY_CONFIGS: cfg_record}),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
                group_id=str(current_round),
            )

        msgs = grid.send_and_receive([make(nid) for nid in active_nids], timeout=self.timeout)
        shares: dict[int, list[bytes]] = {nid: [] for nid in active_nids | dropped_nids}
        for msg in msgs:
            if msg.has_error():
                state.failures.append(Exception(msg.error))
                continue
            res_dict = msg.content.config_records[RECORD_KEY_CONFIGS]
            owners = cast(list[int], res_dict[Key.NODE_ID_LIST])
            owner_shares = cast(list[bytes], res_dict[Key.SHARE_LIST])
            for owner, share in zip(owners, owner_shares, strict=True):
                # Only shares the server asked this client for count (a client cannot inject others' secrets).
                if owner in requested.get(msg.metadata.src_node_id, set()):
                    shares[owner].append(share)
        for nid, node_shares in shares.items():
            if len(node_shares) < state.threshold:
                return round_state.halt(
                    f"only {len(node_shares)} key shares of node {nid} came back, {state.threshold} needed"
                )
            # Exactly `threshold` shares rebuild the secret; Flower passes all of them, and Lagrange
            # interpolation in PyCryptodome's pure-Python GF(2^128) costs quadratically in their number.
            del node_shares[state.threshold :]

        masked = state.aggregate_ndarrays
        shapes = [array.shape for array in masked]
        vector = np.concatenate([array.reshape(-1) for array in masked]).astype(np.uint32)
        # Private-mask seeds of the nodes whose vectors are in the sum, and the pairwise masks that surviving
        # neighbours of each dropped node added (the higher node ID added, the lower subtracted).
        masks = [(combine_shares(shares[nid]), True) for nid in active_nids]
        for nid in dropped_nids:
            secret_key = decode_secret_key(combine_shares(shares[nid]))
            for neighbour in (state.nid_to_neighbours[nid] - {nid}) & active_nids:
                shared_key = generate_shared_key(
                    secret_key, bytes_to_public_key(state.nid_to_publickeys[neighbour][0])
                )
                masks.append((shared_key, neighbour > nid))
        apply_masks(vector, masks, num_range=state.mod_range)
        if state.mod_range < MAX_MODULUS:
            vector &= np.uint32(state.mod_range - 1)

        total_weight = int(vector[0])
        if total_weight == 0:
            return round_state.halt("the survivors' total weight is zero")
        # Each survivor sent round((w_i x_i + c) * T / 2c); the sum decodes to sum_i w_i x_i + n c.
        step = 2 * state.clipping_range / state.quantization_range
        summed = vector[1:].astype(np.float64) * step - len(active_nids) * state.clipping_range
        average = summed * (state.quantization_range / total_weight)
        round_state.quantization = _quantization_cost(
            state, server_round=current_round, total_weight=total_weight, num_clients=len(active_nids)
        )
        round_state.aggregate = _unflatten(average, shapes[1:], _global_dtypes(context, len(shapes) - 1))
        del state.aggregate_ndarrays
        return True

    def unmask_request(self, nid: int, active: set[int], dropped: set[int]) -> tuple[list[int], list[int]]:
        """The (active, dropped) node lists sent to node `nid`; disjoint by construction.

        A separate method so that a test can play a malicious server.
        """
        del nid
        return sorted(active), sorted(dropped)

    def _aggregate(self, context: LegacyContext, state: _RoundState, *, server_round: int) -> None:
        parameters = ndarrays_to_parameters(state.aggregate)
        results = state.legacy_results
        for _, fitres in results:
            fitres.parameters = parameters
        log(INFO, "aggregate_fit: received %s results and %s failures", len(results), len(state.failures))
        parameters_aggregated, metrics_aggregated = context.strategy.aggregate_fit(
            server_round, results, state.failures  # type: ignore[arg-type]
        )
        if not parameters_aggregated:
            state.halt("the strategy returned no parameters")
            self._fail(context, state, server_round=server_round, stage="aggregate")
            return
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            parameters_aggregated, True
        )
        if state.quantization is not None:
            self.quantization[server_round] = state.quantization
        context.history.add_metrics_distributed_fit(
            server_round=server_round,
            metrics={
                **metrics_aggregated,
                FAILED_METRIC: 0,
                "secagg_clients": len(results),
                "secagg_dropped": state.num_dropped,
                "secagg_excluded": len(state.excluded_node_ids),
            },
        )


def make_secagg_workflow(
    *,
    num_shares: int | float,
    reconstruction_threshold: int | float,
    clipping_range: float,
    quantization_range: int,
    max_weight: float = 10_000.0,
    modulus_range: int = MAX_MODULUS,
    timeout: float | None = None,
) -> HardenedSecAggPlusWorkflow:
    """Builds the hardened SecAgg+ fit workflow for `DefaultWorkflow(fit_workflow=...)`.

    Args:
        num_shares: Shares per secret (int > 2, or a fraction of the sampled clients); each client masks with
            num_shares - 1 neighbours.
        reconstruction_threshold: Shares needed to rebuild a secret (int < num_shares, or a fraction of them);
            the round fails when any node keeps fewer live neighbours than this.
        clipping_range: Bound on every weighted update value; use the clients' L2 clip (`max_norm`) or more, so
            the quantiser never clips. The worst-case error of the average is
            num_clients * 2 * clipping_range / quantization_range / sum_i(num_examples_i / max_weight).
        quantization_range: Integer levels per value; clients x quantization_range must stay below modulus_range.
        max_weight: Largest num_examples a client may report (larger is refused by the client).
        modulus_range: Power of two up to 2**32 (masked vectors travel as uint32).
        timeout: Seconds to wait for replies at each stage. None waits forever: in a deployment a vanished node
            is only counted as dropped once this runs out, so set it there.
    """
    return HardenedSecAggPlusWorkflow(
        num_shares,
        reconstruction_threshold,
        max_weight=max_weight,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        modulus_range=modulus_range,
        timeout=timeout,
    )


def _error_text(err: BaseException) -> str:
    """The client's own error text (Flower wraps an error reply's `Error` in a bare Exception)."""
    reason = getattr(err.args[0], "reason", None) if err.args else None
    return str(reason) if reason is not None else str(err)


def _global_dtypes(context: LegacyContext, count: int) -> list[np.dtype]:
    """Dtypes of the current global model (legacy records keep none), so the aggregate matches it."""
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
    if len(arrays) != count:
        return [np.dtype(np.float64)] * count
    return [array.dtype for array in arrays]


def _unflatten(
    flat: NDArray[np.float64], shapes: list[tuple[int, ...]], dtypes: list[np.dtype]
) -> list[NDArray[np.floating]]:
    arrays, offset = [], 0
    for shape, dtype in zip(shapes, dtypes, strict=True):
        size = math.prod(shape)
        arrays.append(flat[offset : offset + size].reshape(shape).astype(dtype))
        offset += size
    return arrays
