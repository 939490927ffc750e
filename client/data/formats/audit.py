"""What loading found wrong with a dataset: problems counted while loading, then the content audit.

Problems that are normal in large real datasets (a few unreadable files, blank images, duplicates, photos without a
detectable face) are not fatal: each loader skips or keeps them as the case may be and counts them in a
`_LoadProblems`; `_finish` then audits the loaded splits (blank images, duplicates within and across splits) and
assembles the `FERDataset`, whose `problems` `fer-sim inspect` prints: never pixel data, at most `MAX_EXAMPLES`
sources per problem.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np

from client.data.formats.dataset import SPLIT_ORDER, DatasetError, FERDataset, Split

# At most this many sources are listed per problem, so a report stays readable on a 100,000-image folder.
MAX_EXAMPLES = 10
# An image whose grey levels span at most this range is blank. Not zero: JPEG ringing leaves a flat grey FER2013
# image (Training_3542668) with a range of 3, while the least uniform real face in FER2013 spans 47 levels.
BLANK_RANGE = 8


class _Tally:
    """Counts one kind of problem and keeps the first few sources as examples."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, source: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(source)

    def as_dict(self) -> dict:
        return {"count": self.count, "examples": list(self.examples)}


@dataclass
class _LoadProblems:
    """What a loader skipped; the content audit adds the rest."""

    unreadable: _Tally = field(default_factory=_Tally)
    non_image: _Tally = field(default_factory=_Tally)
    missing: _Tally = field(default_factory=_Tally)
    no_face: _Tally = field(default_factory=_Tally)
    # Skipped folder (relative path) -> number of files in it.
    unknown_folders: dict[str, int] = field(default_factory=dict)


@dataclass
class _SplitContent:
    """A loaded split plus what the audit needs about each sample's native (pre-resize) pixels."""

    images: np.ndarray
    labels: np.ndarray
    sources: list[str]
    digests: list[bytes]
    blank: list[str | None]  # None, "all_black" or "flat"


def _digest(image: np.ndarray) -> bytes:
    hasher = hashlib.blake2b(np.ascontiguousarray(image), digest_size=16)
    hasher.update(np.asarray(image.shape, dtype=np.int64).tobytes())
    return hasher.digest()


def _blank_kind(image: np.ndarray) -> str | None:
    low, high, _, _ = cv2.minMaxLoc(image)
    if high - low > BLANK_RANGE:
        return None
    return "all_black" if high <= BLANK_RANGE else "flat"


def _capped_groups(groups: Iterable[list[str]], *, per_group: int = 2) -> list[list[str]]:
    """Lists example groups, `per_group` sources each, at most MAX_EXAMPLES sources in all."""
    out: list[list[str]] = []
    for group in groups:
        if (len(out) + 1) * per_group > MAX_EXAMPLES:
            break
        out.append(group[:per_group])
    return out


def _one_per_label(group: list[int], content: _SplitContent) -> list[str]:
    """The first source of each label in a duplicate group, so an example shows the conflict itself."""
    firsts: dict[int, str] = {}
    for i in group:
        firsts.setdefault(int(content.labels[i]), content.sources[i])
    return list(firsts.values())


def _audit(contents: dict[str, _SplitContent]) -> dict:
    """Finds blank images, duplicates within each split and images shared between splits."""
    blank_by_split: dict[str, int] = {}
    blank_kinds: Counter[str] = Counter()
    blank_examples = _Tally()
    by_digest: dict[str, dict[bytes, list[int]]] = {}
    duplicates_by_split: dict[str, dict] = {}
    for name, content in contents.items():
        blank_by_split[name] = 0
        for source, kind in zip(content.sources, content.blank):
            if kind is not None:
                blank_by_split[name] += 1
                blank_kinds[kind] += 1
                blank_examples.add(source)
        groups: dict[bytes, list[int]] = {}
        for index, digest in enumerate(content.digests):
            groups.setdefault(digest, []).append(index)
        by_digest[name] = groups
        repeated = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: content.sources[g[0]])
        conflicting = [g for g in repeated if len({int(content.labels[i]) for i in g}) > 1]
        duplicates_by_split[name] = {
            "groups": len(repeated),
            "extra_copies": sum(len(g) - 1 for g in repeated),
            "conflicting_groups": len(conflicting),
            "examples": _capped_groups([content.sources[i] for i in g] for g in repeated),
            "conflicting_examples": _capped_groups(_one_per_label(g, content) for g in conflicting),
        }

    shared_by_pair: dict[str, dict] = {}
    names = list(contents)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            common = sorted(by_digest[first].keys() & by_digest[second].keys(),
                            key=lambda d: contents[first].sources[by_digest[first][d][0]])
            shared_by_pair[f"{first}/{second}"] = {
                "groups": len(common),
                "images": {first: sum(len(by_digest[first][d]) for d in common),
                           second: sum(len(by_digest[second][d]) for d in common)},
                "examples": _capped_groups([contents[first].sources[by_digest[first][d][0]],
                                            contents[second].sources[by_digest[second][d][0]]] for d in common),
            }

    return {
        "blank": {"count": sum(blank_by_split.values()), "all_black": blank_kinds["all_black"],
                  "flat": blank_kinds["flat"], "by_split": blank_by_split, "examples": blank_examples.examples},
        "duplicates": {
            "groups": sum(d["groups"] for d in duplicates_by_split.values()),
            "extra_copies": sum(d["extra_copies"] for d in duplicates_by_split.values()),
            "conflicting_groups": sum(d["conflicting_groups"] for d in duplicates_by_split.values()),
            "by_split": duplicates_by_split,
        },
        "shared_across_splits": {
            "groups": sum(p["groups"] for p in shared_by_pair.values()),
            "by_pair": shared_by_pair,
        },
    }


def _finish(kind: str, fmt: str, root: str | None, contents: dict[str, _SplitContent], loaded: _LoadProblems,
            native_sizes: Counter[str], *, required: str = "train") -> FERDataset:
    """Drops empty optional splits, audits the content and assembles the dataset (`required`: the split that must
    hold images: the training split, or the test split of data loaded only to score a model)."""
    where = root or "synthetic data"
    if not contents.get(required) or len(contents[required].sources) == 0:
        if any(len(c.sources) for c in contents.values()) and required == "test":
            raise DatasetError(f"{where}: no readable test images (test split is empty)")
        if any(len(c.sources) for c in contents.values()):
            raise DatasetError(f"{where}: no readable training images (train split is empty)")
        raise DatasetError(f"{where}: no readable images found ({loaded.unreadable.count} unreadable, "
                           f"{loaded.no_face.count} without a face, {loaded.missing.count} missing)")
    contents = {name: contents[name] for name in SPLIT_ORDER if name in contents and contents[name].sources}
    problems = {
        "unreadable": loaded.unreadable.as_dict(),
        "non_image": loaded.non_image.as_dict(),
        "unknown_folders": {"count": sum(loaded.unknown_folders.values()),
                            "folders": dict(sorted(loaded.unknown_folders.items())[:MAX_EXAMPLES])},
        "missing": loaded.missing.as_dict(),
        "no_face": loaded.no_face.as_dict(),
        **_audit(contents),
    }
    splits = {name: Split(images=c.images, labels=c.labels, sources=tuple(c.sources)) for name, c in contents.items()}
    return FERDataset(kind=kind, format=fmt, root=root, splits=splits, problems=problems,
                      native_sizes=dict(native_sizes.most_common()))
