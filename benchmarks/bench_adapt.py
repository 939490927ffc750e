"""Personal adaptation on a simulated patient: accuracy against the number of corrections, for the personal head
`fer-client adapt` fits (a remap of the federated logits) and for refitting the last layer instead (issue 14 item 5;
client/inference/adapt.py).

A cnn_am (width 0.25) is trained on ordinary synthetic faces (tests/adapt_builds.py), then personal heads are fitted
on N corrections of tests/adapt_builds.PATIENT (whose neutral/sad and happy/surprise faces are swapped) and of a
control patient (the same identity without the shift, whom the federated model already reads as well as anyone).
Reported per row: the patient's held-out accuracy with the federated model and with the personal head; everyone
else's with the federated model (what they are served: adapt never changes it) and, as a diagnostic, with this
patient's head (what applying a head to the wrong people would cost).

Usage: .venv/bin/python benchmarks/bench_adapt.py [--corrections 14,35,70,140] [--anchors 0.3]
Writes benchmarks/results/bench_adapt.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from client.data.synthetic import Patient, make_synthetic  # noqa: E402
from client.inference.adapt import AdaptSettings, Corrections, adapt, embed, with_personal  # noqa: E402
from client.inference.model import TorchClassifier, load_classifier  # noqa: E402
from tests.adapt_builds import (CORRECTION_SEED, OTHERS_TEST_SEED, PATIENT, PATIENT_TEST_SEED, accuracy,  # noqa: E402
                                train_synthetic_base)

RESULT = REPO / "benchmarks" / "results" / "bench_adapt.json"


def refit_last_layer(federated: TorchClassifier, faces, labels, *, anchor: float = 0.1, epochs: int = 50,
                     lr: float = 1e-2, batch: int = 64, seed: int = 0) -> TorchClassifier:
    """The alternative adapt does not use: Adam on the last layer's own 903 numbers, pulled towards the federated
    ones by anchor/2 * squared distance (defaults: the best of a small sweep on this patient)."""
    model = copy.deepcopy(federated.model)
    hidden = embed(model, faces)
    layer = model.classifier
    start = {key: value.detach().clone() for key, value in layer.state_dict().items()}
    targets = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(targets), generator=generator).split(batch):
            loss = torch.nn.functional.cross_entropy(layer(hidden[index]), targets[index])
            loss = loss + anchor / 2 * sum(((p - start[k]) ** 2).sum() for k, p in layer.named_parameters())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return TorchClassifier(model.eval(), federated.card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corrections", default="14,35,70,140")
    parser.add_argument("--anchors", default="0.3", help="anchor values for adapt's head")
    args = parser.parse_args()
    counts = [int(v) for v in args.corrections.split(",")]
    anchors = [float(v) for v in args.anchors.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        base = train_synthetic_base(root / "federated")
        train_seconds = time.perf_counter() - start
        federated = load_classifier(base, runtime="torch")
        others = make_synthetic(700, seed=OTHERS_TEST_SEED)
        rows = []
        for kind, who in (("shifted", PATIENT), ("control", Patient(identity_seed=PATIENT.identity_seed))):
            patient = make_synthetic(420, seed=PATIENT_TEST_SEED, patient=who)
            for count in counts:
                faces, labels = make_synthetic(count, seed=CORRECTION_SEED, patient=who)
                heads = {}
                for anchor in anchors:
                    adapt(base=base, corrections=Corrections(faces=faces, labels=labels), name="bench",
                          state_dir=root / "state", settings=AdaptSettings(anchor=anchor))
                    heads[f"adapt (logit remap, anchor {anchor:g})"] = with_personal(
                        federated, name="bench", state_dir=root / "state")
                heads["last layer refitted (anchor 0.1)"] = refit_last_layer(federated, faces, labels)
                for head, personal in heads.items():
                    row = {"patient": kind, "corrections": count, "head": head,
                           "patient_federated": accuracy(federated, *patient),
                           "patient_personal": accuracy(personal, *patient),
                           "others_federated": accuracy(federated, *others),
                           "others_with_patients_head": accuracy(personal, *others)}
                    rows.append(row)
                    print(f"{kind:8s} N={count:4d} {head:34s} patient {row['patient_federated']:.3f} -> "
                          f"{row['patient_personal']:.3f}; everyone else {row['others_federated']:.3f} (federated), "
                          f"{row['others_with_patients_head']:.3f} (if given this head)", flush=True)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({"machine": platform.platform(), "base_train_seconds": round(train_seconds, 1),
                                  "patient_held_out": 420, "others_held_out": 700, "rows": rows}, indent=2) + "\n")
    print(f"base model trained in {train_seconds:.1f} s; wrote {RESULT}")


if __name__ == "__main__":
    main()
