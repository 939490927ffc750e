"""`fer-client watch`: a real-time loop over a camera, a video file or a stream.

Each frame: detect (every --detect-every frames) -> align -> classify -> track (IoU) -> smooth (EMA, --half-life)
-> care-alert rules. stdout gets one JSON line per tracked face per frame (with --every N, per N-th frame) and one
per alert; stderr gets FPS and latency every --log-every seconds and a summary at the end. Frames and faces are
kept in memory only; nothing is written unless asked (--save-uncertain, --alerts-out). The crops --save-uncertain
keeps are what a carer labels for `fer-client adapt`; --personal NAME then reads with that patient's personal head.
Ctrl-C stops the loop cleanly: the source is released, files are closed and the summary is printed, with exit code
0. A --video that ends before its header's frame count is reported as truncated after its frames were used, with
exit code 1.

Time: for --video it is the video's own clock (frame index / declared FPS), so rule durations mean the same on a
slow machine; for --camera and --stream it is wall-clock seconds since the start.
"""

from __future__ import annotations

import json
import sys
import time as clock
from pathlib import Path
from typing import Annotated

import click
import cv2
import numpy as np
import typer

from client.cli.predict_cmd import ModelOption, PersonalOption, RuntimeOption, StateDirOption
from client.inference.media import Frame


def watch(
    camera: Annotated[int | None, typer.Option("--camera", help="Local camera index (e.g. 0).")] = None,
    video: Annotated[Path | None, typer.Option("--video", help="A video file, processed as if live.")] = None,
    stream: Annotated[str | None, typer.Option("--stream", help="A stream URL OpenCV can open (rtsp://...).")] = None,
    model: ModelOption = None,
    runtime: RuntimeOption = "torch",
    alerts: Annotated[Path | None, typer.Option("--alerts", help="Care-alert rules (TOML, see docs/bedside.md).")] = None,
    alerts_out: Annotated[Path | None, typer.Option(help="Append each alert as a JSON line to this file.")] = None,
    patient: Annotated[str | None, typer.Option(help="Patient id, for rules and events.")] = None,
    camera_id: Annotated[str | None, typer.Option(help="Camera id for rules and events (default: the source).")] = None,
    half_life: Annotated[float, typer.Option(help="Smoothing half-life in seconds (0: none).")] = 0.5,
    detect_every: Annotated[int, typer.Option(help="Run the face detector on every k-th frame.")] = 1,
    detect_width: Annotated[int, typer.Option(help="Detect on a copy shrunk to this width (0: full size).")] = 0,
    every: Annotated[int, typer.Option(help="Print the faces of every N-th frame (alerts always).")] = 1,
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    save_uncertain: Annotated[Path | None, typer.Option(
        help="Store face crops whose smoothed confidence is below --uncertain-below here (for later correction "
             "by a carer). Off by default: no face is stored.")] = None,
    uncertain_below: Annotated[float, typer.Option(help="Confidence below which a crop is uncertain.")] = 0.5,
    log_every: Annotated[float, typer.Option(help="Seconds between FPS/latency log lines.")] = 5.0,
    detector: Annotated[str, typer.Option(help="haar (bundled with OpenCV) or yunet.")] = "haar",
    yunet_model: Annotated[Path | None, typer.Option(help="YuNet .onnx file for --detector yunet.")] = None,
    state_dir: StateDirOption = Path("fer-client-state"),
    personal: PersonalOption = None,
) -> int:
    """Watch a camera, video or stream in real time: tracked, smoothed expressions and care alerts."""
    from client.inference.alerts import AlertEngine, load_rules, run_hook
    from client.inference.media import MediaError, iter_video
    from client.inference.model import open_classifier
    from client.inference.pipeline import FramePipeline
    from client.inference.tracking import FaceTracker

    sources = [s for s in (camera, video, stream) if s is not None]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --camera N, --video PATH, --stream URL")
    if every < 1 or detect_every < 1 or detect_width < 0:
        raise click.BadParameter("--every and --detect-every must be at least 1, --detect-width at least 0")
    if video is not None and not video.is_file():
        raise click.ClickException(f"--video {video}: no such file")
    rules = load_rules(alerts) if alerts is not None else []
    classifier = open_classifier(model=model, runtime=runtime, state_dir=state_dir, personal=personal)
    pipeline = FramePipeline(classifier=classifier, detector=detector, detect_every=detect_every,
                             detect_width=detect_width,
                             yunet_model=None if yunet_model is None else str(yunet_model))
    tracker = FaceTracker(half_life=half_life)
    source = camera if camera is not None else str(video) if video is not None else stream
    engine = AlertEngine(rules, patient=patient, camera=camera_id or str(source))
    if video is not None:
        frames_in = iter_video(video)  # the video's own clock; raises MediaError at the end if it was cut short
    else:
        # OpenCV's own warnings for a missing device ("can't open camera by index") would precede the one line below.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            capture.release()
            raise click.ClickException(f"cannot open {'camera' if camera is not None else 'stream'} {source}")
        frames_in = _live_frames(capture)
    events_file = None
    latencies: list[float] = []
    frames = alerts_fired = saved = 0
    started = last_log = clock.monotonic()
    last_saved: dict[int, float] = {}
    failure = None
    try:
        if save_uncertain is not None:
            save_uncertain.mkdir(parents=True, exist_ok=True)
        tick = clock.perf_counter()
        for frame in frames_in:
            now = frame.time
            observations = pipeline.process(frame.image)
            states = tracker.update([(o.box, o.probabilities) for o in observations], time=now)
            events = engine.update(states, time=now) if rules else []
            latencies.append(clock.perf_counter() - tick)
            if frames % every == 0:
                for state in states:
                    _emit({"frame": frame.index, **state.to_json()})
            for event in events:
                alerts_fired += 1
                record = event.to_json()
                _emit(record)
                if alerts_out is not None:
                    if events_file is None:  # opened at the first alert: a watch without alerts leaves no file
                        alerts_out.parent.mkdir(parents=True, exist_ok=True)
                        events_file = open(alerts_out, "a")  # noqa: SIM115 - closed in finally, flushed per event
                    events_file.write(json.dumps(record) + "\n")
                    events_file.flush()
                command = engine.command_for(event)
                if command:
                    run_hook(command, event)
            if save_uncertain is not None:
                for observation, state in zip(observations, states):
                    if state.smoothed.max() < uncertain_below and now - last_saved.get(state.track, -1e9) >= 1.0:
                        last_saved[state.track] = now
                        cv2.imwrite(str(save_uncertain / f"track{state.track:04d}-t{now:010.3f}.png"),
                                    observation.face)
                        saved += 1
            frames += 1
            if clock.monotonic() - last_log >= log_every:
                last_log = clock.monotonic()
                _log_rate(frames, started, latencies)
            if max_frames is not None and frames >= max_frames:
                break
            tick = clock.perf_counter()  # latency counts from the request for the next frame (decode included)
    except MediaError as err:
        failure = err  # a cut-short video: its frames were used; say so after the summary
    except KeyboardInterrupt:
        print("fer-client: stopped (Ctrl-C)", file=sys.stderr)
    finally:
        frames_in.close()  # releases the capture
        if events_file is not None:
            events_file.close()
    _log_rate(frames, started, latencies, final=True, alerts=alerts_fired, saved=saved)
    if failure is not None:
        print(f"fer-client: {failure}", file=sys.stderr)
        return 1
    return 0


def _live_frames(capture):
    """Frames of an opened camera or stream, timed in wall-clock seconds since the first one was asked for."""
    try:
        started = clock.monotonic()
        index = 0
        while True:
            ok, image = capture.read()
            if not ok or image is None:
                return
            yield Frame(image=image, index=index, time=round(clock.monotonic() - started, 4))
            index += 1
    finally:
        capture.release()


def _log_rate(frames: int, started: float, latencies: list[float], *, final: bool = False, alerts: int = 0,
              saved: int = 0) -> None:
    elapsed = max(clock.monotonic() - started, 1e-9)
    recent = np.array(latencies[-500:] or [0.0]) * 1000.0
    text = (f"fer-client: {'done: ' if final else ''}{frames} frames, {frames / elapsed:.1f} FPS, latency p50 "
            f"{np.percentile(recent, 50):.1f} ms p95 {np.percentile(recent, 95):.1f} ms")
    if final:
        text += f", {alerts} alerts, {saved} uncertain faces saved"
    print(text, file=sys.stderr, flush=True)


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
