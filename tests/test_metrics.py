"""Metrics: hand-worked golden values, a brute-force reference, absent classes, client spread and run summary."""

from __future__ import annotations

import math
import random

import pytest

from client.config import RunSettings
from server.metrics import classification_metrics, client_distribution
from server.records import RoundRecord, summarize


def _brute_force(y_true: list[int], y_pred: list[int], num_classes: int) -> dict:
    """Textbook metrics by counting pairs in plain Python; F1 as the harmonic mean of precision and recall."""
    confusion = [[sum(1 for t, p in zip(y_true, y_pred) if t == i and p == j) for j in range(num_classes)]
                 for i in range(num_classes)]
    recall, precision, f1 = [], [], []
    for k in range(num_classes):
        relevant = sum(1 for t in y_true if t == k)
        retrieved = sum(1 for p in y_pred if p == k)
        hits = sum(1 for t, p in zip(y_true, y_pred) if t == p == k)
        r = hits / relevant if relevant else None
        p = hits / retrieved if retrieved else None
        recall.append(r)
        precision.append(p)
        if r is None:
            f1.append(None)
        elif not p or not r:
            f1.append(0.0)
        else:
            f1.append(2 * p * r / (p + r))
    present = [v for v in f1 if v is not None]
    return {
        "accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true),
        "macro_f1": sum(present) / len(present),
        "per_class_recall": recall,
        "per_class_precision": precision,
        "per_class_f1": f1,
        "confusion_matrix": confusion,
    }


def _make_predictions(seed: int, n: int = 300, num_classes: int = 7, skill: float = 0.6) -> tuple[list, list]:
    """Random labels and predictions that are right with probability `skill`, else uniform."""
    rng = random.Random(seed)
    y_true = [rng.randrange(num_classes) for _ in range(n)]
    y_pred = [t if rng.random() < skill else rng.randrange(num_classes) for t in y_true]
    return y_true, y_pred


def _round(index: int, accuracy: float, *, bytes_up: int = 100, bytes_down: int = 300) -> RoundRecord:
    """A round record with server-side accuracy and traffic."""
    return RoundRecord.from_json({"round": index, "seconds": 2.0, "bytes_up": bytes_up if index else 0,
            "bytes_down": bytes_down if index else 0,
            "server": {"loss": 1.0, "accuracy": accuracy, "macro_f1": accuracy / 2}})


def test_classification_metrics_hand_worked():
    """A 3-class example whose every number was computed by hand."""
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]

    metrics = classification_metrics(y_true, y_pred, num_classes=3)

    # Confusion rows = true: class 0 -> {0: 1, 1: 1}; class 1 -> {1: 2}; class 2 -> {0: 1, 2: 1}.
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class_recall"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert metrics["per_class_precision"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    # F1: 0.5; 2*(2/3)*1/(2/3+1) = 0.8; 2*1*0.5/1.5 = 2/3.
    assert metrics["per_class_f1"] == pytest.approx([0.5, 0.8, 2 / 3])
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics["balanced_accuracy"] == pytest.approx(2 / 3)
    assert metrics["support"] == [2, 2, 2]
    assert metrics["num_examples"] == 6


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_brute_force(seed):
    """Random 7-class predictions agree with a plain-Python count of every metric."""
    y_true, y_pred = _make_predictions(seed)

    metrics = classification_metrics(y_true, y_pred)

    reference = _brute_force(y_true, y_pred, 7)
    assert metrics["confusion_matrix"] == reference["confusion_matrix"]
    for key in ("accuracy", "macro_f1", "per_class_recall", "per_class_precision", "per_class_f1"):
        assert metrics[key] == pytest.approx(reference[key]), key


def test_absent_class_has_no_recall_or_f1_and_leaves_macro_f1():
    """A class missing from y_true reports None and is excluded from macro-F1; predicting it still costs."""
    y_true = [0, 0, 1, 1]
    y_pred = [0, 2, 1, 1]  # one "0" mistaken for class 2, which has no true examples

    metrics = classification_metrics(y_true, y_pred, num_classes=3)

    assert metrics["per_class_recall"] == [0.5, 1.0, None]
    assert metrics["per_class_f1"][2] is None
    assert metrics["per_class_precision"][2] == 0.0
    # Class 0: P 1, R 0.5 -> F1 2/3; class 1: F1 1 -> macro (2/3 + 1) / 2.
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["accuracy"] == pytest.approx(0.75)


def test_present_class_never_predicted_has_f1_zero_and_no_precision():
    """A class that exists but is never predicted: recall 0, F1 0, precision undefined (None)."""
    metrics = classification_metrics([0, 1, 1], [0, 0, 0], num_classes=2)

    assert metrics["per_class_recall"] == [1.0, 0.0]
    assert metrics["per_class_precision"] == [pytest.approx(1 / 3), None]
    assert metrics["per_class_f1"] == [pytest.approx(0.5), 0.0]
    assert metrics["macro_f1"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [([], [], "no examples"), ([0, 1], [0], "y_pred has 1"), ([0, 7], [0, 1], "outside 0..6"),
     ([0, 1], [0, -1], "outside 0..6"), ([0.5, 1.0], [0, 1], "integer")],
)
def test_classification_metrics_rejects_bad_input(y_true, y_pred, message):
    """Empty, mismatched or out-of-range labels raise ValueError instead of a number."""
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, y_pred)


def test_client_distribution_hand_worked():
    """Four clients: worst 10 % is ceil(0.4) = 1 client; std is the population std."""
    spread = client_distribution([0.1, 0.5, 0.9, 0.3])

    assert spread["n"] == 4
    assert spread["mean"] == pytest.approx(0.45)
    assert spread["worst_10pct"] == pytest.approx(0.1)
    assert (spread["min"], spread["max"]) == (pytest.approx(0.1), pytest.approx(0.9))
    # Deviations -0.35, 0.05, 0.45, -0.15: squares sum to 0.35, / 4 = 0.0875.
    assert spread["std"] == pytest.approx(math.sqrt(0.0875))
    assert spread["median"] == pytest.approx(0.4)


@pytest.mark.parametrize("n", [1, 9, 10, 11, 25, 100])
def test_worst_10pct_matches_brute_force(n):
    """worst_10pct is the mean of the ceil(n/10) lowest accuracies, for client counts around the boundaries."""
    rng = random.Random(n)
    accuracies = [rng.random() for _ in range(n)]

    spread = client_distribution(accuracies)

    worst = sorted(accuracies)[: -(-n // 10)]
    assert spread["worst_10pct"] == pytest.approx(sum(worst) / len(worst))
    assert spread["mean"] == pytest.approx(sum(accuracies) / n)


def test_client_distribution_of_nobody_is_empty_and_nan_is_refused():
    """No clients gives n=0 and None figures; a NaN accuracy is an error, not a number to average."""
    assert client_distribution([]) == {"mean": None, "worst_10pct": None, "min": None, "max": None,
                                       "std": None, "median": None, "n": 0}
    with pytest.raises(ValueError, match="finite"):
        client_distribution([0.5, float("nan")])


def test_summarize_hand_worked():
    """Round 0 counts for initial and best accuracy but not for rounds or traffic."""
    rounds = [_round(0, 0.14), _round(1, 0.40), _round(2, 0.55, bytes_up=200), _round(3, 0.50)]

    summary = summarize(rounds, seconds=12.0, settings=RunSettings(model="cnn_am")).to_json()

    assert summary["final_accuracy"] == pytest.approx(0.50)
    assert summary["best_accuracy"] == pytest.approx(0.55)
    assert summary["best_round"] == 2
    assert summary["initial_accuracy"] == pytest.approx(0.14)
    assert summary["macro_f1"] == pytest.approx(0.25)
    assert summary["rounds"] == 3
    # Traffic per training round: 400, 500, 400 bytes.
    assert summary["bytes_per_round"] == pytest.approx(1300 / 3)
    assert (summary["bytes_up"], summary["bytes_down"]) == (400, 900)
    assert summary["seconds_per_round"] == pytest.approx(4.0)
    assert summary["accuracy_source"] == "server"
    assert summary["model"] == "cnn_am"


def test_summarize_falls_back_to_federated_accuracy_and_says_so():
    """Without server-side evaluation the federated accuracy is used and accuracy_source names it."""
    rounds = [RoundRecord.from_json(r) for r in (
        {"round": 1, "seconds": 1.0, "federated": {"accuracy": 0.3, "distribution": {"worst_10pct": 0.1}}},
        {"round": 2, "seconds": 1.0, "federated": {"accuracy": 0.4, "distribution": {"worst_10pct": 0.2}}})]

    summary = summarize(rounds, seconds=2.0, settings=RunSettings(model="dmsnet_iot")).to_json()

    assert summary["accuracy_source"] == "federated"
    assert summary["final_accuracy"] == pytest.approx(0.4)
    assert summary["final_worst_10pct"] == pytest.approx(0.2)
    assert summary["initial_accuracy"] is None
    assert summary["bytes_per_round"] == 0.0
