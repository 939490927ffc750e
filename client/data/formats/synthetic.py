"""Synthetic faces (`synthetic` or `synthetic=N`): generated in memory by `client.data.synthetic`, no files."""

from __future__ import annotations

from collections import Counter

import numpy as np

from client.data.formats.audit import _blank_kind, _digest, _finish, _LoadProblems, _SplitContent
from client.data.formats.dataset import DatasetError, FERDataset

SYNTHETIC_DEFAULT_TRAIN = 3500


def _load_synthetic(arg: str | None, *, image_size: int, seed: int) -> FERDataset:
    if arg is None:
        n_train = SYNTHETIC_DEFAULT_TRAIN
    else:
        if not arg.isdigit() or int(arg) < 5:
            raise DatasetError(f"synthetic={arg}: N must be an integer >= 5 (N training faces, N//5 test faces)")
        n_train = int(arg)
    from client.data.synthetic import make_synthetic

    # The test faces come from their own seed stream, so they are never copies of training faces.
    test_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    contents: dict[str, _SplitContent] = {}
    for split, n, split_seed in (("train", n_train, seed), ("test", n_train // 5, test_seed)):
        images, labels = make_synthetic(n, seed=split_seed, image_size=image_size)
        images = np.ascontiguousarray(images, dtype=np.uint8)
        contents[split] = _SplitContent(images=images, labels=np.asarray(labels, dtype=np.int64),
                                        sources=[f"synthetic:{i}" for i in range(n)],
                                        digests=[_digest(im) for im in images],
                                        blank=[_blank_kind(im) for im in images])
    sizes = Counter({f"{image_size}x{image_size}": n_train + n_train // 5})
    return _finish("synthetic", "synthetic", None, contents, _LoadProblems(), sizes)
