"""`fer-client predict`: expressions in image files, folders and video files, one JSON line per face.

Output lines (stdout):
    {"file": ..., "box": [x, y, w, h], "emotion": ..., "confidence": p, "probabilities": {...}}
    {"file": ..., "frame": i, "time": s, ...}                     for a video frame
    {"file": ..., "face": null}                                     no face found (an image, or a video frame)
    {"file": ..., "error": "..."}                                   unreadable / corrupt / truncated file
Exit code: 0 when every file could be read (finding no face is a result, not a failure); 1 when any file could
not be read: every other file has still been processed and printed, and each failure is also one line on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import click
import cv2
import typer

from client.data.labels import EMOTIONS

RuntimeOption = Annotated[str, typer.Option("--runtime", help="torch (model.pt) or onnx (a `fer-client export`ed "
                                                             ".onnx).")]
ModelOption = Annotated[Path | None, typer.Option(
    "--model", "-m", help="A run's model.pt (model.json beside it), a shipped reference (fer_vgg@fer2013), or a "
                          ".onnx with --runtime onnx. Default: the latest delivered model, else the best shipped "
                          "reference.")]
StateDirOption = Annotated[Path, typer.Option(help="This node's state directory (where delivered models will be "
                                                   "looked for).")]
PersonalOption = Annotated[str | None, typer.Option(
    "--personal", help="Use the personal head NAME (fer-client adapt) from --state-dir; PyTorch runtime only.")]


def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files, video files, or folders of them.")],
    model: ModelOption = None,
    runtime: RuntimeOption = "torch",
    annotate_dir: Annotated[Path | None, typer.Option(
        "--annotate", help="Write copies with boxes and labels here (images as PNG, videos as MJPG .avi).")] = None,
    detector: Annotated[str, typer.Option(help="haar (bundled with OpenCV) or yunet.")] = "haar",
    yunet_model: Annotated[Path | None, typer.Option(help="YuNet .onnx file for --detector yunet.")] = None,
    state_dir: StateDirOption = Path("fer-client-state"),
    personal: PersonalOption = None,
) -> int:
    """Recognise expressions in images and videos: one JSON line per face."""
    from client.inference.media import MediaError, expand_inputs
    from client.inference.model import open_classifier
    from client.inference.pipeline import FramePipeline

    classifier = open_classifier(model=model, runtime=runtime, state_dir=state_dir, personal=personal)
    try:
        files = expand_inputs(paths)
    except MediaError as err:
        raise click.ClickException(str(err)) from None
    pipeline = FramePipeline(classifier=classifier, detector=detector,
                             yunet_model=None if yunet_model is None else str(yunet_model))
    failed = 0
    for path in files:
        try:
            _predict_file(path, pipeline, annotate_dir=annotate_dir)
        except MediaError as err:
            failed += 1
            _emit({"file": str(path), "error": str(err)})
            print(f"fer-client: {err}", file=sys.stderr)
    if failed:
        print(f"fer-client: {failed} of {len(files)} files could not be read", file=sys.stderr)
    return 1 if failed else 0


def _predict_file(path: Path, pipeline, *, annotate_dir: Path | None) -> None:
    from client.inference.media import is_video, iter_video, read_image, video_fps

    pipeline.reset()
    if not is_video(path):
        image = read_image(path)
        records, drawn = _frame_records(pipeline, image, {"file": str(path)}, annotate_dir is not None)
        for record in records:
            _emit(record)
        if annotate_dir is not None:
            annotate_dir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(annotate_dir / f"{path.stem}.png"), drawn if drawn is not None else image)
        return
    writer = None
    try:
        for frame in iter_video(path):
            base = {"file": str(path), "frame": frame.index, "time": frame.time}
            records, drawn = _frame_records(pipeline, frame.image, base, annotate_dir is not None)
            for record in records:
                _emit(record)
            if annotate_dir is not None:
                if writer is None:
                    annotate_dir.mkdir(parents=True, exist_ok=True)
                    height, width = frame.image.shape[:2]
                    writer = cv2.VideoWriter(str(annotate_dir / f"{path.stem}.avi"),
                                             cv2.VideoWriter_fourcc(*"MJPG"), video_fps(path), (width, height))
                writer.write(drawn if drawn is not None else frame.image)
    finally:
        if writer is not None:
            writer.release()


def _frame_records(pipeline, image, base: dict, draw: bool) -> tuple[list[dict], object]:
    """(JSON records, annotated frame or None) for one frame: one record per face, or one "no face" record."""
    from client.inference.pipeline import annotate

    observations = pipeline.process(image)
    if not observations:
        return [{**base, "face": None}], None
    drawn = image if draw else None
    records = []
    for observation in observations:
        probabilities = observation.probabilities
        records.append({**base, "box": list(observation.box), "emotion": observation.emotion,
                        "confidence": round(float(probabilities.max()), 4),
                        "probabilities": {name: round(float(p), 4) for name, p in zip(EMOTIONS, probabilities)}})
        if draw:
            drawn = annotate(drawn, observation.box, f"{observation.emotion} {probabilities.max():.2f}")
    return records, drawn


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
