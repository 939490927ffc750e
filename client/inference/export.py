"""ONNX export (dynamic batch) and int8 quantisation, for IoT devices that run ONNX Runtime without PyTorch.

Two changes make the registered models exportable with the TorchScript exporter (the only one available: the
dynamo exporter needs onnxscript, which this project does not install):
  * a thin wrapper module is exported in eval mode (exporting the model directly failed for cnn_am, whose forward
    has a keyword-only flag, and a wrapper left in train mode would bake dropout into the graph);
  * nn.AdaptiveAvgPool2d becomes the nn.AvgPool2d it equals at the model's fixed input size: with a dynamic batch
    the exporter loses the spatial sizes and rejects adaptive pooling ("input size not accessible"). The swap is
    exact when the input side is a multiple of the output side, and refused otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from client.inference.model import ModelSpec, onnx_sidecar

OPSET = 17
INPUT_NAME = "faces"
OUTPUT_NAME = "logits"


class ExportError(Exception):
    """The model cannot be exported as asked; one line saying why."""


def export_onnx(model, card: ModelSpec, out: Path, *, int8: bool = False,
                calibration_faces: np.ndarray | None = None) -> Path:
    """Writes `out` (.onnx) and its card `out`.json; returns `out`.

    Args:
        model: the PyTorch model (left unchanged: a copy is prepared for export).
        card: its card; the exported card records int8 and the sha256 of the graph.
        out: target .onnx path. Written atomically (temporary file, then rename), so a failed export leaves
            nothing behind.
        int8: quantise to int8 (static, QDQ format, per-channel weights), calibrated on `calibration_faces`.
        calibration_faces: standardised (N, 1, S, S) float32 faces for int8 calibration; required with int8.
    """
    import torch
    from torch import nn

    from privacy.atomic import atomic_write  # the project's one atomic writer

    size = card.image_size
    prepared = _exportable(copy.deepcopy(model).eval(), size)

    class _Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, faces: torch.Tensor) -> torch.Tensor:
            return self.inner(faces)

    wrapper = _Logits(prepared).eval()
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        # The tracer warns about every shape-dependent Python branch; at the fixed input size they are constants.
        warnings.simplefilter("ignore")
        float_path = Path(scratch) / "float.onnx"
        torch.onnx.export(wrapper, (torch.zeros(2, 1, size, size),), str(float_path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        final = float_path
        if int8:
            if calibration_faces is None or len(calibration_faces) == 0:
                raise ExportError("int8 quantisation needs calibration faces")
            final = Path(scratch) / "int8.onnx"
            quantize_int8(float_path, final, calibration_faces)
        payload = final.read_bytes()
    exported = ModelSpec(name=card.name, cfg=card.cfg, image_size=size, classes=card.classes, source=card.source,
                         int8=int8)
    meta = {**exported.to_json(), "format": "onnx", "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "sha256": hashlib.sha256(payload).hexdigest()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, payload)
    atomic_write(onnx_sidecar(out), (json.dumps(meta, indent=2) + "\n").encode())
    return out


def quantize_int8(source: Path, target: Path, calibration_faces: np.ndarray) -> None:
    """Static int8 quantisation (QDQ, per-channel weights, MinMax calibration on the given faces).

    Static rather than dynamic: dynamic quantisation leaves convolutions to ConvInteger, which ONNX Runtime's CPU
    provider runs slower than float on these small models, and quantises activations per batch at run time.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    faces = np.ascontiguousarray(calibration_faces, dtype=np.float32)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{INPUT_NAME: faces[i:i + 16]} for i in range(0, len(faces), 16)])

        def get_next(self):
            return next(self._batches, None)

    # The quantiser logs advice ("consider pre-processing") on the root logger at WARNING for every model; a user
    # running `fer-client export` cannot act on it, so it is muted for this call only.
    logging.disable(logging.WARNING)
    try:
        quantize_static(str(source), str(target), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)


def _exportable(model, size: int):
    """Replaces each AdaptiveAvgPool2d by the fixed AvgPool2d it equals at input size `size` (see module doc)."""
    import torch
    from torch import nn

    inputs: dict[str, tuple[int, int]] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0].shape[-2:]))
             for name, module in model.named_modules() if isinstance(module, nn.AdaptiveAvgPool2d)]
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    for hook in hooks:
        hook.remove()
    for name, (height, width) in inputs.items():
        module = model.get_submodule(name)
        out_h, out_w = _pair(module.output_size, (height, width))
        if height % out_h or width % out_w:
            raise ExportError(f"{name}: adaptive pooling from {height}x{width} to {out_h}x{out_w} has no exact "
                              "fixed-kernel equivalent")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.AvgPool2d((height // out_h, width // out_w)))
    return model


def _pair(size, current: tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return tuple(c if s is None else int(s) for s, c in zip(size, current))
