"""Classification metrics for the global model and the spread of per-client accuracy (a run's summary is
server.records.summarize).

Plain numpy, JSON-ready results (lists, floats, None), so the same dicts go into metrics.jsonl, summary.json,
`fer-sim evaluate --json` and the report without conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from client.data.labels import NUM_CLASSES


def classification_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, *,
                           num_classes: int = NUM_CLASSES) -> dict:
    """Accuracy, macro-F1, per-class recall / precision / F1 and the confusion matrix.

    Classes absent from `y_true` have no recall and no F1 (there is nothing to find): both are reported as None
    and left out of macro-F1, so a test set without any "disgust" is not scored as if the model failed on it.
    Predictions *of* such a class still count, as misses of the true class. A present class the model never
    predicts has precision None and F1 0. F1 is computed as 2TP / (2TP + FP + FN), which equals the harmonic mean
    of precision and recall wherever both exist.

    Returns:
        accuracy, macro_f1 (mean over classes present in y_true), balanced_accuracy (mean recall over the same),
        per_class_recall, per_class_precision, per_class_f1, support (lists of length num_classes) and
        confusion_matrix (rows = true class, columns = predicted), num_examples.

    Raises:
        ValueError: empty input, lengths that differ, or labels outside 0..num_classes-1 (an empty evaluation has
            no accuracy, and averaging a placeholder into a round's results would hide it).
    """
    true = np.asarray(y_true).reshape(-1)
    pred = np.asarray(y_pred).reshape(-1)
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} labels but y_pred has {pred.size}")
    if true.size == 0:
        raise ValueError("no examples to evaluate")
    for name, values in (("y_true", true), ("y_pred", pred)):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices, got dtype {values.dtype}")
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = support > 0
    recall = [float(tp[k] / support[k]) if present[k] else None for k in range(num_classes)]
    precision = [float(tp[k] / predicted[k]) if predicted[k] else None for k in range(num_classes)]
    f1 = [float(2 * tp[k] / (support[k] + predicted[k])) if present[k] else None for k in range(num_classes)]
    return {
        "accuracy": float(tp.sum() / true.size),
        "macro_f1": float(np.mean([v for v in f1 if v is not None])),
        "balanced_accuracy": float(np.mean([v for v in recall if v is not None])),
        "per_class_recall": recall,
        "per_class_precision": precision,
        "per_class_f1": f1,
        "support": support.astype(int).tolist(),
        "confusion_matrix": confusion.astype(int).tolist(),
        "num_examples": int(true.size),
    }


def client_distribution(accuracies: Sequence[float]) -> dict:
    """How per-client accuracy is spread: mean, worst 10 %, min, max, std, n.

    `worst_10pct` is the mean of the ceil(10 % of n) lowest accuracies (at least one client), the fairness figure
    FL papers report: a federation can look good on average while its smallest sites are badly served. Clients
    count equally (not by examples), for the same reason. `std` is the population standard deviation (ddof=0):
    these are all the clients, not a sample of them. Non-finite values are rejected rather than averaged.

    Returns:
        mean, worst_10pct, min, max, std, median, n; all None (n=0) for an empty input.
    """
    values = np.asarray(list(accuracies), dtype=float)
    if values.size == 0:
        return {"mean": None, "worst_10pct": None, "min": None, "max": None, "std": None, "median": None, "n": 0}
    if not np.all(np.isfinite(values)):
        raise ValueError("client accuracies must be finite")
    worst_count = max(1, math.ceil(0.1 * values.size))
    return {
        "mean": float(values.mean()),
        "worst_10pct": float(np.sort(values)[:worst_count].mean()),
        "min": float(values.min()),
        "max": float(values.max()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "n": int(values.size),
    }
