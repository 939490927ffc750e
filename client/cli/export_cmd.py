"""`fer-client export`: the site's model as ONNX (optionally int8) for devices that run ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from client.cli.predict_cmd import ModelOption, StateDirOption


def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="The .onnx file to write (its card: OUT.json).")],
    model: ModelOption = None,
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="Quantise to int8 (static, calibrated).")] = False,
    calibration: Annotated[str, typer.Option(
        help="Faces for int8 calibration: a dataset spec (fer2013=PATH, faces=PATH, synthetic=N).")] = "synthetic=300",
    state_dir: StateDirOption = Path("fer-client-state"),
) -> None:
    """Export the model to ONNX with a dynamic batch axis (and optionally int8) for IoT devices."""
    from client.data.formats import DatasetError, load_dataset
    from client.data.preprocess import standardize
    from client.inference.export import ExportError, export_onnx
    from client.inference.model import load_torch_model, resolve_model

    if fmt != "onnx":
        raise click.BadParameter(f"{fmt!r}: the only format is onnx", param_hint="--format")
    if out.suffix != ".onnx":
        raise click.BadParameter(f"{out}: the file name must end in .onnx", param_hint="--out")
    torch_model, card = load_torch_model(resolve_model(model=model, runtime="torch", state_dir=state_dir))
    faces = None
    if int8:
        try:
            data = load_dataset(calibration, image_size=card.image_size, seed=0)
        except DatasetError as err:
            raise click.ClickException(f"--calibration: {err}") from None
        split = data.splits.get("train") or next(iter(data.splits.values()))
        faces = standardize(split.images[:512])
    try:
        path = export_onnx(torch_model, card, out, int8=int8, calibration_faces=faces)
    except ExportError as err:
        raise click.ClickException(f"{card.name}: cannot export ({err})") from None
    typer.echo(f"wrote {path} ({'int8' if int8 else 'float32'}, dynamic batch) and {path.name}.json")
