"""Partitioning among simulated clients: coverage, label skew that follows alpha, k classes, profile data shares."""

from __future__ import annotations

import numpy as np
import pytest

from simulation.partition import SCHEMES, partition_labels, partition_stats
from client.profiles import assign_profiles

# FER2013's training-set class counts (angry .. neutral), so the rare "disgust" class is rare here too.
_FER2013_COUNTS = (3995, 436, 4097, 7215, 4830, 3171, 4965)
# Two hospitals at weight 4 and eight home hubs at weight 1: a hospital should hold 4/16 of the data, a hub 1/16.
_PROFILE_WEIGHTS = [4.0, 4.0] + [1.0] * 8


def _make_labels(total: int = 1400, *, seed: int = 0) -> np.ndarray:
    """Labels in FER2013's class proportions, shuffled."""
    counts = np.floor(np.array(_FER2013_COUNTS) / sum(_FER2013_COUNTS) * total).astype(int)
    counts[3] += total - counts.sum()
    labels = np.repeat(np.arange(7), counts)
    return np.random.default_rng(seed).permutation(labels)


def _mean_skew(labels: np.ndarray, *, alpha: float, weights, seeds=range(4)) -> float:
    """Mean label skew (TV distance) of Dirichlet partitions over several seeds."""
    skews = [partition_stats(labels, partition_labels(labels, num_partitions=10, scheme="dirichlet", alpha=alpha,
                                                      size_weights=weights, seed=seed, min_size=1))["label_skew_tv"]
             for seed in seeds]
    return float(np.mean(skews))


@pytest.mark.parametrize("weights", [None, _PROFILE_WEIGHTS], ids=["unweighted", "profile-weights"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_disjoint_and_cover_the_data(scheme, weights):
    """Every sample lands in exactly one client, for every scheme, with and without size weights."""
    labels = _make_labels()

    parts = partition_labels(labels, num_partitions=10, scheme=scheme, size_weights=weights, seed=3)

    joined = np.concatenate(parts)
    assert len(parts) == 10
    assert len(joined) == len(labels)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert all(len(part) >= 10 for part in parts)


@pytest.mark.parametrize("weights", [None, _PROFILE_WEIGHTS], ids=["unweighted", "profile-weights"])
def test_dirichlet_label_skew_follows_alpha(weights):
    """Lower alpha gives more label skew: mean TV distance at alpha 0.1 > 1 > 100, averaged over 4 seeds."""
    labels = _make_labels()

    skew = {alpha: _mean_skew(labels, alpha=alpha, weights=weights) for alpha in (0.1, 1.0, 100.0)}

    # Measured: about 0.66 / 0.33 / 0.04; the margins leave room for seed noise but not for a flat response.
    assert skew[0.1] > skew[1.0] + 0.15
    assert skew[1.0] > skew[100.0] + 0.15
    assert skew[100.0] < 0.1


@pytest.mark.parametrize("weights", [None, _PROFILE_WEIGHTS], ids=["unweighted", "profile-weights"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_exactly_k_classes_per_client(k, weights):
    """Each client holds samples of exactly k classes."""
    labels = _make_labels()

    parts = partition_labels(labels, num_partitions=10, scheme="pathological", classes_per_client=k,
                             size_weights=weights, seed=1)

    assert [len(np.unique(labels[part])) for part in parts] == [k] * 10


@pytest.mark.parametrize(("scheme", "alpha"), [("iid", 1.0), ("dirichlet", 0.5), ("dirichlet", 0.1)])
def test_hospitals_get_four_times_an_iot_hubs_data(scheme, alpha):
    """A 2-hospital / 8-IoT mix (weights 4:1) gives each client its weight's share, within 10 %.

    The rescaling is exact up to integer rounding: every class column is rounded with the row errors carried
    over (about +-1 sample per client), and single samples move to keep a client's classes or its minimum size.
    At 1400 samples a hub's share is ~88 samples, so 10 % is ~9 samples: several times the rounding, far below
    the 4x difference being checked. Measured worst deviation: about 2 % (alpha 0.5) and 5 % (alpha 0.1).
    """
    labels = _make_labels()
    profiles = assign_profiles(10, {"hospital": 0.2, "iot": 0.8}, seed=7)
    weights = [profile.data_weight for profile in profiles]

    parts = partition_labels(labels, num_partitions=10, scheme=scheme, alpha=alpha, size_weights=weights, seed=2)

    sizes = np.array([len(part) for part in parts], dtype=float)
    expected = len(labels) * np.array(weights) / sum(weights)
    hospital = np.array([profile.name == "hospital" for profile in profiles])
    assert hospital.sum() == 2
    assert np.all(np.abs(sizes - expected) <= 0.10 * expected)
    assert sizes[hospital].mean() / sizes[~hospital].mean() == pytest.approx(4.0, rel=0.1)


def test_quantity_skew_centres_sizes_on_the_profile_weights():
    """Quantity skew draws sizes ~ Dir around the weights: averaged over seeds, a hospital holds ~4x a hub.

    At alpha 10 a hub's share has a relative spread of ~38 % per draw and a hospital's ~17 %; over 10 seeds x 8
    hubs and 10 x 2 hospitals the ratio of means has a spread of about 6 %, so 20 % is a >3-sigma bound.
    """
    labels = _make_labels()

    sizes = np.array([[len(part) for part in partition_labels(labels, num_partitions=10, scheme="quantity",
                                                              alpha=10.0, size_weights=_PROFILE_WEIGHTS, seed=seed)]
                      for seed in range(10)], dtype=float)

    assert sizes[:, :2].mean() / sizes[:, 2:].mean() == pytest.approx(4.0, rel=0.2)
    assert sizes.std(axis=0).mean() > 5  # the sizes do vary from draw to draw: it is a skew, not a fixed split


def test_quantity_skew_at_low_alpha_is_strong_but_keeps_min_size():
    """At alpha 0.1 client sizes vary widely (CV > 1) while every client keeps min_size samples and an IID mix."""
    labels = _make_labels()

    parts = partition_labels(labels, num_partitions=10, scheme="quantity", alpha=0.1, seed=0, min_size=12)

    stats = partition_stats(labels, parts)
    assert stats["size_cv"] > 1.0
    assert min(stats["sizes"]) >= 12
    big = int(np.argmax(stats["sizes"]))
    assert stats["tv_distance"][big] < 0.05


def test_pathological_with_weights_favours_hospitals_as_far_as_classes_allow():
    """With k classes per client a hospital cannot exceed what its classes' holders share; it still gets >2x a hub.

    Measured over seeds at 10 clients, k=2: hospital/hub ratios between 2.5 and 4.0 (mean about 3.4).
    """
    labels = _make_labels()

    parts = partition_labels(labels, num_partitions=10, scheme="pathological", classes_per_client=2,
                             size_weights=_PROFILE_WEIGHTS, seed=5)

    sizes = np.array([len(part) for part in parts], dtype=float)
    assert sizes[:2].mean() / sizes[2:].mean() > 2.0


def test_same_seed_same_split_and_other_seed_another():
    """Partitioning is a pure function of its arguments."""
    labels = _make_labels()
    kwargs = {"num_partitions": 6, "scheme": "dirichlet", "alpha": 0.5, "size_weights": [4, 1, 1, 1, 1, 1]}

    first = partition_labels(labels, seed=11, **kwargs)
    again = partition_labels(labels, seed=11, **kwargs)
    other = partition_labels(labels, seed=12, **kwargs)

    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_unweighted_dirichlet_matches_the_flower_partitioner_counts():
    """Without weights the split is flwr-datasets' DirichletPartitioner's own, on our seeded permutation."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = _make_labels(700)
    rng = np.random.default_rng(4)
    permutation = rng.permutation(len(labels))
    partitioner = DirichletPartitioner(num_partitions=5, partition_by="label", alpha=[0.5] * 5,
                                       min_partition_size=10, self_balancing=False, seed=int(rng.integers(2**31)))
    partitioner.dataset = Dataset.from_dict({"label": labels[permutation], "idx": permutation})
    reference = [sorted(partitioner.load_partition(i)["idx"]) for i in range(5)]

    parts = partition_labels(labels, num_partitions=5, scheme="dirichlet", alpha=0.5, seed=4)

    assert [part.tolist() for part in parts] == reference


def test_partition_stats_hand_worked():
    """Counts, sizes and TV distances of a tiny split worked out by hand."""
    labels = np.array([0, 0, 1, 1, 0, 1])
    parts = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]

    stats = partition_stats(labels, parts, num_classes=2)

    # Global mix (0.5, 0.5); clients (1, 0), (0, 1), (0.5, 0.5): TV 0.5, 0.5, 0 -> mean 1/3.
    assert stats["per_client"] == [[2, 0], [0, 2], [1, 1]]
    assert stats["sizes"] == [2, 2, 2]
    assert stats["tv_distance"] == [0.5, 0.5, 0.0]
    assert stats["label_skew_tv"] == pytest.approx(1 / 3, abs=1e-6)
    assert stats["classes_per_client"] == [1, 1, 2]
    assert stats["unassigned"] == 0
    assert stats["size_cv"] == 0.0


def test_partition_stats_tv_matches_a_direct_computation():
    """label_skew_tv equals the mean over clients of half the L1 distance to the global label mix."""
    labels = _make_labels(700)
    parts = partition_labels(labels, num_partitions=7, scheme="dirichlet", alpha=0.3, seed=0, min_size=1)

    stats = partition_stats(labels, parts)

    global_mix = [np.mean(labels == k) for k in range(7)]
    expected = np.mean([0.5 * sum(abs(np.mean(labels[p] == k) - global_mix[k]) for k in range(7)) for p in parts])
    assert stats["label_skew_tv"] == pytest.approx(expected, abs=1e-5)
    assert stats["per_client"] == [[int(np.sum(labels[p] == k)) for k in range(7)] for p in parts]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "shards"}, "unknown partition scheme"),
        ({"num_partitions": 200}, "cannot give 200 clients"),
        ({"size_weights": [1.0, 2.0]}, "size_weights has 2 entries"),
        ({"size_weights": [1.0] * 9 + [0.0]}, "must be finite and > 0"),
        ({"scheme": "pathological", "classes_per_client": 8}, "classes_per_client"),
        ({"scheme": "dirichlet", "alpha": 0.01, "min_size": 60}, "raise alpha"),
        ({"alpha": 0.0}, "alpha must be > 0"),
    ],
)
def test_bad_arguments_raise_one_clear_line(kwargs, message):
    """Impossible requests raise ValueError whose single-line message says what is wrong."""
    labels = _make_labels(700)
    arguments = {"num_partitions": 10, **kwargs}

    with pytest.raises(ValueError, match=message) as error:
        partition_labels(labels, **arguments)

    assert "\n" not in str(error.value)


def test_profiles_weights_feed_the_partitioner():
    """A simulated federation's plan gives each client the share of the data its profile's weight asks for:
    with one hospital (weight 4) and four IoT hubs (weight 1) on an IID split, 4/8 and 1/8 of the faces."""
    from client.config import RunSettings
    from simulation.federation import federation_plan, federation_stats

    # Prepare
    settings = RunSettings(dataset="synthetic=400", num_clients=5, partition="iid", profile_mix="hospital=0.2,iot=0.8",
                           out_dir="unused")

    # Execute
    plan = federation_plan(settings)
    stats = federation_stats(settings)

    # Assert
    sizes = {client.client_id: (client.profile.name, len(client.indices)) for client in plan}
    assert sorted(sizes.values()) == [("hospital", 200)] + [("iot", 50)] * 4
    assert {cid: (entry["profile"], entry["size"]) for cid, entry in stats["clients"].items()} == sizes
    assert len(np.unique(np.concatenate([client.indices for client in plan]))) == 400
