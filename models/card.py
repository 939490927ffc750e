"""The model sidecar: the JSON card beside every saved model (model.json, checkpoints/round-XXX.json).

It lives with the models, not with the run directory that writes it (server/rundir.py), because both sides of the
federation read it: the coordinator (resume, evaluate) and each site (`fer-client predict`, `watch`, `export`). The
versioning helper every run-directory record uses lives here too, at the lowest layer that needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

SCHEMA_VERSION = 1
WEIGHTS_FORMAT = "torch state_dict (weights_only)"


class SchemaVersionError(ValueError):
    """A record written under a schema_version this code does not read; the message is one line naming the file."""


def check_schema_version(data: Any, *, supported: int, source: str) -> None:
    """Refuses a record of another schema version.

    A record without `schema_version` was written before the run directory was versioned; its layout is version 1's,
    so it reads as version 1.

    Raises:
        SchemaVersionError: `data` is not a JSON object or names another version (the message names `source`).
    """
    if not isinstance(data, Mapping):
        raise SchemaVersionError(f"{source}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", 1)
    if version != supported:
        raise SchemaVersionError(
            f"{source}: schema_version {version!r} is not one this fer-fl reads ({supported}); "
            "it was written by another fer-fl version"
        )


def parse_record(data: Any, *, build: Callable[[Mapping[str, Any]], T], supported: int, source: str, kind: str) -> T:
    """The one way a versioned record is read: the version is checked, then `build(data)`; a missing key or a value
    of the wrong type becomes one line naming `source`.

    Raises:
        SchemaVersionError: another schema version.
        ValueError: `build` found the record malformed.
    """
    check_schema_version(data, supported=supported, source=source)
    try:
        return build(data)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{source}: not a {kind} ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class ModelCard:
    """What a saved model is: its architecture, options, round, label order, checksum and the data it was scored on.

    Attributes:
        name: registered architecture (models.list_models()).
        cfg: the factory options it was built with ({"dp": True} for the GroupNorm build federated runs use).
        round: the last round whose aggregate the weights hold.
        classes: the output order of the logits.
        num_classes: len(classes), kept for readers that only need the head's width.
        sha256: of the .pt file; a pair whose hashes disagree is not a model (see server.rundir.is_complete_pair).
        data_seed, image_size, dataset: what `fer-sim evaluate` needs to rebuild the run's test set (synthetic faces
            depend on the seed); None when the writer did not train on a run's data.
        format: how the weights file is stored.
    """

    name: str
    round: int
    classes: tuple[str, ...]
    cfg: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    data_seed: int | None = None
    image_size: int | None = None
    dataset: str | None = None
    format: str = WEIGHTS_FORMAT
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        # The data fields are left out where unknown: readers then apply their own defaults (48-pixel faces).
        data = {"data_seed": self.data_seed, "image_size": self.image_size, "dataset": self.dataset}
        return {
            "name": self.name, "cfg": dict(self.cfg), "round": int(self.round), "classes": list(self.classes),
            "num_classes": self.num_classes, "format": self.format, "sha256": self.sha256,
            **{key: value for key, value in data.items() if value is not None},
            "schema_version": self.schema_version,
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "model card") -> ModelCard:
        """Reads a card; unknown keys are ignored.

        Raises:
            SchemaVersionError: another schema version.
            ValueError: no model name, or a round or class list of the wrong kind (named with `source`).
        """
        check_schema_version(data, supported=SCHEMA_VERSION, source=source)
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source} names no model")
        round_number = data.get("round")
        if isinstance(round_number, bool) or not isinstance(round_number, int):
            raise ValueError(f"{source}: round must be an integer, got {round_number!r}")
        classes = data.get("classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{source}: classes must be a list of names")
        cfg = data.get("cfg") or {}
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{source}: cfg must be an object")
        return cls(
            name=name, round=round_number, classes=tuple(classes), cfg=dict(cfg), sha256=data.get("sha256"),
            data_seed=_optional_int(data.get("data_seed")), image_size=_optional_int(data.get("image_size")),
            dataset=data.get("dataset"), format=str(data.get("format", WEIGHTS_FORMAT)),
        )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
