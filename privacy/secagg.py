"""Client side of Flower 1.41's SecAgg+ protocol, hardened: the mod to put in `ClientApp(mods=[...])`.

The protocol, its messages and its primitives (ECDH key agreement, Fernet-encrypted Shamir shares) are Flower's.
What changes, and why:

- Masks come from the full shared secret through HKDF-SHA256 and an AES-256-CTR keystream (`derive_masks`).
  Flower 1.41 XOR-folds every seed to 32 bits and feeds numpy's RandomState (flwr issue #7522), so a mask has at
  most 2**32 possibilities and a curious server can brute-force it. The server side (`server/secagg.py`) uses the
  same `derive_masks` when it removes masks, so both ends must run this module.
- An unmask request that names a node both as active and as dropped, names this node as dropped, repeats a node or
  names a node this client holds no share of, is refused: answering it would hand the server both the private-mask
  seed and the pairwise-mask key of one node, i.e. that node's update in the clear. A refused round is closed for
  good on this client (its shares are wiped), so the server cannot retry with a different list.
- Before masking, the update is checked with `privacy.guard.guard_update` (finite, same shapes as the global model,
  optional L2 clip) and any value the quantiser would have to clip is refused: Flower's quantiser clips to
  `clipping_range` silently and turns NaN into finite garbage that nobody downstream can detect.
- Masked vectors travel as uint32 instead of int64 (half the bytes); addition of uint32 arrays wraps modulo 2**32,
  which is exact for every power-of-two modulus up to 2**32, the only moduli the protocol uses.

The ClientApp must return a model DELTA (new weights minus the global weights it received), not full weights:
deltas are small, so `clipping_range` can be small and the quantisation step with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from logging import DEBUG
from typing import cast

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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

from privacy.guard import UpdateRejected, guard_update

MASK_KDF_INFO = b"fer-fl secagg+ mask v1"
MAX_MODULUS = 2**32
# The quantiser may overshoot `clipping_range` by float rounding after an L2 clip to exactly that range.
_CLIP_TOLERANCE = 1e-6

_zero_block = b""


class UnmaskRequestRefused(ValueError):
    """An unmask request whose answer would let the server remove one node's masks completely."""


def derive_mask_vector(seed: bytes, *, num_range: int, length: int) -> NDArray[np.uint32]:
    """Expands a shared secret into `length` uniform integers in [0, num_range) with a cryptographic generator.

    The whole seed is the HKDF input, so the mask has as much entropy as the secret (Flower 1.41 keeps 32 bits).

    Args:
        seed: The shared secret (a 32-byte private-mask seed, or a Fernet key from ECDH + HKDF).
        num_range: The modulus of the protocol; a power of two no larger than 2**32.
        length: Number of integers wanted.

    Returns:
        A writable uint32 array of `length` values.
    """
    # A reused zero plaintext: allocating 4 fresh bytes per value on every call costs more than the cipher does.
    global _zero_block  # noqa: PLW0603
    _check_modulus(num_range)
    if len(seed) < 16:
        raise ValueError(f"a mask seed needs at least 16 bytes, got {len(seed)}")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MASK_KDF_INFO).derive(seed)
    # Each key is used for exactly one keystream, so a fixed all-zero counter block is safe.
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    num_bytes = 4 * length
    if len(_zero_block) < num_bytes:
        _zero_block = bytes(num_bytes)
    keystream = bytearray(num_bytes + 15)
    encryptor.update_into(memoryview(_zero_block)[:num_bytes], keystream)
    masks = np.frombuffer(keystream, dtype="<u4", count=length)
    if num_range < MAX_MODULUS:
        masks &= np.uint32(num_range - 1)
    return masks


def derive_masks(seed: bytes, *, num_range: int, shapes: Sequence[tuple[int, ...]]) -> list[NDArray[np.uint32]]:
    """`derive_mask_vector` cut into arrays of the given shapes (the drop-in for Flower's `pseudo_rand_gen`)."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = derive_mask_vector(seed, num_range=num_range, length=sum(sizes))
    return _split(flat, shapes)


class SecAggPlusMod:
    """Flower mod running the hardened SecAgg+ client; use `make_secagg_mod` to build one.

    A class rather than a closure so that Ray (simulation) and SuperNodes (deployment) can pickle it.
    """

    def __init__(self, *, max_norm: float | None) -> None:
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a finite positive number, got {max_norm!r}")
        self.max_norm = max_norm

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Answers one SecAgg+ stage; non-train messages pass through untouched."""
        # Adapted from flwr 1.41 `secaggplus_mod` (the dispatcher binds its stage functions by module name, so it
        # cannot be reused): same stage checks and state handling; masking, unmasking and setup checks replaced.
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)

        if RECORD_KEY_STATE not in ctxt.state.config_records:
            ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord({})
        state = SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        check_stage(state.current_stage, configs)
        state.current_stage = cast(str, configs.pop(Key.STAGE))
        check_configs(state.current_stage, configs)

        out_content = RecordDict()
        if state.current_stage == Stage.SETUP:
            state.nid = msg.metadata.dst_node_id
            res = _setup(state, configs)
            self._check_setup(state)
        elif state.current_stage == Stage.SHARE_KEYS:
            res = _share_keys(state, configs)
        elif state.current_stage == Stage.COLLECT_MASKED_VECTORS:
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
            except UnmaskRequestRefused:
                _close_round(state)
                ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
                raise
            res = _unmask(state, configs)
        else:
            raise ValueError(f"Unknown SecAgg+ stage: {state.current_stage}")

        ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
        out_content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res, False)
        return Message(out_content, reply_to=msg)

    def _check_setup(self, state: SecAggPlusState) -> None:
        _check_modulus(state.mod_range)
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


def make_secagg_mod(*, max_norm: float | None = None) -> SecAggPlusMod:
    """Builds the hardened SecAgg+ client mod for `ClientApp(client_fn=..., mods=[mod])`.

    Args:
        max_norm: When set, every update is scaled to an L2 norm of at most this value before masking (and setup
            is refused if it exceeds the server's `clipping_range`). When None the update is validated only, and a
            value the quantiser would clip makes the client refuse to send.

    Returns:
        A picklable mod. The wrapped app's `fit` must return a model delta of the global model's shapes.
    """
    return SecAggPlusMod(max_norm=max_norm)


# Validation only: for apps that clip in their own `fit` (e.g. through `guard_update` or DP-SGD).
secure_aggregation_mod = make_secagg_mod()


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


def _close_round(state: SecAggPlusState) -> None:
    """Wipes the shares and moves to the last stage, so only a fresh setup is accepted next."""
    state.current_stage = Stage.UNMASK
    state.rd_seed_share_dict = {}
    state.sk1_share_dict = {}


def _check_modulus(num_range: int) -> None:
    if not 2 <= num_range <= MAX_MODULUS or num_range & (num_range - 1):
        raise ValueError(f"the SecAgg+ modulus must be a power of two in [2, 2**32], got {num_range}")


def _global_shapes(msg: Message) -> list[tuple[int, ...]]:
    """Shapes of the global model in the fit instruction (the legacy Array records carry no shape metadata)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    return [array.shape for array in parameters_to_ndarrays(fitins.parameters)]


def _split(flat: NDArray[np.uint32], shapes: Sequence[tuple[int, ...]]) -> list[NDArray[np.uint32]]:
    arrays, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        arrays.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return arrays


def quantize_weighted(
    update: Sequence[NDArray[np.floating]], *, weight: float, clipping_range: float, quantization_range: int
) -> NDArray[np.uint32]:
    """Maps `weight * update` from [-clipping_range, clipping_range] to integers in [0, quantization_range].

    Stochastic rounding keeps the quantisation unbiased, as Flower's does. Unlike Flower's, nothing is clipped: a
    value outside the range is refused.

    Raises:
        UpdateRejected: if a weighted value lies outside [-clipping_range, clipping_range].
    """
    total = sum(array.size for array in update)
    scaled = np.empty(total, dtype=np.float64)
    offset = 0
    for array in update:
        np.multiply(array.reshape(-1), weight, out=scaled[offset : offset + array.size])
        offset += array.size
    peak = float(np.abs(scaled).max()) if total else 0.0
    if peak > clipping_range * (1 + _CLIP_TOLERANCE):
        raise UpdateRejected(
            f"update value {peak / weight:.6g} (weighted {peak:.6g}) exceeds the SecAgg+ clipping_range "
            f"{clipping_range}; clip the update (max_norm <= clipping_range) before secure aggregation"
        )
    np.clip(scaled, -clipping_range, clipping_range, out=scaled)
    scaled += clipping_range
    scaled *= quantization_range / (2 * clipping_range)
    scaled += np.random.default_rng().random(total)
    np.floor(scaled, out=scaled)
    return scaled.astype(np.uint32)


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
    vector[1:] = quantize_weighted(
        update,
        weight=q_ratio / state.target_range,
        clipping_range=state.clipping_range,
        quantization_range=state.target_range,
    )

    vector += derive_mask_vector(state.rd_seed, num_range=state.mod_range, length=vector.size)
    own_key = bytes_to_private_key(state.sk1)
    for node_id in available_clients:
        shared_key = generate_shared_key(own_key, bytes_to_public_key(state.public_keys_dict[node_id][0]))
        pairwise_mask = derive_mask_vector(shared_key, num_range=state.mod_range, length=vector.size)
        if state.nid > node_id:
            vector += pairwise_mask
        else:
            vector -= pairwise_mask
    if state.mod_range < MAX_MODULUS:
        vector &= np.uint32(state.mod_range - 1)

    shapes = [(1,)] + [array.shape for array in update]
    log(DEBUG, "Node %d: stage 2 completed, uploading masked parameters...", state.nid)
    return {Key.MASKED_PARAMETERS: [ndarray_to_bytes(array) for array in _split(vector, shapes)]}

