"""End-to-end bedside inference speed: frames per second and latency at batch 1 on 640x480 video frames.

Per model (every registered one) and runtime (PyTorch, ONNX Runtime float32, ONNX Runtime int8), each frame goes
through the whole `fer-client watch` path: decode (cv2.VideoCapture on an MJPG file), Haar detection, eye alignment,
standardisation, classification, IoU tracking and EMA smoothing. Reported: FPS, p50/p95 latency, the detector's
share, and the same with the detector run on every k-th frame only (the last alignment reused in between) and
on a copy of the frame shrunk to 320 wide.

int8's accuracy cost: with --model PATH (a trained run's model.pt) and FER2013 present, float and int8 accuracy on
FER2013's PublicTest, the int8 graph calibrated on 256 faces of FER2013's training split; otherwise (no trained
weights) the agreement of int8's top-1 with the float graph's on synthetic faces, said so in the output. Weights do not change speed, so the speed rows use untrained builds.

Usage: .venv/bin/python benchmarks/bench_inference.py [--frames 60] [--k 3] [--models cnn_am,dmsnet_iot]
       [--model runs/x/model.pt] [--fer2013 ../shared/data/fer2013]
Writes benchmarks/results/bench_inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.data.labels import EMOTIONS  # noqa: E402
from client.data.preprocess import standardize  # noqa: E402
from client.data.synthetic import make_synthetic  # noqa: E402
from client.inference.export import export_onnx  # noqa: E402
from client.inference.model import ModelSpec, TorchClassifier, load_classifier, load_torch_model, softmax  # noqa: E402
from client.inference.pipeline import FramePipeline  # noqa: E402
from client.inference.tracking import FaceTracker  # noqa: E402
from models import create_model, list_models  # noqa: E402
from privacy.atomic import atomic_write  # noqa: E402
from tests.inference_builds import pick_faces, write_video  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "bench_inference.json"
PLAN_EMOTIONS = ("neutral", "sad", "happy", "surprise")


def run_stream(video: Path, classifier, *, detect_every: int, frames: int, detect_width: int = 0) -> dict:
    """Times `frames` frames of the watch loop (decode -> detect/align -> classify -> track + smooth)."""
    pipeline = FramePipeline(classifier=classifier, detect_every=detect_every, detect_width=detect_width)
    tracker = FaceTracker(half_life=0.5)
    capture = cv2.VideoCapture(str(video))
    fps_declared = capture.get(cv2.CAP_PROP_FPS) or 10.0
    latencies, decode, smooth, faces = [], 0.0, 0.0, 0
    try:
        for index in range(frames):
            start = time.perf_counter()
            ok, image = capture.read()
            decoded = time.perf_counter()
            if not ok:
                capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, image = capture.read()
                decoded = time.perf_counter()
            observations = pipeline.process(image)
            before_smooth = time.perf_counter()
            tracker.update([(o.box, o.probabilities) for o in observations], time=index / fps_declared)
            end = time.perf_counter()
            latencies.append(end - start)
            decode += decoded - start
            smooth += end - before_smooth
            faces += len(observations)
    finally:
        capture.release()
    ms = np.array(latencies) * 1000.0
    return {
        "frames": frames,
        "faces_found": faces,
        "fps": frames / float(np.sum(latencies)),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "decode_ms": 1000.0 * decode / frames,
        "detect_ms_per_frame": 1000.0 * pipeline.times.detect / frames,
        "detect_ms_per_call": 1000.0 * pipeline.times.detect / max(1, pipeline.times.detections),
        "classify_ms": 1000.0 * pipeline.times.classify / max(1, pipeline.times.classifications),
        "smooth_ms": 1000.0 * smooth / frames,
    }


def int8_cost(float_clf, int8_clf, *, model_path: Path | None, fer2013: Path | None) -> dict:
    """int8 accuracy cost: FER2013 PublicTest accuracy with a trained model, else top-1 agreement on synthetic faces."""
    if model_path is not None and fer2013 is not None and fer2013.exists():
        from client.data.formats import load_dataset

        test = load_dataset(f"fer2013={fer2013}", image_size=float_clf.card.image_size).splits["test"]
        faces, labels = standardize(test.images), test.labels
        f_pred = np.concatenate([float_clf.logits(faces[i:i + 256]).argmax(1) for i in range(0, len(faces), 256)])
        q_pred = np.concatenate([int8_clf.logits(faces[i:i + 256]).argmax(1) for i in range(0, len(faces), 256)])
        return {"basis": "FER2013 PublicTest accuracy", "n": int(len(labels)),
                "float_accuracy": float((f_pred == labels).mean()), "int8_accuracy": float((q_pred == labels).mean()),
                "agreement": float((f_pred == q_pred).mean())}
    images, _ = make_synthetic(500, seed=123)
    faces = standardize(images)
    f_prob = softmax(float_clf.logits(faces))
    q_prob = softmax(int8_clf.logits(faces))
    return {"basis": "top-1 agreement with the float model on 500 synthetic faces (no trained model given)",
            "n": 500, "agreement": float((f_prob.argmax(1) == q_prob.argmax(1)).mean()),
            "max_abs_probability_diff": float(np.abs(f_prob - q_prob).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--k", type=int, default=3, help="detect every k-th frame in the tracking rows")
    parser.add_argument("--models", default=",".join(list_models()))
    parser.add_argument("--model", type=Path, default=None, help="a trained model.pt for the int8 accuracy row")
    parser.add_argument("--fer2013", type=Path, default=REPO.parent / "shared" / "data" / "fer2013")
    parser.add_argument("--threads", type=int, default=None, help="torch/ORT intra-op threads (default: library's)")
    parser.add_argument("--out", type=Path, default=RESULT, help="the JSON to write")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, costs = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        video = scratch / "ward.avi"
        write_video(video, [(name, 15) for name in PLAN_EMOTIONS], pick_faces(PLAN_EMOTIONS))
        calibration = standardize(make_synthetic(256, seed=7)[0])
        if args.model is not None and args.fer2013.exists():
            # A model trained on real faces is calibrated on real faces: 256 from FER2013's TRAINING split (never
            # the PublicTest faces its int8 accuracy is then scored on).
            from client.data.formats import load_dataset

            train = load_dataset(f"fer2013={args.fer2013}").splits["train"]
            pick = np.random.default_rng(7).choice(len(train.labels), size=256, replace=False)
            calibration = standardize(train.images[np.sort(pick)])
        for name in args.models.split(","):
            if args.model is not None:
                model, card = load_torch_model(args.model)
                if card.name != name:
                    continue
            else:
                model = create_model(name, dp=True).eval()
                card = ModelSpec(name=name, cfg={"dp": True}, image_size=48, classes=EMOTIONS,
                                 source=Path("untrained"))
            float_path = export_onnx(model, card, scratch / f"{name}.onnx")
            int8_path = export_onnx(model, card, scratch / f"{name}-int8.onnx", int8=True,
                                    calibration_faces=calibration)
            runtimes = {
                "torch": TorchClassifier(model, card),
                "onnx": load_classifier(float_path, runtime="onnx", threads=args.threads),
                "onnx-int8": load_classifier(int8_path, runtime="onnx", threads=args.threads),
            }
            costs[name] = int8_cost(runtimes["onnx"], runtimes["onnx-int8"], model_path=args.model,
                                    fer2013=args.fer2013)
            for runtime, classifier in runtimes.items():
                for every, width in ((1, 0), (args.k, 0), (1, 320), (args.k, 320)):
                    row = {"model": name, "runtime": runtime, "detect_every": every, "detect_width": width or 640,
                           **run_stream(video, classifier, detect_every=every, frames=args.frames,
                                        detect_width=width)}
                    rows.append(row)
                    print(f"{name:<13} {runtime:<9} k={every} w={width or 640}  {row['fps']:6.1f} FPS  p50 {row['p50_ms']:6.1f} ms  "
                          f"p95 {row['p95_ms']:6.1f} ms  detect {row['detect_ms_per_frame']:6.1f} ms/frame  "
                          f"classify {row['classify_ms']:6.1f} ms  decode {row['decode_ms']:4.1f} ms", flush=True)
            print(f"{name:<13} int8 cost: {json.dumps(costs[name])}", flush=True)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg(), "note": "shared 2-core machine under load from other jobs"},
        "frames": args.frames, "frame_size": [640, 480], "batch": 1, "detector": "haar",
        "rows": rows, "int8_cost": costs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
