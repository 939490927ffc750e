"""Personal adaptation (issue 14 item 5): a carer's corrections fine-tune a personal head for one patient or camera.

The federated model is trained on everyone; one patient may show expressions in their own way (a drooping mouth
at rest, a faint smile) that it misreads consistently. A carer labels some of that patient's faces, for example the
crops `fer-client watch --save-uncertain DIR` keeps, by moving them into emotion folders (`DIR/sad/*.png`), and
`fer-client adapt DIR --name bed-3` fits a personal head on them on the device.

What is trained, and why so little: the whole federated network is frozen (`forward_features` and `forward_head`,
run once in eval mode on each correction) and the personal head is a remap of its seven logits, z' = A z + c, fitted
with Adam and a penalty `anchor/2 * (||A - I||^2 + ||c||^2)` that keeps it at the federated head wherever the
corrections say nothing (fit_head says why this beat refitting the last layer). A few dozen corrections cannot
retrain a convolutional network without overfitting it, but they can say "this patient's resting face is what the
model calls sad". The remap folds into the last linear layer (`classifier`), so the head is saved and run as that
layer; the fit takes milliseconds once the logits are computed.

Where the result lives, and what never reads it: `STATE_DIR/personal/NAME.pt` (the two tensors of the layer,
loaded with weights_only=True) and `NAME.json` (a PersonalCard: base model sha256, classes, corrections, date).
The federated weights are not touched, the ClientApp never opens `personal/` (tests/test_adapt.py watches every
file it opens during a training round), so a personal head never leaves the device and never enters the next
federated round. `predict` and `watch` use one only when asked (`--personal NAME`), and only on the federated
model it was fitted on: after a new model is delivered its embedding differs, and the head must be refitted.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import click
import cv2
import numpy as np

from client.data.labels import EMOTIONS, label_of
from client.data.preprocess import FacePreprocessor, standardize, to_gray
from client.inference.media import IMAGE_SUFFIXES, MediaError, read_image
from client.inference.model import Classifier, ModelUnavailable, TorchClassifier, _first_line, load_torch_model
from privacy.atomic import atomic_write

PERSONAL_DIR = "personal"
# The layer a personal head replaces; every registered model ends in it (models/cnn_am.py, models/dmsnet.py).
HEAD_LAYER = "classifier"
# A name becomes a file name: no separators, no leading dot, nothing a shell or a path would reinterpret.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdaptError(click.ClickException):
    """Bad corrections or a personal head that cannot be used; the message is one line naming the file or name."""


@dataclass(frozen=True)
class AdaptSettings:
    """How the personal head is fitted.

    Attributes:
        epochs: passes over the corrections (mini-batches of `batch_size`).
        lr: Adam's learning rate.
        anchor: weight of the penalty towards the federated head (0: free fit).
        batch_size: corrections per step.
        seed: order of the mini-batches.
    """

    epochs: int = 100
    lr: float = 1e-2
    anchor: float = 0.3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.anchor < 0:
            raise AdaptError(f"adapt settings: epochs and batch size at least 1, lr positive, anchor at least 0 "
                             f"(got epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}, "
                             f"anchor={self.anchor})")


@dataclass(frozen=True)
class Corrections:
    """Labelled faces of one patient, aligned crops as the model sees them.

    Attributes:
        faces: uint8 (N, S, S).
        labels: int64 (N,) in EMOTIONS order.
    """

    faces: np.ndarray
    labels: np.ndarray

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == k).sum()) for k, name in enumerate(EMOTIONS) if (self.labels == k).any()}


@dataclass(frozen=True)
class PersonalCard:
    """What a personal head is and what it was fitted on; written beside its weights.

    Attributes:
        name: the patient or camera it belongs to (the file's stem).
        base_model: registered architecture of the federated model it extends.
        base_sha256: sha256 of that model's weights file; the head is refused on any other.
        classes: output order.
        layers: state_dict keys the head replaces.
        corrections: number of labelled faces it was fitted on, and their count per expression.
        created: UTC time of the fit, ISO 8601.
        sha256: sha256 of the head's own weights file.
        accuracy_before: the federated model's accuracy on the corrections.
        accuracy_after: the personal head's accuracy on the same corrections (a fit, not a held-out figure).
        settings: the AdaptSettings used.
    """

    name: str
    base_model: str
    base_sha256: str
    classes: tuple[str, ...]
    layers: tuple[str, ...]
    corrections: int
    per_class: dict[str, int]
    created: str
    sha256: str
    accuracy_before: float
    accuracy_after: float
    settings: AdaptSettings

    def to_json(self) -> dict:
        return {"name": self.name, "base_model": self.base_model, "base_sha256": self.base_sha256,
                "classes": list(self.classes), "layers": list(self.layers), "corrections": self.corrections,
                "per_class": dict(self.per_class), "created": self.created, "sha256": self.sha256,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "settings": vars(self.settings).copy()}

    @classmethod
    def from_json(cls, data: dict) -> PersonalCard:
        return cls(name=str(data["name"]), base_model=str(data["base_model"]), base_sha256=str(data["base_sha256"]),
                   classes=tuple(data["classes"]), layers=tuple(data["layers"]), corrections=int(data["corrections"]),
                   per_class={str(k): int(v) for k, v in data["per_class"].items()}, created=str(data["created"]),
                   sha256=str(data["sha256"]), accuracy_before=float(data["accuracy_before"]),
                   accuracy_after=float(data["accuracy_after"]), settings=AdaptSettings(**data["settings"]))


def personal_paths(state_dir: Path, name: str) -> tuple[Path, Path]:
    """(weights, card) of the personal head `name` in a node's state directory.

    Raises:
        AdaptError: `name` is not a plain file name (letters, digits, '.', '_', '-'; at most 64).
    """
    if not _NAME.fullmatch(name):
        raise AdaptError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 64, not starting with '.')")
    folder = state_dir / PERSONAL_DIR
    return folder / f"{name}.pt", folder / f"{name}.json"


def read_corrections(folder: Path, *, image_size: int, detector: FacePreprocessor | None = None) -> Corrections:
    """Reads `folder/<emotion>/*` (an image per face; folder names as dataset folders, e.g. sad or sadness).

    An image `image_size` pixels square is taken as an aligned crop, as `watch --save-uncertain` writes them;
    anything else is a picture in which the face is found and aligned as in training. Files at the top level are not
    labelled yet and are not used (count_unlabelled); hidden files are skipped.

    Raises:
        AdaptError: the folder is missing or holds no labelled image, a subfolder is not an emotion, a file is not
            an image, cannot be read, or shows no face: one line naming it (nothing is fitted on partial input).
    """
    if not folder.is_dir():
        raise AdaptError(f"{folder}: no such folder of corrections")
    # OpenCV's decoders print their own warnings for a damaged file; the error below is the one line that names it.
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        faces, labels = _read_labelled(folder, image_size=image_size, detector=detector)
    finally:
        cv2.utils.logging.setLogLevel(previous)
    if not faces:
        raise AdaptError(f"{folder}: no labelled images (put each face in an emotion folder, e.g. {folder}/sad/)")
    return Corrections(faces=np.stack(faces), labels=np.array(labels, dtype=np.int64))


def _read_labelled(folder: Path, *, image_size: int, detector: FacePreprocessor | None) -> tuple[list, list]:
    faces, labels = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.is_file():
            continue
        label = label_of(entry.name)
        if label is None:
            raise AdaptError(f"{entry}: not an emotion folder (use one of {', '.join(EMOTIONS)})")
        for path in sorted(entry.iterdir()):
            if path.name.startswith("."):
                continue
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                raise AdaptError(f"{path}: not an image file")
            faces.append(_face_of(path, image_size=image_size, detector=detector))
            labels.append(label)
    return faces, labels


def count_unlabelled(folder: Path) -> int:
    """Image files at the top of a corrections folder: crops not sorted into an emotion folder yet, so not used."""
    return sum(1 for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def _face_of(path: Path, *, image_size: int, detector: FacePreprocessor | None) -> np.ndarray:
    try:
        gray = to_gray(read_image(path))
    except MediaError as err:
        raise AdaptError(str(err)) from None
    if gray.shape == (image_size, image_size):
        return gray
    face = (detector or FacePreprocessor(size=image_size)).process(gray)
    if face is None:
        raise AdaptError(f"{path}: no face found (give a picture with a visible face, or a {image_size}x{image_size} "
                         f"aligned crop as watch --save-uncertain writes)")
    return face


def embed(model, faces: np.ndarray, *, batch: int = 256):
    """The frozen part of `model`: pre-logit embeddings (N, D) of uint8 faces, in eval mode and without gradients."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():  # not inference_mode: the embeddings are the input of fit_head's autograd graph
        for start in range(0, len(faces), batch):
            x = torch.from_numpy(standardize(faces[start:start + batch]))
            out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out)


def fit_head(base_layer, embeddings, labels: np.ndarray, settings: AdaptSettings) -> dict:
    """Fits the personal head on the corrections' embeddings; returns the state_dict of the layer it amounts to.

    The head is a remap of the federated logits, z' = A z + c (A 7x7 from the identity, c from zero), fitted with
    cross-entropy + anchor/2 * (||A - I||^2 + ||c||^2). Since z = W h + b, the result is one linear layer
    (A W, A b + c) of the federated layer's shape, which is what is saved and swapped in.

    Why a remap of the logits rather than refitting W: a patient who is misread systematically (their resting face
    read as sad) is a confusion between classes, which 56 numbers express; refitting the 903 of W on a few dozen
    faces also fits their noise. benchmarks/bench_adapt.py measured both on the simulated patient (70 corrections):
    refitting W took the patient from 31 % to 57 % and cost a control patient who needs no correction 6 points;
    the remap took the patient to 66 % and cost the control patient nothing.
    """
    import torch

    with torch.no_grad():
        logits = base_layer(embeddings)
    classes = logits.shape[1]
    remap = torch.nn.Linear(classes, classes)
    with torch.no_grad():
        remap.weight.copy_(torch.eye(classes))
        remap.bias.zero_()
    start = {key: value.detach().clone() for key, value in remap.state_dict().items()}
    targets = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(remap.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.enable_grad():
        for _ in range(settings.epochs):
            for batch in torch.randperm(len(targets), generator=generator).split(settings.batch_size):
                loss = torch.nn.functional.cross_entropy(remap(logits[batch]), targets[batch])
                if settings.anchor:
                    loss = loss + settings.anchor / 2 * sum(((param - start[key]) ** 2).sum()
                                                            for key, param in remap.named_parameters())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        return {"weight": remap.weight @ base_layer.weight, "bias": remap.weight @ base_layer.bias + remap.bias}


def adapt(*, base: Path, corrections: Path | Corrections, name: str, state_dir: Path,
          settings: AdaptSettings | None = None) -> PersonalCard:
    """Fits and saves the personal head `name` for the federated model at `base` (a model.pt with its model.json).

    `corrections` is a folder (read_corrections, at the base model's face size) or faces already read.

    The base file is only read. The head is written to STATE_DIR/personal/ (folder 0700, files 0600: it is fitted
    on a patient's faces), weights first and then the card naming their sha256, each atomically.

    Raises:
        AdaptError, ModelUnavailable: a bad name or a base model that cannot be loaded or has no `classifier`.
    """
    import torch

    settings = settings or AdaptSettings()
    weights_path, card_path = personal_paths(state_dir, name)
    model, spec = load_torch_model(base)
    if not isinstance(corrections, Corrections):
        corrections = read_corrections(corrections, image_size=spec.image_size)
    layer = getattr(model, HEAD_LAYER, None)
    if not isinstance(layer, torch.nn.Linear):
        raise AdaptError(f"{base}: model {spec.name} has no final linear layer {HEAD_LAYER!r} to personalise")
    embeddings = embed(model, corrections.faces)
    state = fit_head(layer, embeddings, corrections.labels, settings)
    personal = copy.deepcopy(layer)
    personal.load_state_dict(state)
    with torch.no_grad():
        before = _accuracy(layer(embeddings), corrections.labels)
        after = _accuracy(personal(embeddings), corrections.labels)
    buffer = io.BytesIO()
    torch.save({f"{HEAD_LAYER}.{key}": value for key, value in state.items()}, buffer)
    payload = buffer.getvalue()
    card = PersonalCard(name=name, base_model=spec.name, base_sha256=_sha256(base.read_bytes()),
                        classes=spec.classes, layers=tuple(f"{HEAD_LAYER}.{key}" for key in state),
                        corrections=len(corrections.labels), per_class=corrections.counts(),
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        sha256=_sha256(payload), accuracy_before=round(before, 4), accuracy_after=round(after, 4),
                        settings=settings)
    weights_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(weights_path, payload, mode=0o600)
    atomic_write(card_path, json.dumps(card.to_json(), indent=2) + "\n", mode=0o600)
    return card


def load_personal(state_dir: Path, name: str) -> tuple[dict, PersonalCard]:
    """Reads the personal head `name`: (state_dict of the replaced layer, its card), weights_only=True.

    Raises:
        AdaptError: missing, unreadable, or weights that do not match the card's sha256.
    """
    import torch

    weights_path, card_path = personal_paths(state_dir, name)
    if not card_path.is_file() or not weights_path.is_file():
        raise AdaptError(f"--personal {name}: no personal head in {card_path.parent} (make one with fer-client adapt)")
    try:
        card = PersonalCard.from_json(json.loads(card_path.read_text()))
        payload = weights_path.read_bytes()
        if _sha256(payload) != card.sha256:
            raise ValueError(f"{weights_path.name} does not match the sha256 in {card_path.name}")
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AdaptError) as err:
        raise AdaptError(f"{card_path.parent / name}: cannot read the personal head ({_first_line(err)})") from None
    if not isinstance(state, dict) or set(state) != set(card.layers):
        raise AdaptError(f"{weights_path}: holds {sorted(state) if isinstance(state, dict) else type(state).__name__}, "
                         f"the card names {list(card.layers)}")
    return state, card


def with_personal(classifier: Classifier, *, name: str, state_dir: Path) -> Classifier:
    """`classifier` with its last layer replaced by the personal head `name` (the federated model is not changed).

    Raises:
        AdaptError: not a PyTorch model, or the head was fitted on another model than the one in use.
    """
    if classifier.runtime != "torch":
        raise AdaptError(f"--personal {name}: personal heads run with --runtime torch (the exported graph has the "
                         f"federated head built in)")
    state, card = load_personal(state_dir, name)
    spec = classifier.card
    current = _sha256(Path(spec.source).read_bytes())
    if card.base_sha256 != current or card.base_model != spec.name or card.classes != spec.classes:
        raise AdaptError(f"--personal {name}: fitted on {card.base_model} {card.base_sha256[:12]}, but the model in "
                         f"use is {spec.name} {current[:12]} ({spec.source}): run fer-client adapt again")
    model = copy.deepcopy(classifier.model)
    unknown = set(state) - set(model.state_dict())
    if unknown:  # load_state_dict(strict=False) would skip them silently
        raise AdaptError(f"--personal {name}: {sorted(unknown)} are not layers of {spec.name}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ModelUnavailable(f"--personal {name}: does not fit {spec.name} ({_first_line(err)})") from None
    return TorchClassifier(model, spec)


def _accuracy(logits, labels: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == labels).mean())


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()
