"""Splitting one labelled dataset among simulated clients: IID, label skew (Dirichlet, pathological) or quantity skew.

The label skew itself comes from flwr-datasets' partitioners, run over an in-memory `datasets.Dataset` built from the
label array (nothing is downloaded), so our non-IID settings are the ones the FL literature and Flower's baselines use.

Client sizes (`size_weights`, from the client profiles) are honoured the same way for every scheme, in two steps:

1. the partitioner fixes each client's *label mix*: its per-class counts (for "quantity", an IID mix);
2. those counts are rescaled to client sizes proportional to the weights by iterative proportional fitting (IPF):
   rows are scaled to the target sizes, columns to the class totals that exist, alternately. IPF keeps zero cells
   at zero (a pathological client keeps exactly its k classes) and keeps every client's odds ratios between
   classes (the Dirichlet skew survives), and it is the maximum-entropy (minimum-KL) table with those margins.
   The table is rounded with every class total exact, every cell the partitioner gave a client kept at >= 1,
   and the samples of each class are dealt out accordingly.

Without `size_weights` the partitioner's own output is returned as it is (so Dirichlet keeps the quantity skew it
induces, as in the literature), except for "quantity", whose sizes always go through step 2.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from client.data.labels import EMOTIONS, NUM_CLASSES

SCHEMES = ("iid", "dirichlet", "pathological", "quantity")
DEFAULT_MIN_SIZE = 10

# IPF on a feasible table converges to 1e-9 relative error in a few dozen sweeps; infeasible margins (a
# pathological class held only by small clients) oscillate forever, so the sweep count is capped.
_IPF_SWEEPS = 500
_IPF_TOLERANCE = 1e-9


def partition_labels(
    labels: np.ndarray,
    *,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    classes_per_client: int = 2,
    size_weights: Sequence[float] | None = None,
    seed: int = 0,
    min_size: int = DEFAULT_MIN_SIZE,
) -> list[np.ndarray]:
    """Splits sample indices among `num_partitions` clients.

    Args:
        labels: integer label per sample (any non-negative ints; usually the 7-class label space).
        num_partitions: number of clients.
        scheme: "iid"; "dirichlet" (each class split among clients with proportions ~ Dir(alpha));
            "pathological" (exactly `classes_per_client` classes per client; client i's first class is i mod C, so
            every class is used once there are at least C clients, the rest at random: the setting of Li et al.
            2021); or "quantity" (client sizes ~ Dir(alpha) around the weights, labels IID).
        alpha: Dirichlet concentration for "dirichlet" and "quantity"; lower means more skew.
        classes_per_client: k for "pathological".
        size_weights: relative data share per client (e.g. the profiles' `data_weight`s). None leaves sizes to the
            scheme: equal for iid, whatever the label split gives for dirichlet and pathological, Dir(alpha) shares
            for quantity.
        seed: makes the split reproducible.
        min_size: every client gets at least this many samples.

    Returns:
        One sorted int64 index array per client; they are disjoint and cover every sample, except that
        "pathological" leaves out a class no client was given (possible only with fewer clients than classes;
        `partition_stats` reports it as `unassigned`).

    Raises:
        ValueError: an unknown scheme, bad numbers, or a split that cannot give every client `min_size` samples;
            the message says which and what to change.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if len(labels) < num_partitions * max(min_size, 1):
        raise ValueError(
            f"{len(labels)} samples cannot give {num_partitions} clients at least {max(min_size, 1)} samples each; "
            "use fewer clients or a smaller min_size"
        )
    weights = _check_weights(size_weights, num_partitions)
    rng = np.random.default_rng(seed)

    # The partitioners split each class in dataset order; a seeded permutation keeps file order (source, folder,
    # PublicTest prefixes) from deciding who gets which samples. IidPartitioner shards contiguously and needs it.
    permutation = rng.permutation(len(labels))
    dataset = _label_dataset(labels[permutation], permutation)
    sub_seed = int(rng.integers(2**31))

    if scheme == "quantity":
        shares = _quantity_shares(dataset, num_partitions, alpha, weights, sub_seed)
        targets = _target_sizes(len(labels), shares, min_size)
        seed_table = np.outer(targets, np.bincount(labels)).astype(float)
        return _rescale_and_deal(labels, seed_table, targets, min_size, rng)

    parts = _run_partitioner(dataset, scheme, num_partitions, _concentration(alpha, num_partitions, weights),
                             classes_per_client, sub_seed, min_size=min_size if weights is None else 0)
    if weights is None:
        _check_min_size(parts, min_size, scheme)
        return [np.sort(p) for p in parts]
    targets = _target_sizes(len(labels), weights / weights.sum(), min_size)
    seed_table = _count_table(labels, parts)
    if scheme == "pathological":
        seed_table = _match_largest(seed_table, weights)
    return _rescale_and_deal(labels, seed_table, targets, min_size, rng)


def partition_stats(labels: np.ndarray, parts: Sequence[np.ndarray], *, num_classes: int = NUM_CLASSES) -> dict:
    """Describes a split: per-client per-class counts, sizes and how skewed the label and size distributions are.

    `label_skew_tv` is the mean total-variation distance between each client's label distribution and the global one
    (0 = every client looks like the whole dataset; near 1 = clients hold disjoint classes). Clients are weighted
    equally, because federated averaging over clients is what a skewed small client hurts.

    Returns:
        A JSON-ready dict: num_clients, num_samples, unassigned (samples in no partition), classes, sizes,
        per_client (per-class counts, clients x classes), global_distribution, tv_distance (per client),
        label_skew_tv, classes_per_client, size_cv (std/mean of sizes).
    """
    labels = np.asarray(labels)
    counts = _count_table(labels, parts, num_classes=num_classes)
    sizes = counts.sum(axis=1)
    global_counts = np.bincount(labels, minlength=num_classes)[:num_classes].astype(float)
    global_dist = global_counts / max(global_counts.sum(), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        client_dist = np.where(sizes[:, None] > 0, counts / np.maximum(sizes[:, None], 1), 0.0)
    tv = 0.5 * np.abs(client_dist - global_dist).sum(axis=1)
    classes = list(EMOTIONS) if num_classes == NUM_CLASSES else [str(c) for c in range(num_classes)]
    return {
        "num_clients": len(parts),
        "num_samples": int(sizes.sum()),
        "unassigned": int(len(labels) - sizes.sum()),
        "classes": classes,
        "sizes": sizes.astype(int).tolist(),
        "per_client": counts.astype(int).tolist(),
        "global_distribution": [round(float(p), 6) for p in global_dist],
        "tv_distance": [round(float(d), 6) for d in tv],
        "label_skew_tv": round(float(tv.mean()), 6) if len(parts) else 0.0,
        "classes_per_client": (counts > 0).sum(axis=1).astype(int).tolist(),
        "size_cv": round(float(sizes.std() / sizes.mean()), 6) if len(parts) and sizes.mean() > 0 else 0.0,
    }


def _check_weights(size_weights: Sequence[float] | None, num_partitions: int) -> np.ndarray | None:
    if size_weights is None:
        return None
    weights = np.asarray(size_weights, dtype=float)
    if weights.shape != (num_partitions,):
        raise ValueError(f"size_weights has {weights.size} entries for {num_partitions} partitions")
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"size_weights must be finite and > 0, got {weights.tolist()}")
    return weights


def _label_dataset(labels: np.ndarray, index: np.ndarray) -> Any:
    import datasets  # imported late: it costs about a second and only partitioning needs it

    return datasets.Dataset.from_dict({"label": labels.astype(np.int64), "idx": index.astype(np.int64)})


def _single_valued_dataset(num_rows: int) -> Any:
    import datasets

    return datasets.Dataset.from_dict({"all": np.zeros(num_rows, dtype=np.int64),
                                       "idx": np.arange(num_rows, dtype=np.int64)})


def _partition_indices(partitioner: Any, num_partitions: int) -> list[np.ndarray]:
    """Each partition's original sample indices (the dataset's "idx" column)."""
    # Slicing the column materialises it in one call; iterating a datasets Column decodes row by row (100x slower).
    first = np.asarray(partitioner.load_partition(0)["idx"][:], dtype=np.int64)
    assignment = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(assignment, dict) and len(assignment) == num_partitions:
        # The Dirichlet and pathological partitioners of flwr-datasets 0.6.1 keep the row assignment they just
        # made. Reading it skips one Dataset.select per client, each of which fingerprints its whole index list
        # with dill (4 s for FER2013's 28,709 rows with pathological). Checked against the public result above.
        index = np.asarray(partitioner.dataset.data.column("idx").to_numpy(), dtype=np.int64)
        parts = [index[np.asarray(assignment[pid], dtype=np.int64)] for pid in range(num_partitions)]
        if np.array_equal(parts[0], first):
            return parts
    return [first] + [np.asarray(partitioner.load_partition(pid)["idx"][:], dtype=np.int64)
                      for pid in range(1, num_partitions)]


def _concentration(alpha: float, num_partitions: int, weights: np.ndarray | None) -> np.ndarray:
    """Per-client Dirichlet concentrations averaging `alpha`, proportional to the weights.

    Dir(a) gives client i the mean share a_i / sum(a) = w_i / sum(w) of every class, so a weighted draw is already
    near the target sizes and the rescaling only corrects noise. With equal concentrations, a small client's few
    classes can be too rare to let a large client reach its size (at alpha=0.1, 2 hospitals and 8 hubs at 4:1 came
    out 2.6-3.9:1 instead of 4:1). As a side effect large clients see a broader label mix (a_i larger), as a
    hospital serving many patients does compared with a single home's hub.
    """
    if weights is None:
        return np.full(num_partitions, float(alpha))
    return alpha * num_partitions * weights / weights.sum()


def _run_partitioner(dataset: Any, scheme: str, num_partitions: int, concentration: np.ndarray,
                     classes_per_client: int, seed: int, *, min_size: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                           alpha=concentration.tolist(), min_partition_size=min_size,
                                           self_balancing=False, seed=seed)
    else:
        num_classes = len(np.unique(dataset["label"]))
        if not 1 <= classes_per_client <= num_classes:
            raise ValueError(f"classes_per_client must be in 1..{num_classes} (classes present), got "
                             f"{classes_per_client}")
        partitioner = PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                              num_classes_per_partition=classes_per_client,
                                              class_assignment_mode="first-deterministic", seed=seed)
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():
            # The Dirichlet retry warning is replaced by our own error below; unused pathological classes are
            # visible in the partition stats.
            warnings.simplefilter("ignore", UserWarning)
            return _partition_indices(partitioner, num_partitions)
    except ValueError as error:
        if scheme == "dirichlet":
            raise ValueError(
                f"Dirichlet partitioning (alpha={float(concentration.mean()):g}) left some of {num_partitions} clients "
                f"below {min_size} samples in 10 draws; raise alpha, use fewer clients or lower min_size"
            ) from error
        raise ValueError(f"{scheme} partitioning failed: {error}") from error


def _match_largest(seed_table: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Reorders the partitioner's label mixes so the heaviest clients get the mixes with the most data.

    Which classes a pathological client holds bounds how large it can get (its classes are shared with the other
    holders), so handing the largest natural partitions to the largest weights brings sizes closer to the weights.
    Class assignment stays the partitioner's; only who gets which mix changes.
    """
    by_size = np.argsort(-seed_table.sum(axis=1), kind="stable")
    by_weight = np.argsort(-weights, kind="stable")
    matched = np.empty_like(seed_table)
    matched[by_weight] = seed_table[by_size]
    return matched


def _quantity_shares(dataset: Any, num_partitions: int, alpha: float, weights: np.ndarray | None,
                     seed: int) -> np.ndarray:
    """Client shares ~ Dir(alpha * n * w / sum(w)): mean share w_i / sum(w), spread set by alpha as for labels.

    Drawn with DirichletPartitioner over a single-valued column, i.e. the quantity-skew setting of Li et al.
    (2021, "Federated Learning on Non-IID Data Silos"); only the sizes are kept, labels are then dealt IID.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    concentration = _concentration(alpha, num_partitions, weights)
    single = _single_valued_dataset(dataset.num_rows)
    partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="all",
                                       alpha=concentration.tolist(), min_partition_size=0, seed=seed)
    partitioner.dataset = single
    sizes = np.array([len(p) for p in _partition_indices(partitioner, num_partitions)], dtype=float)
    return sizes / sizes.sum()


def _target_sizes(total: int, shares: np.ndarray, min_size: int) -> np.ndarray:
    """Integer sizes summing to `total`, proportional to `shares` except that none is below `min_size`.

    Water-filling: clients whose proportional size falls under the floor get the floor, the others share what is
    left in proportion (so a 4:1 ratio between two large clients stays 4:1). Largest remainder makes the sum exact.
    """
    shares = np.asarray(shares, dtype=float)
    floored = np.zeros(len(shares), dtype=bool)
    while True:
        free = total - min_size * floored.sum()
        real = np.where(floored, float(min_size), free * shares / shares[~floored].sum())
        newly = (~floored) & (real < min_size)
        if not newly.any():
            break
        floored |= newly
    sizes = np.floor(real).astype(np.int64)
    remainder = total - sizes.sum()
    order = np.argsort(-(real - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    return sizes


def _count_table(labels: np.ndarray, parts: Sequence[np.ndarray], *, num_classes: int | None = None) -> np.ndarray:
    width = num_classes if num_classes is not None else int(labels.max()) + 1 if labels.size else 0
    table = np.zeros((len(parts), width), dtype=np.int64)
    for row, part in enumerate(parts):
        if len(part):
            table[row] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=width)[:width]
    return table


def _ipf(seed_table: np.ndarray, row_targets: np.ndarray, col_targets: np.ndarray) -> np.ndarray:
    """Iterative proportional fitting; ends on a column step so the class totals are always exact."""
    table = seed_table.astype(float).copy()
    # A client the partitioner left empty has no label mix to keep; it gets the global one.
    empty = table.sum(axis=1) == 0
    table[empty] = col_targets / max(col_targets.sum(), 1)
    for _ in range(_IPF_SWEEPS):
        rows = table.sum(axis=1)
        table *= np.divide(row_targets, rows, out=np.zeros_like(rows), where=rows > 0)[:, None]
        cols = table.sum(axis=0)
        table *= np.divide(col_targets, cols, out=np.zeros_like(cols), where=cols > 0)[None, :]
        if np.abs(table.sum(axis=1) - row_targets).max() <= _IPF_TOLERANCE * max(row_targets.max(), 1):
            break
    return table


def _round_table(real: np.ndarray, col_totals: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Integer table with exact column totals, zero off `support`, and each row's running sum near the real one.

    Columns are rounded one after another; each row carries its rounding error into the next column (error
    diffusion), so row totals end within about one sample of the real table instead of up to one per class.
    """
    rows, cols = real.shape
    result = np.zeros((rows, cols), dtype=np.int64)
    carry = np.zeros(rows)
    for k in range(cols):
        allowed = support[:, k]
        wanted = np.where(allowed, real[:, k] + carry, 0.0)
        cell = np.where(allowed, np.maximum(np.floor(wanted), 0), 0).astype(np.int64)
        short = int(col_totals[k] - cell.sum())
        slack = wanted - cell
        if short > 0:
            candidates = np.flatnonzero(allowed)
            for row in candidates[np.argsort(-slack[candidates], kind="stable")][:short]:
                cell[row] += 1
            # More units than allowed rows with slack: spread the rest over the largest allowed cells.
            while cell.sum() < col_totals[k]:
                cell[candidates[np.argmax(slack[candidates])]] += 1
        elif short < 0:
            while cell.sum() > col_totals[k]:
                holders = np.flatnonzero(cell > 0)
                cell[holders[np.argmin(slack[holders])]] -= 1
                slack = wanted - cell
        carry = np.where(allowed, wanted - cell, carry)
        result[:, k] = cell
    return result


def _rescale_and_deal(labels: np.ndarray, seed_table: np.ndarray, targets: np.ndarray, min_size: int,
                      rng: np.random.Generator) -> list[np.ndarray]:
    class_totals = np.bincount(labels, minlength=seed_table.shape[1]).astype(np.int64)
    # A class the partitioner gave nobody (pathological with fewer clients than classes) stays unassigned.
    class_totals[seed_table.sum(axis=0) == 0] = 0
    support = seed_table > 0
    support[seed_table.sum(axis=1) == 0] = class_totals > 0
    real = _ipf(seed_table, targets.astype(float), class_totals.astype(float))
    table = _round_table(real, class_totals, support)
    _keep_support(table, support)
    _lift_to_min_size(table, support, min_size)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(targets))]
    for k in range(table.shape[1]):
        members = rng.permutation(np.flatnonzero(labels == k))
        bounds = np.concatenate([[0], np.cumsum(table[:, k])])
        for row in range(len(targets)):
            parts[row].append(members[bounds[row]:bounds[row + 1]])
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]


def _keep_support(table: np.ndarray, support: np.ndarray) -> None:
    """Gives every cell the partitioner populated at least one sample, taken from the column's largest cell."""
    for row, k in zip(*np.nonzero(support & (table == 0))):
        donor = int(np.argmax(table[:, k]))
        if table[donor, k] > 1:
            table[donor, k] -= 1
            table[row, k] += 1


def _lift_to_min_size(table: np.ndarray, support: np.ndarray, min_size: int) -> None:
    """Moves single samples of a class the short client already holds from the largest holder of that class."""
    for row in np.flatnonzero(table.sum(axis=1) < min_size):
        while table[row].sum() < min_size:
            sizes = table.sum(axis=1)
            best = None
            for k in np.flatnonzero(support[row]):
                donors = np.flatnonzero((table[:, k] > 1) & (sizes > min_size))
                donors = donors[donors != row]
                if donors.size:
                    donor = int(donors[np.argmax(sizes[donors])])
                    if best is None or sizes[donor] > sizes[best[0]]:
                        best = (donor, k)
            if best is None:
                raise ValueError(f"client {row} cannot reach {min_size} samples with the classes it was given; "
                                 "use fewer clients, more classes per client or a smaller min_size")
            table[best[0], best[1]] -= 1
            table[row, best[1]] += 1


def _check_min_size(parts: Sequence[np.ndarray], min_size: int, scheme: str) -> None:
    smallest = min(range(len(parts)), key=lambda i: len(parts[i]))
    if len(parts[smallest]) < min_size:
        raise ValueError(f"{scheme} partitioning gave client {smallest} only {len(parts[smallest])} samples "
                         f"(< min_size {min_size}); use fewer clients or a smaller min_size")


__all__ = ["SCHEMES", "DEFAULT_MIN_SIZE", "partition_labels", "partition_stats"]
