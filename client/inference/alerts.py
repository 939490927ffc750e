"""Care alerts: rules from a TOML file evaluated on the smoothed expression stream.

An alert is decision support for a carer, never a diagnosis: it says that the model's smoothed probability of the
named expressions stayed above a threshold for a while, with the evidence (time span, mean and peak probability,
frames) so a person can judge it. See docs/bedside.md.

Rule file:

    [alerts]                          # optional defaults for every rule
    command = ["/usr/local/bin/page-nurse", "--ward", "3"]

    [[rule]]
    name = "sustained-distress"
    emotions = ["sad", "fear"]        # the rule's score is the sum of these smoothed probabilities
    threshold = 0.6                   # the score must stay at or above this ...
    min_duration = 10.0               # ... for this many seconds without a break
    cooldown = 300.0                  # then no new alert of this rule for this patient and camera for this long
    patients = ["bed-3"]              # optional: only for these --patient ids
    cameras = ["0"]                   # optional: only for these --camera-id values
    command = ["/usr/local/bin/x"]    # optional: overrides [alerts].command

A frame where the tracked face is missing, or scores below the threshold, breaks the episode; the next episode
starts from zero. After an alert the episode restarts at the next frame; a spell that lasts through the cool-down
alerts again as the cool-down ends, with the span since the previous alert as its evidence. A command is a list of arguments run directly (never through a shell), with the event as one
JSON line on its standard input.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from client.data.labels import EMOTIONS
from client.inference.tracking import TrackState

_RULE_KEYS = {"name", "emotions", "threshold", "min_duration", "cooldown", "patients", "cameras", "command"}
HOOK_TIMEOUT_S = 10.0
_EPS = 1e-6


class AlertConfigError(click.ClickException):
    """A rule file that cannot be used; one line naming the file, the rule and the key."""


@dataclass(frozen=True)
class AlertRule:
    """One care-alert rule (see the module docstring for the file format)."""

    name: str
    emotions: tuple[str, ...]
    threshold: float
    min_duration: float
    cooldown: float
    patients: tuple[str, ...] | None = None
    cameras: tuple[str, ...] | None = None
    command: tuple[str, ...] | None = None

    def applies_to(self, *, patient: str | None, camera: str | None) -> bool:
        return ((self.patients is None or patient in self.patients)
                and (self.cameras is None or camera in self.cameras))

    def score(self, smoothed: np.ndarray) -> float:
        return float(sum(smoothed[EMOTIONS.index(name)] for name in self.emotions))


@dataclass(frozen=True)
class AlertEvent:
    """A fired alert and its evidence; `to_json` is what the events file, stdout and the hook command receive."""

    rule: str
    patient: str | None
    camera: str | None
    track: int
    emotions: tuple[str, ...]
    threshold: float
    start: float
    end: float
    mean_probability: float
    peak_probability: float
    frames: int

    def to_json(self) -> dict:
        return {
            "event": "care_alert",
            "rule": self.rule,
            "patient": self.patient,
            "camera": self.camera,
            "track": self.track,
            "emotions": list(self.emotions),
            "threshold": self.threshold,
            "start": round(self.start, 4),
            "end": round(self.end, 4),
            "duration": round(self.end - self.start, 4),
            "mean_probability": round(self.mean_probability, 4),
            "peak_probability": round(self.peak_probability, 4),
            "frames": self.frames,
            "note": "decision support, not a diagnosis",
        }

    @classmethod
    def from_json(cls, data: dict) -> AlertEvent:
        return cls(rule=data["rule"], patient=data["patient"], camera=data["camera"], track=int(data["track"]),
                   emotions=tuple(data["emotions"]), threshold=float(data["threshold"]), start=float(data["start"]),
                   end=float(data["end"]), mean_probability=float(data["mean_probability"]),
                   peak_probability=float(data["peak_probability"]), frames=int(data["frames"]))


def load_rules(path: Path) -> list[AlertRule]:
    """Reads and checks a rule file.

    Raises:
        AlertConfigError: unreadable file, bad TOML, or a rule with a missing, unknown or out-of-range key.
    """
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise AlertConfigError(f"--alerts {path}: cannot read ({err.strerror or err})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise AlertConfigError(f"--alerts {path}: not valid TOML ({err})") from None
    defaults = data.get("alerts", {})
    rules = data.get("rule")
    if not isinstance(rules, list) or not rules:
        raise AlertConfigError(f"--alerts {path}: no [[rule]] tables")
    default_command = _command(defaults.get("command"), where=f"--alerts {path}: [alerts].command")
    parsed = []
    for number, raw in enumerate(rules, start=1):
        where = f"--alerts {path}: rule {raw.get('name', number)!r}"
        unknown = sorted(set(raw) - _RULE_KEYS)
        if unknown:
            raise AlertConfigError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(_RULE_KEYS))})")
        try:
            emotions = tuple(raw["emotions"])
            rule = AlertRule(
                name=str(raw.get("name", f"rule-{number}")),
                emotions=emotions,
                threshold=float(raw["threshold"]),
                min_duration=float(raw.get("min_duration", 0.0)),
                cooldown=float(raw.get("cooldown", 0.0)),
                patients=_strings(raw.get("patients")),
                cameras=_strings(raw.get("cameras")),
                command=_command(raw["command"], where=f"{where}: command") if "command" in raw else default_command,
            )
        except KeyError as err:
            raise AlertConfigError(f"{where}: missing key {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise AlertConfigError(f"{where}: {err}") from None
        bad = [name for name in emotions if name not in EMOTIONS]
        if not emotions or bad:
            raise AlertConfigError(f"{where}: emotions must be among {', '.join(EMOTIONS)} (got {bad or 'none'})")
        if not 0.0 < rule.threshold <= 1.0:
            raise AlertConfigError(f"{where}: threshold must lie in (0, 1], got {rule.threshold}")
        if rule.min_duration < 0 or rule.cooldown < 0:
            raise AlertConfigError(f"{where}: min_duration and cooldown must be non-negative seconds")
        parsed.append(rule)
    return parsed


def _strings(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise TypeError("patients and cameras must be lists of strings")
    return tuple(str(v) for v in value)


def _command(value, *, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        # A string would need a shell to split it, and a shell would interpret whatever the string holds.
        raise AlertConfigError(f"{where} must be a list of arguments such as [\"/usr/bin/notify\", \"--ward\", "
                               "\"3\"]; a shell command string is not run")
    return tuple(value)


@dataclass
class _Episode:
    start: float
    last: float
    total: float
    peak: float
    frames: int


class AlertEngine:
    """Evaluates rules on each frame's smoothed track states.

    Episodes are kept per (rule, track); cool-downs per (rule, patient, camera), so a patient whose face is lost
    and found again (a new track) is not alerted twice for the same spell.
    """

    def __init__(self, rules: list[AlertRule], *, patient: str | None = None, camera: str | None = None) -> None:
        self.patient = patient
        self.camera = camera
        self.rules = [rule for rule in rules if rule.applies_to(patient=patient, camera=camera)]
        self._episodes: dict[tuple[str, int], _Episode] = {}
        self._quiet_until: dict[str, float] = {}

    def update(self, states: list[TrackState], *, time: float) -> list[AlertEvent]:
        """Feeds one frame (all tracks seen at `time`); returns the alerts that fire on it."""
        events = []
        seen = {state.track for state in states}
        for key in [key for key in self._episodes if key[1] not in seen]:
            del self._episodes[key]
        for rule in self.rules:
            for state in states:
                key = (rule.name, state.track)
                score = rule.score(state.smoothed)
                if score < rule.threshold:
                    self._episodes.pop(key, None)
                    continue
                episode = self._episodes.get(key)
                if episode is None:
                    episode = self._episodes[key] = _Episode(start=time, last=time, total=0.0, peak=0.0, frames=0)
                episode.last = time
                episode.total += score
                episode.peak = max(episode.peak, score)
                episode.frames += 1
                # _EPS: frame times are decimal seconds (index / fps), and 1.7 - 0.7 may come out a hair under 1.0.
                if (time - episode.start >= rule.min_duration - _EPS
                        and time >= self._quiet_until.get(rule.name, -1e300) - _EPS):
                    events.append(AlertEvent(
                        rule=rule.name, patient=self.patient, camera=self.camera, track=state.track,
                        emotions=rule.emotions, threshold=rule.threshold, start=round(episode.start, 4),
                        end=round(time, 4), mean_probability=round(episode.total / episode.frames, 4),
                        peak_probability=round(episode.peak, 4), frames=episode.frames))
                    self._quiet_until[rule.name] = time + rule.cooldown
                    del self._episodes[key]
        return events

    def command_for(self, event: AlertEvent) -> tuple[str, ...] | None:
        return next((rule.command for rule in self.rules if rule.name == event.rule), None)


def run_hook(command: tuple[str, ...], event: AlertEvent) -> int | None:
    """Runs the rule's local command with the event as one JSON line on stdin; returns its exit code.

    A hook that fails, hangs past HOOK_TIMEOUT_S or does not exist is reported on stderr and the watch goes on: a
    broken pager must not stop the monitoring.
    """
    payload = json.dumps(event.to_json()) + "\n"
    try:
        done = subprocess.run(list(command), input=payload, text=True, capture_output=True, timeout=HOOK_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"fer-client: alert command {command[0]} failed ({type(err).__name__}: {err})", file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"fer-client: alert command {command[0]} exited {done.returncode}", file=sys.stderr)
    return done.returncode
