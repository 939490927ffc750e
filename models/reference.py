"""Reference weights shipped inside the package: models this project trained on FER2013's training split.

A reference is named `MODEL@DATASET` (`fer_vgg@fer2013`) and lives in `models/weights/` as two files (a name
ending in `-bn`, `fer_vgg@fer2013-bn`, is the BatchNorm build: for inference only, since federations train the
GroupNorm build and `--init-model` refuses it):

    MODEL@DATASET.safetensors   the state_dict (safetensors: tensors only, nothing to unpickle)
    MODEL@DATASET.json          its ModelCard (what models.files.load_model reads: architecture, options, sha256)
                                plus a "reference" block (ReferenceInfo: data, recipe, validation and PublicTest
                                scores per class, input format, the dataset's terms)

Wherever a model file is accepted (`fer-sim evaluate --model`, `--init-model` on `fer-sim run` and `fer-server
start`, `fer-client predict` / `watch` / `export --model`) a reference name is too: `load_model` resolves it here.
Nothing is downloaded: the files ship with the code. `benchmarks/make_reference.py` writes them from a
`benchmarks/bench_accuracy.py --save-model` run, so every figure in a card is one that script measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).with_name("weights")
SAFETENSORS_FORMAT = "safetensors"
WEIGHTS_SUFFIX = ".safetensors"
FER2013_TERMS = (
    "FER2013 (ICML 2013 representation-learning challenge) is distributed for research use only, with no licence "
    "file; weights trained on it inherit that restriction: research and evaluation, not clinical decisions."
)
BN_SUFFIX = "-bn"  # names the BatchNorm build of a reference (inference only)
_NAME = re.compile(r"^(?P<model>[a-z][a-z0-9_]*)@(?P<data>[a-z0-9][a-z0-9_-]*)$")


class UnknownReferenceError(ValueError):
    """A `MODEL@DATASET` name that no shipped reference has; the message lists the shipped ones."""


def is_reference_name(spec: str | Path) -> bool:
    """Whether `spec` has the shape of a reference name (MODEL@DATASET, no folder, no suffix)."""
    return bool(_NAME.match(str(spec)))


def list_references() -> list[str]:
    """The shipped reference names, sorted."""
    return sorted(path.stem for path in WEIGHTS_DIR.glob(f"*{WEIGHTS_SUFFIX}") if is_reference_name(path.stem))


def reference_path(name: str) -> Path:
    """The weights file of the shipped reference `name`.

    Raises:
        UnknownReferenceError: `name` is not shipped (the message lists what is).
    """
    path = WEIGHTS_DIR / f"{name}{WEIGHTS_SUFFIX}"
    if not is_reference_name(name) or not path.is_file():
        shipped = ", ".join(list_references()) or "none"
        raise UnknownReferenceError(f"unknown reference weights {name!r}; shipped: {shipped}")
    return path


def resolve_model_file(spec: str | Path) -> Path:
    """A model argument as a file: a reference name becomes its shipped file, anything else is a path.

    An existing file wins over a reference of the same name, so a user's own `fer_vgg@fer2013` file in the working
    directory is never silently replaced by ours.
    """
    path = Path(spec)
    if is_reference_name(spec) and not path.exists():
        return reference_path(str(spec))
    return path


@dataclass(frozen=True)
class SplitScore:
    """One split's figures for a reference model, without and with flip averaging (the mean softmax of each face
    and its mirror image), as `benchmarks/bench_accuracy.py` measured them."""

    accuracy: float
    macro_f1: float
    flip_accuracy: float
    flip_macro_f1: float
    per_class_recall: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "flip_accuracy": self.flip_accuracy,
                "flip_macro_f1": self.flip_macro_f1, "per_class_recall": dict(self.per_class_recall)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SplitScore:
        return cls(accuracy=float(data["accuracy"]), macro_f1=float(data["macro_f1"]),
                   flip_accuracy=float(data["flip_accuracy"]), flip_macro_f1=float(data["flip_macro_f1"]),
                   per_class_recall=dict(data.get("per_class_recall") or {}))


@dataclass(frozen=True)
class ReferenceInfo:
    """The "reference" block of a shipped card: how the weights were made and what they score.

    Attributes:
        data: what the model was trained on (and what was held out for validation).
        recipe: the TrainingRecipe it trained with, as its fields.
        epochs: passes over the training data.
        train_minutes: wall-clock training time, and on what (`hardware`).
        hardware: the machine and torch threads the time was measured on.
        validation: scores on the validation split carved from train (what choices were made on).
        public_test: scores on FER2013 PublicTest, measured once after training (never tuned on).
        input_format: what the model expects.
        terms: the dataset's terms, which the weights inherit.
        benchmark: the command that produced the figures.
    """

    data: str
    recipe: dict[str, Any]
    epochs: int
    train_minutes: float
    hardware: str
    validation: SplitScore
    public_test: SplitScore
    input_format: str
    terms: str
    benchmark: str

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data, "recipe": dict(self.recipe), "epochs": self.epochs,
            "train_minutes": self.train_minutes, "hardware": self.hardware, "validation": self.validation.to_json(),
            "public_test": self.public_test.to_json(), "input_format": self.input_format, "terms": self.terms,
            "benchmark": self.benchmark,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReferenceInfo:
        return cls(
            data=str(data["data"]), recipe=dict(data["recipe"]), epochs=int(data["epochs"]),
            train_minutes=float(data["train_minutes"]), hardware=str(data["hardware"]),
            validation=SplitScore.from_json(data["validation"]), public_test=SplitScore.from_json(data["public_test"]),
            input_format=str(data["input_format"]), terms=str(data["terms"]), benchmark=str(data["benchmark"]),
        )


def read_reference_info(name: str) -> ReferenceInfo:
    """The "reference" block of the shipped reference `name`'s card.

    Raises:
        UnknownReferenceError: `name` is not shipped.
        ValueError: its card has no well-formed "reference" block.
    """
    import json

    card_path = reference_path(name).with_suffix(".json")
    try:
        return ReferenceInfo.from_json(json.loads(card_path.read_text())["reference"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{card_path}: no well-formed reference block ({type(err).__name__}: {err})") from None


def best_reference() -> str | None:
    """The shipped reference with the highest flip-averaged PublicTest accuracy (the edge default), or None."""
    scored = [(read_reference_info(name).public_test.flip_accuracy, name) for name in list_references()]
    return max(scored)[1] if scored else None
