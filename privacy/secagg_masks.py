"""The arithmetic both ends of the hardened SecAgg+ share: masks from the whole secret, and the exact quantiser.

A mask is the AES-256-CTR keystream of an HKDF-SHA256 key derived from the whole shared secret (Flower 1.41 folds
every seed to 32 bits, flwr issue #7522); the client mod (`privacy.secagg`) adds masks with `apply_masks` and the
server's workflow (`server.secagg`) removes them with the same function, so both ends must run this module. The
quantiser maps a weighted update to integers with stochastic rounding and refuses, rather than clips, a value
outside the clipping range. Masked vectors are uint32: their sums wrap modulo 2**32, exact for every power-of-two
modulus up to 2**32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from privacy.guard import UpdateRejected

MASK_KDF_INFO = b"fer-fl secagg+ mask v1"
_DITHER_KDF_INFO = b"fer-fl secagg+ dither v1"
MAX_MODULUS = 2**32
# An update L2-clipped to exactly `clipping_range` may overshoot it by float rounding (float32 norms).
_CLIP_TOLERANCE = 1e-5

# Values per step of the streamed mask and quantiser: 256-512 KiB buffers stay in cache, where whole-vector
# temporaries (10 MB for 1.2 M values) cost more in page faults and memory traffic than the arithmetic itself.
_CHUNK = 1 << 16
_ZERO_CHUNK = bytes(4 * _CHUNK)


def apply_masks(vector: NDArray[np.uint32], masks: Sequence[tuple[bytes, bool]], *, num_range: int) -> None:
    """Adds (or subtracts) the mask of each seed to `vector` in place, modulo 2**32.

    A seed's mask is HKDF-SHA256(seed) used as an AES-256-CTR key, its keystream read as little-endian uint32
    values reduced modulo `num_range`. The whole seed is the HKDF input, so the mask has as much entropy as the
    secret (Flower 1.41 keeps 32 bits of it). All keystreams are streamed together, one cache-sized slice of the
    vector at a time, so the vector crosses memory once however many masks there are.

    Args:
        vector: The 1-D uint32 vector to mask or unmask.
        masks: (seed, subtract) pairs: the shared secret (a 32-byte private-mask seed, or a Fernet key from ECDH +
            HKDF) and whether its mask is removed rather than added.
        num_range: The protocol's modulus; a power of two no larger than 2**32.
    """
    _check_modulus(num_range)
    if vector.dtype != np.uint32 or vector.ndim != 1:
        raise TypeError(f"masks apply to a 1-D uint32 vector, got {vector.ndim}-D {vector.dtype}")
    streams = [(_keystream(seed, info=MASK_KDF_INFO), subtract) for seed, subtract in masks]
    keystream = bytearray(4 * _CHUNK + 15)
    reduce = np.uint32(num_range - 1) if num_range < MAX_MODULUS else None
    for start in range(0, vector.size, _CHUNK):
        count = min(_CHUNK, vector.size - start)
        segment = vector[start : start + count]
        for encryptor, subtract in streams:
            encryptor.update_into(memoryview(_ZERO_CHUNK)[: 4 * count], keystream)
            mask = np.frombuffer(keystream, dtype="<u4", count=count)
            if reduce is not None:
                mask &= reduce
            (np.subtract if subtract else np.add)(segment, mask, out=segment)


def apply_mask(vector: NDArray[np.uint32], seed: bytes, *, num_range: int, subtract: bool = False) -> None:
    """`apply_masks` for one seed."""
    apply_masks(vector, [(seed, subtract)], num_range=num_range)


def _keystream(seed: bytes, *, info: bytes) -> CipherContext:
    if len(seed) < 16:
        raise ValueError(f"a mask seed needs at least 16 bytes, got {len(seed)}")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)
    # Each key drives exactly one keystream, so a fixed all-zero counter block is safe.
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


def derive_mask_vector(seed: bytes, *, num_range: int, length: int) -> NDArray[np.uint32]:
    """The mask `apply_mask` adds: `length` uniform integers in [0, num_range) from the whole secret."""
    mask = np.zeros(length, dtype=np.uint32)
    apply_mask(mask, seed, num_range=num_range)
    return mask


def derive_masks(seed: bytes, *, num_range: int, shapes: Sequence[tuple[int, ...]]) -> list[NDArray[np.uint32]]:
    """`derive_mask_vector` cut into arrays of the given shapes (the drop-in for Flower's `pseudo_rand_gen`)."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = derive_mask_vector(seed, num_range=num_range, length=sum(sizes))
    return _split(flat, shapes)


def _check_modulus(num_range: int) -> None:
    if not 2 <= num_range <= MAX_MODULUS or num_range & (num_range - 1):
        raise ValueError(f"the SecAgg+ modulus must be a power of two in [2, 2**32], got {num_range}")


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
    levels = np.empty(sum(array.size for array in update), dtype=np.uint32)
    _quantize_into(levels, update, weight=weight, clipping_range=clipping_range, quantization_range=quantization_range)
    return levels


def _quantize_into(
    out: NDArray[np.uint32],
    update: Sequence[NDArray[np.floating]],
    *,
    weight: float,
    clipping_range: float,
    quantization_range: int,
) -> None:
    # (w x + c) * T / 2c in float64: at T = 2**24 float32 has no fractional bits left for stochastic rounding.
    factor = weight * quantization_range / (2 * clipping_range)
    half_range = quantization_range / 2
    limit = half_range * (1 + _CLIP_TOLERANCE)
    # Dither for the stochastic rounding from an AES-CTR keystream under a fresh random key: 3x faster than
    # numpy's PCG64 doubles, and unpredictable, which the rounding needs only to stay unbiased.
    dither = _keystream(os.urandom(32), info=_DITHER_KDF_INFO)
    dither_bytes = bytearray(4 * _CHUNK + 15)
    levels_buffer = np.empty(_CHUNK, dtype=np.float64)
    noise_buffer = np.empty(_CHUNK, dtype=np.float64)
    offset = 0
    for array in update:
        flat = array.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            count = min(_CHUNK, flat.size - start)
            levels, noise = levels_buffer[:count], noise_buffer[:count]
            np.multiply(flat[start : start + count], factor, out=levels)
            peak = max(float(levels.max()), -float(levels.min()))
            if peak > limit:
                raise UpdateRejected(
                    f"update value {peak / factor:.6g} (weighted {peak / factor * weight:.6g}) exceeds the SecAgg+ "
                    f"clipping_range {clipping_range}; clip the update (max_norm <= clipping_range) before secure "
                    "aggregation"
                )
            if peak > half_range:
                np.clip(levels, -half_range, half_range, out=levels)  # float rounding only, within the tolerance
            levels += half_range
            # Adding U[0, 1) and truncating (every value is >= 0) rounds up with probability equal to the fraction.
            dither.update_into(memoryview(_ZERO_CHUNK)[: 4 * count], dither_bytes)
            np.multiply(np.frombuffer(dither_bytes, dtype="<u4", count=count), 2.0**-32, out=noise)
            levels += noise
            np.copyto(out[offset : offset + count], levels, casting="unsafe")
            offset += count
