"""Which model a site runs, and the runtimes that run it.

`resolve_model` is the one place that decides where the weights come from: `--model PATH`, else the latest model
a federation delivered into the node's state directory (issue 14 item 1, client/delivery.py), else the reference
weights shipped with the package (a slot not filled yet). When none gives a model the user gets one line that says
what to pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import click
import numpy as np

from client.data.labels import EMOTIONS

RUNTIMES = ("torch", "onnx")
ONNX_SUFFIX = ".onnx"


class ModelUnavailable(click.ClickException):
    """No model could be found or loaded; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """What a runtime needs to know about the weights it runs, read from the JSON sidecar beside them (not the
    federation's model card of item 1, which will carry provenance and metrics; this is only how to run them).

    Attributes:
        name: registered architecture name (models.list_models()).
        cfg: the run's model options as saved by RunDirectory.save_model ({"dp": bool, other factory options}).
        image_size: side of the square face the model takes.
        classes: output order of the logits.
        source: the file the weights were read from.
        int8: the weights are an int8-quantised ONNX graph.
    """

    name: str
    cfg: dict
    image_size: int
    classes: tuple[str, ...]
    source: Path
    int8: bool = False

    def to_json(self) -> dict:
        return {"name": self.name, "cfg": dict(self.cfg), "image_size": self.image_size,
                "classes": list(self.classes), "source": str(self.source), "int8": self.int8}

    @classmethod
    def from_json(cls, data: dict, *, source: Path) -> ModelSpec:
        name = data.get("name") or data.get("model")
        if not name:
            raise KeyError("the sidecar names no model")
        classes = tuple(data.get("classes") or EMOTIONS)
        if classes != EMOTIONS:
            raise ValueError(f"classes {list(classes)} are not this project's {list(EMOTIONS)}")
        return cls(name=str(name), cfg=dict(data.get("cfg") or {}), image_size=int(data.get("image_size", 48)),
                   classes=classes, source=source, int8=bool(data.get("int8", False)))


def resolve_model(*, model: Path | None, runtime: str = "torch", state_dir: Path | None = None) -> Path:
    """Returns the weights file to run, trying the sources in order of preference.

    Order: `model` (an explicit --model PATH, or a shipped reference's name such as `fer_vgg@fer2013`); then the
    latest model delivered to `state_dir` by a federation (PyTorch runtime); then the most accurate reference
    weights shipped with the package (models/reference.py). Without any, the answer is a one-line error naming the
    fix.

    Raises:
        ModelUnavailable: no source gives a model, or the named file does not fit the runtime.
    """
    if runtime not in RUNTIMES:
        raise ModelUnavailable(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if model is not None:
        from models.reference import UnknownReferenceError, resolve_model_file

        try:
            model = resolve_model_file(model)
        except UnknownReferenceError as err:
            raise ModelUnavailable(f"--model: {err}") from None
        if not model.is_file():
            raise ModelUnavailable(f"--model {model}: no such file")
        if (model.suffix == ONNX_SUFFIX) != (runtime == "onnx"):
            wanted = ("an exported .onnx file (fer-client export)" if runtime == "onnx"
                      else "a run's model.pt or a reference name")
            raise ModelUnavailable(f"--model {model}: --runtime {runtime} needs {wanted}")
        return model
    for candidate in (_delivered_model(state_dir, runtime), _reference_weights(runtime)):
        if candidate is not None:
            return candidate
    if runtime == "onnx":
        raise ModelUnavailable("no model available: --runtime onnx needs --model FILE.onnx (`fer-client export` "
                               "writes one from a delivered model or a shipped reference such as fer_vgg@fer2013)")
    raise ModelUnavailable(
        "no model available: pass --model PATH (a run's model.pt, or a .onnx from `fer-client export` with "
        "--runtime onnx); no federation has delivered one to this node and no reference weights are installed"
    )


def _delivered_model(state_dir: Path | None, runtime: str) -> Path | None:
    """The latest model a federation delivered into `state_dir/models` (client/delivery.py), for the PyTorch
    runtime; delivered models are .pt files, so an ONNX runtime needs `fer-client export` first."""
    if runtime != "torch":
        return None
    from client.delivery import latest_delivered

    return latest_delivered(state_dir)


def _reference_weights(runtime: str) -> Path | None:
    """The shipped reference with the best FER2013 PublicTest accuracy (models/reference.py), for the PyTorch
    runtime; None when none is installed."""
    if runtime != "torch":
        return None
    from models.reference import best_reference, reference_path

    name = best_reference()
    return None if name is None else reference_path(name)


class Classifier(Protocol):
    """Standardised faces (N, 1, S, S) float32 in, logits (N, 7) float32 out."""

    card: ModelSpec
    runtime: str

    def logits(self, faces: np.ndarray) -> np.ndarray: ...


class TorchClassifier:
    """A registered model in eval mode on the CPU."""

    runtime = "torch"

    def __init__(self, model, card: ModelSpec) -> None:
        import torch

        self._torch = torch
        self.model = model.eval()
        self.card = card

    def logits(self, faces: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(self._torch.from_numpy(np.ascontiguousarray(faces))).numpy()


class OnnxClassifier:
    """An exported ONNX graph under ONNX Runtime's CPU provider."""

    runtime = "onnx"

    def __init__(self, path: Path, card: ModelSpec, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self.card = card

    def logits(self, faces: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(faces, dtype=np.float32)})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (then float32), stable for large logits."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def onnx_sidecar(path: Path) -> Path:
    """The JSON card beside an exported graph: model.onnx -> model.onnx.json (never model.json, the .pt's card)."""
    return path.with_name(path.name + ".json")


def build_torch_model(card: ModelSpec):
    """The registered architecture the card names, with the options it was trained with (no weights)."""
    from models.files import build_model

    return build_model(card)


def load_torch_model(path: Path):
    """Reads a run's model.pt + model.json into (model in eval mode, card).

    Raises:
        ModelUnavailable: missing sidecar, sha256 mismatch, unknown architecture or weights that do not fit.
    """
    # The one model-file reader (models/files.py): weights_only=True and the sha256 beside the file are checked, so
    # a checkpoint is data, never code, and a truncated or replaced file is refused; delivered models (issue 14
    # item 1, client/delivery.py) use the same format.
    from models.files import load_model

    try:
        state, saved = load_model(path)
        card = ModelSpec.from_json(saved.to_json(), source=path)
        model = build_torch_model(card)
        model.load_state_dict(state)
    except FileNotFoundError as err:
        raise ModelUnavailable(str(err)) from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as err:
        raise ModelUnavailable(f"{path}: cannot load the model ({_first_line(err)})") from None
    return model.eval(), card


def load_classifier(path: Path, *, runtime: str, threads: int | None = None) -> Classifier:
    """The runtime for a resolved weights file (see resolve_model).

    Raises:
        ModelUnavailable: the file or its card cannot be read, in one line naming it.
    """
    if runtime == "torch":
        model, card = load_torch_model(path)
        return TorchClassifier(model, card)
    sidecar = onnx_sidecar(path)
    try:
        card = ModelSpec.from_json(json.loads(sidecar.read_text()), source=path)
    except FileNotFoundError:
        raise ModelUnavailable(f"{sidecar} (written by `fer-client export` beside the graph) is missing") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise ModelUnavailable(f"{sidecar}: not a model card ({_first_line(err)})") from None
    try:
        return OnnxClassifier(path, card, threads=threads)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types for a bad graph
        raise ModelUnavailable(f"{path}: ONNX Runtime cannot load it ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_classifier(*, model: Path | None, runtime: str, state_dir: Path | None = None,
                    threads: int | None = None, personal: str | None = None) -> Classifier:
    """resolve_model + load_classifier (+ the personal head `personal` from state_dir): what predict and watch call."""
    classifier = load_classifier(resolve_model(model=model, runtime=runtime, state_dir=state_dir), runtime=runtime,
                                 threads=threads)
    if personal is None:
        return classifier
    from client.inference.adapt import with_personal  # adapt imports this module

    return with_personal(classifier, name=personal, state_dir=state_dir or Path("."))
