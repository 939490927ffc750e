"""The secure generator: ChaCha20 keyed from the OS, for a deployed node's DP noise and Poisson sampling.

Opacus 1.6's own ``secure_mode`` needs ``torchcsprng`` (archived; last release 0.2.1 of March 2021, and pip
finds no distribution of it for Python 3.11 / torch 2.x), so ``PrivacyEngine(secure_mode=True)`` raises
ImportError here. ``DPSettings(secure_mode=True)``
instead draws both the Poisson sampling and the noise from ChaCha20 (``cryptography``, keyed from
``os.urandom``) and keeps Opacus's defence against floating-point attacks (each noise value is the sum
of four Gaussians over two, Holohan et al. 2021, §5.1). Deployed nodes always use it
(``client/dp_training.py``): the coordinator picks the run's seed, so noise derived from it would be noise the
coordinator can regenerate and subtract. Simulations keep torch's seeded generator (reproducible runs), and
``privacy.json`` says so.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed


class _SecureRandom:
    """ChaCha20 keystream (256-bit key and nonce from ``os.urandom``) turned into uniforms and Gaussians.

    What a deployed node's noise and Poisson sampling draw from, so that nobody who knows the run configuration
    (the coordinator) can reproduce them. Opacus's own ``secure_mode`` would do the same with ``torchcsprng``,
    which does not install here (see the module docstring); torch's CPU generator is Mersenne Twister, not a
    CSPRNG (its state follows from 624 outputs, its seed has 64 bits), so seeding it from the OS is not enough.

    The Gaussians follow Opacus's ``secure_mode`` recipe: float32 Box-Muller (as ``torch.normal`` for float32;
    23-bit uniforms here), each noise value the sum of four of them over two against
    floating-point attacks (Holohan et al. 2021, §5.1). The keystream goes into buffers kept between steps and
    the arithmetic runs in place in float32: 1.2 M noise values (CNN-AM) cost about what torch's own generator
    needs for the same four Gaussians (18-46 ms against 37-49 ms on the loaded project machine), where the first
    version (float64, fresh buffers) took ~160 ms on a quiet one (benchmarks/bench_models.py).
    """

    _REKEY_BYTES = 1 << 30
    _CHUNK = 1 << 15  # noise values drawn per pass (see gaussian_like)

    def __init__(self) -> None:
        self._rekey()

    def _rekey(self) -> None:
        # cryptography's 16-byte ChaCha20 nonce is RFC 7539's 32-bit block counter (little-endian) then a 96-bit
        # nonce. A random counter overflows after as few as one block (ValueError mid-step, seen in CI: a node
        # crashing 1 key in ~256 before its 1 GiB rekey); starting at 0 leaves 2^32 blocks (256 GiB) per key.
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(4) + os.urandom(12)), mode=None)
        self._stream = cipher.encryptor()
        self._used = 0
        self._zeros = bytearray()
        self._out = bytearray()

    def _keystream(self, count: int) -> bytearray:
        """The next `count` keystream bytes, at the start of a buffer that the next call overwrites."""
        if self._used + count > self._REKEY_BYTES:
            self._rekey()
        self._used += count
        # The buffers are kept between steps: fresh ones cost a page fault per 4 KiB, every step (measured: most of
        # the keystream's time on a loaded machine). update_into wants room for one block beyond the data.
        if len(self._zeros) < count:
            self._zeros, self._out = bytearray(count), bytearray(count + 15)
        self._stream.update_into(memoryview(self._zeros)[:count], self._out)
        return self._out

    def uniform(self, count: int) -> np.ndarray:
        """``count`` float64 uniforms in the open interval (0, 1), 53 random bits each."""
        words = np.frombuffer(self._keystream(8 * count), dtype=np.uint64, count=count)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def normal(self, count: int) -> np.ndarray:
        """``count`` standard normal float32 values (Box-Muller on 23-bit uniforms in (0, 1)).

        numpy, in place, on purpose: its float32 log/cos/sin are SIMD and single-threaded, so the cost stays that
        of torch's own generator whatever the thread count and load (measured at load ~20: 18 ms here and 37 ms
        for ``torch.normal`` with 2 threads, where the same Box-Muller in torch ops took 223 ms).
        """
        pairs = (count + 1) // 2
        words = np.frombuffer(self._keystream(8 * pairs), dtype=np.uint32, count=2 * pairs)
        # Uniforms without an int-to-float conversion: 23 random mantissa bits under exponent 0 give 1 + k/2^23 in
        # [1, 2); subtracting 1 - 2^-24 (exact) gives (2k + 1)/2^24 in (0, 1), never 0 for the log.
        words &= np.uint32(0x007FFFFF)
        words |= np.uint32(0x3F800000)
        uniforms = words.view(np.float32)
        uniforms -= np.float32(1.0 - 2.0**-24)
        radius, angle = uniforms[:pairs], uniforms[pairs:]
        np.log(radius, out=radius)
        radius *= np.float32(-2.0)
        np.sqrt(radius, out=radius)
        angle *= np.float32(2.0 * math.pi)
        out = np.empty(2 * pairs, dtype=np.float32)
        np.cos(angle, out=out[:pairs])
        np.sin(angle, out=out[pairs:])
        out[:pairs] *= radius
        out[pairs:] *= radius
        return out[:count]

    def gaussian_like(self, reference: torch.Tensor, *, std: float) -> torch.Tensor:
        """N(0, std²) noise shaped like ``reference``, as the sum of four Gaussians over two.

        Drawn in chunks whose four Gaussians (~1 MiB of keystream and floats) stay in cache: 18 ms instead of 28 ms
        for CNN-AM's 1.2 M values, measured back to back.
        """
        count = reference.numel()
        values = np.empty(count, dtype=np.float32)
        for start in range(0, count, self._CHUNK):
            size = min(self._CHUNK, count - start)
            four = self.normal(4 * size).reshape(4, size)
            chunk = values[start : start + size]
            np.add(four[0], four[1], out=chunk)
            chunk += four[2]
            chunk += four[3]
        values *= np.float32(std / 2.0)
        return torch.from_numpy(values).to(dtype=reference.dtype, device=reference.device).view(reference.shape)


def _secure_optimizer_class(base: type) -> type:
    class SecureNoiseOptimizer(base):  # type: ignore[misc, valid-type]
        """Opacus optimizer whose Gaussian noise comes from a CSPRNG."""

        secure_random: _SecureRandom

        def add_noise(self) -> None:
            multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = self.secure_random.gaussian_like(p.summed_grad, std=multiplier * self.max_grad_norm)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    SecureNoiseOptimizer.__name__ = f"Secure{base.__name__}"
    return SecureNoiseOptimizer
