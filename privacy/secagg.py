"""Client side of Flower 1.41's SecAgg+ protocol, hardened: the mod to put in `ClientApp(mods=[...])`.

The protocol, its messages and its primitives (ECDH key agreement, Fernet-encrypted Shamir shares) are Flower's.
What changes, and why:

- Masks come from the full shared secret through HKDF-SHA256 and an AES-256-CTR keystream (`apply_masks`).
  Flower 1.41 XOR-folds every seed to 32 bits and feeds numpy's RandomState (flwr issue #7522), so a mask has at
  most 2**32 possibilities and a curious server can brute-force it. The server side (`server/secagg.py`) uses the
  same `apply_masks` when it removes masks, so both ends must run the same `privacy.secagg_masks`.
- An unmask request that names a node both as active and as dropped, names this node as dropped, repeats a node or
  names a node this client holds no share of, is refused: answering it would hand the server both the private-mask
  seed and the pairwise-mask key of one node, i.e. that node's update in the clear. A refused round is closed for
  good on this client (its shares are wiped), so the server cannot retry with a different list.
- The server's share count and threshold are checked (`SecAggPlusMod._check_setup`): the threshold must exceed
  half the shares, or a server could send different unmask lists to the two halves of a node's share holders and
  rebuild both its private-mask seed and its pairwise-mask key; a site can raise the floor (`secagg-min-threshold`).
- Each node signs its SecAgg+ public keys with its enrolled node key, and a node that pins the coordinator's roster
  (`secagg-roster`) refuses neighbours whose keys no distinct roster member signed (`privacy.secagg_identity`).
- A node contributes at most one masked vector per round identity (the round number and the global weights):
  a repeated round is declined, so two sums can never differ by one node's replayed update (`RoundAlreadyMasked`).
- Before masking, the update is checked with `privacy.guard.guard_update` (finite, same shapes as the global model,
  optional L2 clip) and any value the quantiser would have to clip is refused: Flower's quantiser clips to
  `clipping_range` silently and turns NaN into finite garbage that nobody downstream can detect.
- Masked vectors travel as uint32 instead of int64 (half the bytes); addition of uint32 arrays wraps modulo 2**32,
  which is exact for every power-of-two modulus up to 2**32, the only moduli the protocol uses.
- The first secret key is Shamir-shared as its 48-byte scalar rather than its 306-byte PEM text (4 chunks instead
  of 20 for PyCryptodome's pure-Python field arithmetic); `decode_secret_key` turns it back into a key.

The arithmetic both ends share (masks, quantiser) is in `privacy.secagg_masks`, the record of the rounds this node
masked in `privacy.secagg_contributions`, the signed keys and the roster in `privacy.secagg_identity`.

The ClientApp must return a model DELTA (new weights minus the global weights it received), not full weights:
deltas are small, so `clipping_range` can be small and the quantisation step with it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from logging import DEBUG
from pathlib import Path
from typing import cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.app.typing import ConfigRecordValues
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _setup,
    _share_keys,
    _unmask,
    check_configs,
    check_stage,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore import log
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key
from numpy.typing import NDArray

from privacy.guard import guard_update
from privacy.secagg_contributions import _record_contribution, round_identity
from privacy.secagg_identity import (
    ATTESTATION_KEY,
    ATTESTATIONS_KEY,
    KeyAttestation,
    load_roster,
    sign_keys,
    verify_neighbour_keys,
)
from privacy.secagg_masks import MAX_MODULUS, _check_modulus, _quantize_into, _split, apply_masks

# Flower's key pairs are SECP384R1 (flwr.supercore.primitives.asymmetric.generate_key_pairs).
_SCALAR_BYTES = 48
# The smallest threshold Flower's protocol allows; a site raises its own floor with `secagg-min-threshold`.
DEFAULT_MIN_THRESHOLD = 2


class UnmaskRequestRefused(ValueError):
    """An unmask request whose answer would let the server remove one node's masks completely."""


class UnsafeSecAggSetup(ValueError):
    """The server's SecAgg+ parameters would let it rebuild one node's update."""


class SecureAggregationRequired(PermissionError):
    """The node requires SecAgg+ and was asked for an update outside it."""


@dataclass(frozen=True)
class SecAggNodeOptions:
    """What a site's operator set for this mod, parsed from its node config by the client layer
    (client/node_config.py `NodeSettings.secagg_options`; privacy/ does not read node-config keys).

    Attributes:
        require_secure_agg: refuse any train message outside SecAgg+.
        min_threshold: the site's threshold floor (at least the protocol's 2).
        node_key: the node's enrolled private key; it signs the node's SecAgg+ keys.
        roster: the pinned roster; neighbours' keys must be signed by distinct members.
        state_dir: where the round identities this node masked for are kept across runs (None: this run only).
    """

    require_secure_agg: bool = False
    min_threshold: int = DEFAULT_MIN_THRESHOLD
    node_key: Path | None = None
    roster: Path | None = None
    state_dir: Path | None = None


class SecAggPlusMod:
    """Flower mod running the hardened SecAgg+ client; use `make_secagg_mod` to build one.

    A class rather than a closure so that Ray (simulation) and SuperNodes (deployment) can pickle it.
    """

    def __init__(self, *, max_norm: float | None, node_options: Callable[[Context], SecAggNodeOptions]) -> None:
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a finite positive number, got {max_norm!r}")
        self.max_norm = max_norm
        self.node_options = node_options

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Answers one SecAgg+ stage; non-train messages pass through untouched.

        A plain (non-SecAgg) train message passes through too, so one ClientApp serves every run mode, unless the
        node's operator set `require-secure-agg` in its node config: then the node refuses to send any update the
        server could see individually, whatever the coordinator configured.
        """
        # Adapted from flwr 1.41 `secaggplus_mod` (the dispatcher binds its stage functions by module name, so it
        # cannot be reused): same stage checks and state handling; masking, unmasking and setup checks replaced.
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        options = self.node_options(ctxt)
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            if options.require_secure_agg:
                raise SecureAggregationRequired(
                    "this node requires secure aggregation (require-secure-agg) and the server asked for a plain "
                    "update; refusing to train"
                )
            return call_next(msg, ctxt)

        if RECORD_KEY_STATE not in ctxt.state.config_records:
            ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord({})
        state = SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        check_stage(state.current_stage, configs)
        state.current_stage = cast(str, configs.pop(Key.STAGE))
        # Our own addition to Flower's share-keys record; Flower's check wants [pk1, pk2] pairs only.
        attestations = configs.pop(ATTESTATIONS_KEY, None)
        check_configs(state.current_stage, configs)

        out_content = RecordDict()
        if state.current_stage == Stage.SETUP:
            state.nid = msg.metadata.dst_node_id
            res = _setup(state, configs)
            self._check_setup(state, min_threshold=options.min_threshold)
            if options.node_key is not None:
                attestation = sign_keys(
                    options.node_key, run_id=msg.metadata.run_id,
                    group_id=msg.metadata.group_id, node_id=state.nid, pk1=state.pk1, pk2=state.pk2,
                )
                res[ATTESTATION_KEY] = attestation.to_json()
        elif state.current_stage == Stage.SHARE_KEYS:
            if options.roster is not None:
                _check_neighbour_keys(msg, configs, attestations, roster_file=options.roster, own_node_id=state.nid)
            res = _share_keys_compact(state, configs)
        elif state.current_stage == Stage.COLLECT_MASKED_VECTORS:
            # Before training: a declined repeat costs this node nothing (no training, no privacy spend).
            _record_contribution(ctxt, round_identity(msg), state_dir=options.state_dir)
            global_shapes = _global_shapes(msg)
            out_content = call_next(msg, ctxt).content
            fitres = compat.recorddict_to_fitres(out_content, keep_input=True)
            update, _ = guard_update(
                parameters_to_ndarrays(fitres.parameters), reference_shapes=global_shapes, max_norm=self.max_norm
            )
            res = _collect_masked_vectors(state, configs, fitres.num_examples, update)
            for arr_record in out_content.array_records.values():
                arr_record.clear()
        elif state.current_stage == Stage.UNMASK:
            try:
                check_unmask_request(state, configs)
                res = _unmask(state, configs)
            except Exception:
                # One answer per round at most: after a refusal the server must start a new round from setup.
                _close_round(state)
                ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
                raise
        else:
            raise ValueError(f"Unknown SecAgg+ stage: {state.current_stage}")

        ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
        out_content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res, False)
        return Message(out_content, reply_to=msg)

    def _check_setup(self, state: SecAggPlusState, *, min_threshold: int = DEFAULT_MIN_THRESHOLD) -> None:
        _check_modulus(state.mod_range)
        if 2 * state.threshold <= state.share_num:
            # Two disjoint halves of the share holders could each hand over `threshold` shares: one half the
            # private-mask seed ("this node is active"), the other the pairwise-mask key ("it dropped").
            raise UnsafeSecAggSetup(
                f"SecAgg+ setup refused: threshold {state.threshold} is not more than half of {state.share_num} "
                "shares, so the server could rebuild one node's masks from two different unmask lists"
            )
        if state.threshold < min_threshold:
            raise UnsafeSecAggSetup(
                f"SecAgg+ setup refused: threshold {state.threshold} is below this site's floor {min_threshold} "
                "(secagg-min-threshold)"
            )
        if state.sample_num * state.target_range >= state.mod_range:
            # The sum of `sample_num` quantised vectors would wrap around the modulus and decode to garbage.
            raise ValueError(
                f"SecAgg+ setup refused: {state.sample_num} clients x quantization range {state.target_range} "
                f"overflows modulus {state.mod_range}"
            )
        if self.max_norm is not None and self.max_norm > state.clipping_range:
            raise ValueError(
                f"SecAgg+ setup refused: max_norm {self.max_norm} exceeds the server's clipping_range "
                f"{state.clipping_range}, so a clipped update could still be cut by the quantiser"
            )


def make_secagg_mod(
    *, max_norm: float | None = None, node_options: Callable[[Context], SecAggNodeOptions]
) -> SecAggPlusMod:
    """Builds the hardened SecAgg+ client mod for `ClientApp(client_fn=..., mods=[mod])`.

    Args:
        max_norm: When set, every update is scaled to an L2 norm of at most this value before masking (and setup
            is refused if it exceeds the server's `clipping_range`). When None the update is validated only, and a
            value the quantiser would clip makes the client refuse to send.
        node_options: reads the site's options from a message's Context (`client.node_config.secagg_options`);
            a picklable, module-level function.

    Returns:
        A picklable mod. The wrapped app's `fit` must return a model delta of the global model's shapes.
    """
    return SecAggPlusMod(max_norm=max_norm, node_options=node_options)


def check_unmask_request(state: SecAggPlusState, configs: ConfigRecord) -> None:
    """Refuses an unmask request that could reveal one node's masks in full (fix (b) of issue 5).

    Raises:
        UnmaskRequestRefused: naming the offending nodes.
    """
    active = cast(list[int], configs[Key.ACTIVE_NODE_ID_LIST])
    dropped = cast(list[int], configs[Key.DEAD_NODE_ID_LIST])
    prefix = f"Node {state.nid} refuses the unmask request:"
    both = sorted(set(active) & set(dropped))
    if both:
        raise UnmaskRequestRefused(f"{prefix} node(s) {both} listed both as active and as dropped")
    if len(set(active)) != len(active) or len(set(dropped)) != len(dropped):
        raise UnmaskRequestRefused(f"{prefix} a node is listed twice")
    if state.nid in dropped:
        raise UnmaskRequestRefused(f"{prefix} it is listed as dropped while it is answering")
    unknown = sorted(set(active + dropped) - set(state.rd_seed_share_dict))
    if unknown:
        raise UnmaskRequestRefused(f"{prefix} it holds no shares of node(s) {unknown}")


def _share_keys_compact(state: SecAggPlusState, configs: ConfigRecord) -> dict[str, ConfigRecordValues]:
    """Flower's key-sharing stage, Shamir-sharing the first secret key as its 48-byte scalar instead of as PEM.

    Flower 1.41 shares the 306-byte PEM text: 20 Shamir chunks, whose pure-Python GF(2^128) arithmetic costs 31 ms
    per client to split and 200 ms per dropped node to rebuild at 10 clients (4 chunks: 5 ms and 21 ms). In 1.41
    `_share_keys` reads `state.sk1` only to create those shares, so it runs on the scalar and the PEM is put back.
    """
    pem = state.sk1
    state.sk1 = bytes_to_private_key(pem).private_numbers().private_value.to_bytes(_SCALAR_BYTES, "big")
    try:
        return _share_keys(state, configs)
    finally:
        state.sk1 = pem


def decode_secret_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """The first secret key of a node, from the scalar its key shares rebuild (see `_share_keys_compact`)."""
    if len(scalar) != _SCALAR_BYTES:
        raise ValueError(f"a rebuilt SECP384R1 secret key has {_SCALAR_BYTES} bytes, got {len(scalar)}")
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1())


def _check_neighbour_keys(
    msg: Message, configs: ConfigRecord, attestations: object, *, roster_file: Path, own_node_id: int
) -> None:
    """Refuses the share-keys stage unless every neighbour's keys are signed by a distinct pinned roster member."""
    roster = load_roster(roster_file)
    public_keys = {int(nid): (pair[0], pair[1]) for nid, pair in configs.items()}
    parsed: dict[int, KeyAttestation] = {}
    if isinstance(attestations, list):
        for blob in attestations:
            if isinstance(blob, bytes):
                attestation = KeyAttestation.from_json(blob)
                parsed[attestation.node_id] = attestation
    verify_neighbour_keys(
        roster=roster, public_keys=public_keys, attestations=parsed, own_node_id=own_node_id,
        run_id=msg.metadata.run_id, group_id=msg.metadata.group_id,
    )


def _close_round(state: SecAggPlusState) -> None:
    """Wipes the shares and moves to the last stage, so only a fresh setup is accepted next."""
    state.current_stage = Stage.UNMASK
    state.rd_seed_share_dict = {}
    state.sk1_share_dict = {}


def _global_shapes(msg: Message) -> list[tuple[int, ...]]:
    """Shapes of the global model in the fit instruction, read from the .npy headers without loading the data.

    The legacy ArrayRecord carries no shape metadata, and decoding 1.2 M floats per client just for shapes shows
    in the round time.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    shapes = []
    for tensor in fitins.parameters.tensors:
        header = io.BytesIO(tensor[:4096])
        if np.lib.format.read_magic(header) == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(header)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(header)
        shapes.append(tuple(shape))
    return shapes


def _collect_masked_vectors(
    state: SecAggPlusState,
    configs: ConfigRecord,
    num_examples: int,
    update: list[NDArray[np.floating]],
) -> dict[str, ConfigRecordValues]:
    log(DEBUG, "Node %d: starting stage 2...", state.nid)
    # Copied from flwr 1.41 `secaggplus_mod._collect_masked_vectors`: decrypt, verify and store the key shares.
    available_clients: list[int] = []
    ciphertexts = cast(list[bytes], configs[Key.CIPHERTEXT_LIST])
    srcs = cast(list[int], configs[Key.SOURCE_LIST])
    if len(ciphertexts) + 1 < state.threshold:
        raise ValueError("Not enough available neighbour clients.")
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        shared_key = state.ss2_dict[src]
        plaintext = decrypt(shared_key, ciphertext)
        actual_src, dst, rd_seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
        available_clients.append(src)
        if src != actual_src:
            raise ValueError(f"Node {state.nid}: received ciphertext from {actual_src} instead of {src}.")
        if dst != state.nid:
            raise ValueError(f"Node {state.nid}: received an encrypted message for Node {dst} from Node {src}.")
        state.rd_seed_share_dict[src] = rd_seed_share
        state.sk1_share_dict[src] = sk1_share
    # End of the copy.

    if not 0 < num_examples <= state.max_weight:
        # Flower only warns; a weight above max_weight can overflow the modulus and corrupt everyone's aggregate.
        raise ValueError(f"num_examples {num_examples} must lie in (0, max_weight={state.max_weight}]")
    q_ratio = round(num_examples / state.max_weight * state.target_range)
    if q_ratio == 0:
        raise ValueError(f"num_examples {num_examples} rounds to weight 0 with max_weight {state.max_weight}")
    vector = np.empty(1 + sum(array.size for array in update), dtype=np.uint32)
    vector[0] = q_ratio
    _quantize_into(
        vector[1:],
        update,
        weight=q_ratio / state.target_range,
        clipping_range=state.clipping_range,
        quantization_range=state.target_range,
    )

    own_key = bytes_to_private_key(state.sk1)
    masks = [(state.rd_seed, False)]
    for node_id in available_clients:
        shared_key = generate_shared_key(own_key, bytes_to_public_key(state.public_keys_dict[node_id][0]))
        # The higher node ID adds the pairwise mask and the lower subtracts it, so the pair cancels in the sum.
        masks.append((shared_key, state.nid < node_id))
    apply_masks(vector, masks, num_range=state.mod_range)
    if state.mod_range < MAX_MODULUS:
        vector &= np.uint32(state.mod_range - 1)

    shapes = [(1,)] + [array.shape for array in update]
    log(DEBUG, "Node %d: stage 2 completed, uploading masked parameters...", state.nid)
    return {Key.MASKED_PARAMETERS: [ndarray_to_bytes(array) for array in _split(vector, shapes)]}

