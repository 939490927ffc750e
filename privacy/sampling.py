"""The Poisson loader: Opacus's DP data loader at exactly the charged sample rate and steps, optionally drawing
from the secure generator (`privacy.noise`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from opacus.data_loader import DPDataLoader, wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from privacy.noise import _SecureRandom


class _PoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson batch sampler with a fixed number of steps and an optional CSPRNG."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, secure_random: _SecureRandom | None):
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self._secure_random = secure_random

    def __iter__(self) -> Iterator[list[int]]:
        if self._secure_random is None:
            yield from super().__iter__()
            return
        for _ in range(self.steps):
            mask = self._secure_random.uniform(self.num_samples) < self.sample_rate
            yield np.flatnonzero(mask).tolist()


class _PoissonDataLoader(DPDataLoader):
    """A :class:`DPDataLoader` at exactly the charged rate q and steps per epoch."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        steps: int,
        secure_random: _SecureRandom | None,
        num_workers: int = 0,
    ) -> None:
        # DPDataLoader.__init__ would pick steps = int(1/q) and torch's generator; both are fixed here.
        self.sample_rate = sample_rate
        self.distributed = False
        sampler = _PoissonSampler(
            num_samples=len(dataset), sample_rate=sample_rate, steps=steps, secure_random=secure_random
        )
        first = dataset[0]
        DataLoader.__init__(
            self,
            dataset=dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=wrap_collate_with_empty(
                collate_fn=default_collate,
                batch_first=True,
                rand_on_empty=False,
                sample_empty_shapes=[(0, *getattr(x, "shape", ())) for x in first],
                dtypes=[getattr(x, "dtype", type(x)) for x in first],
            ),
        )
