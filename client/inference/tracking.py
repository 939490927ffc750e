"""Face tracks across frames and temporal smoothing of each track's probabilities.

Tracking is by box overlap (IoU): at bedside frame rates a face moves a fraction of its width between frames, so
the best-overlapping track is the same face, and a face that vanishes for longer than `max_age` seconds starts a
new track when it returns.

Smoothing is an exponential moving average per track whose weight depends on the time between frames, not on the
frame count: alpha = 1 - 2^(-dt / half_life). An observation's influence halves every `half_life` seconds whatever
the frame rate, so the same rule file means the same thing on a 5 FPS hub and a 30 FPS workstation, and frames
dropped under load do not speed the average up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from client.data.labels import EMOTIONS


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class TrackState:
    """One tracked face at one moment: raw and smoothed probabilities (EMOTIONS order)."""

    track: int
    box: tuple[int, int, int, int]
    time: float
    raw: np.ndarray
    smoothed: np.ndarray

    @property
    def emotion(self) -> str:
        return EMOTIONS[int(np.argmax(self.smoothed))]

    def to_json(self) -> dict:
        return {
            "track": self.track,
            "box": list(self.box),
            "time": round(self.time, 4),
            "emotion": self.emotion,
            "confidence": round(float(self.smoothed.max()), 4),
            "raw_emotion": EMOTIONS[int(np.argmax(self.raw))],
            "probabilities": {name: round(float(p), 4) for name, p in zip(EMOTIONS, self.smoothed)},
        }


@dataclass
class _Track:
    id: int
    box: tuple[int, int, int, int]
    last_time: float
    smoothed: np.ndarray


class FaceTracker:
    """Assigns each frame's face boxes to tracks and smooths the probabilities per track.

    Args:
        iou_threshold: minimum overlap for a box to continue a track.
        max_age: seconds a track survives without a matching box.
        half_life: seconds after which an observation's weight in the smoothed probabilities has halved;
            0 turns smoothing off.
    """

    def __init__(self, *, iou_threshold: float = 0.3, max_age: float = 1.0, half_life: float = 0.5) -> None:
        if not 0.0 <= iou_threshold <= 1.0 or max_age < 0 or half_life < 0:
            raise ValueError("iou_threshold must lie in [0, 1]; max_age and half_life must be non-negative")
        self.iou_threshold = iou_threshold
        self.max_age = max_age
        self.half_life = half_life
        self._tracks: list[_Track] = []
        self._next_id = 1

    def update(self, observations: list[tuple[tuple[int, int, int, int], np.ndarray]], *,
               time: float) -> list[TrackState]:
        """Feeds one frame's (box, probabilities) pairs taken at `time` seconds; returns their tracks' states."""
        self._tracks = [t for t in self._tracks if time - t.last_time <= self.max_age]
        pairs = sorted(((iou(box, track.box), i, j) for i, (box, _) in enumerate(observations)
                        for j, track in enumerate(self._tracks)), reverse=True)
        assigned: dict[int, _Track] = {}
        used: set[int] = set()
        for overlap, i, j in pairs:
            if overlap < self.iou_threshold:
                break
            if i not in assigned and j not in used:
                assigned[i] = self._tracks[j]
                used.add(j)
        states = []
        for i, (box, probabilities) in enumerate(observations):
            probabilities = np.asarray(probabilities, dtype=np.float32)
            track = assigned.get(i)
            if track is None:
                track = _Track(id=self._next_id, box=box, last_time=time, smoothed=probabilities.copy())
                self._next_id += 1
                self._tracks.append(track)
            else:
                dt = max(0.0, time - track.last_time)
                alpha = 1.0 if self.half_life == 0 else 1.0 - 2.0 ** (-dt / self.half_life)
                track.smoothed = ((1.0 - alpha) * track.smoothed + alpha * probabilities).astype(np.float32)
                track.box, track.last_time = box, time
            states.append(TrackState(track=track.id, box=box, time=time, raw=probabilities,
                                     smoothed=track.smoothed.copy()))
        return states
