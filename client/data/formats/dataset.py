"""The in-memory form every dataset loader returns, and the one-line error a user's data problem raises.

`FERDataset` holds, per split, `(N, S, S)` uint8 grayscale faces, int64 labels in the shared label space of
`client.data.labels`, and one source string per sample so that every problem can be traced to a file.
`DatasetError`'s message is one line naming the file (and row or line), so that the CLI can print it without a
traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS: tuple[str, ...] = ("fer2013", "rafdb", "folder", "faces", "synthetic")
SPLIT_ORDER: tuple[str, ...] = ("train", "test", "private_test")


class DatasetError(Exception):
    """A problem with the user's data; its message is one line naming the file (and row) at fault."""

    def __init__(self, message: str) -> None:
        # One line is the contract with the CLI: a stray newline from a path or an OS message would break it.
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: faces, labels, and where each face came from.

    Attributes:
        images: (N, H, W) uint8 grayscale faces, all resized to the dataset's image size.
        labels: (N,) int64 labels in 0..6 (see `client.data.labels.EMOTIONS`).
        sources: per sample, the file relative to the dataset root, "file.csv:LINE" for a CSV row, or
            "synthetic:i" for a generated face; kept so any finding can be traced back to the user's file.
    """

    images: np.ndarray
    labels: np.ndarray
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.sources)
        if self.images.ndim != 3 or self.images.dtype != np.uint8 or self.images.shape[0] != n:
            raise ValueError(f"images must be ({n}, H, W) uint8, got {self.images.shape} {self.images.dtype}")
        if self.labels.shape != (n,) or self.labels.dtype != np.int64:
            raise ValueError(f"labels must be ({n},) int64, got {self.labels.shape} {self.labels.dtype}")

    def __len__(self) -> int:
        return len(self.sources)


@dataclass
class FERDataset:
    """A loaded dataset in the shared label space.

    Attributes:
        kind: "fer2013", "rafdb", "folder", "faces" or "synthetic".
        format: the on-disk format found, e.g. "fer2013-csv", "fer2013-folder", "rafdb-aligned", "rafdb-original",
            "folder", "faces", "synthetic".
        root: the path the user gave (None for synthetic data).
        splits: "train" and, when the data has them, "test" and "private_test". A folder without a train/test
            split has only "train"; the federated code splits it.
        problems: what loading skipped or found (unreadable and non-image files, unknown class folders, missing
            files, photos without a face, blank images, duplicates within and across splits); JSON-able, with at
            most `MAX_EXAMPLES` sources per problem and never pixel data.
        native_sizes: how many images had each native size "WxH", before cropping and resizing.
    """

    kind: str
    format: str
    root: str | None
    splits: dict[str, Split]
    problems: dict
    native_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        """True for generated data, which every output made from it must say."""
        return self.kind == "synthetic"


_EXPECTED = {
    "fer2013": "a FER2013 CSV file (emotion,pixels,Usage) or a folder with train/<emotion>/*.jpg",
    "rafdb": "a RAF-DB basic folder with EmoLabel/list_patition_label.txt and Image/aligned or Image/original",
    "folder": "a folder of <emotion>/ or train/<emotion>/ and test/<emotion>/ subfolders of photos",
    "faces": "a folder of <emotion>/ or train/<emotion>/ and test/<emotion>/ subfolders of face crops",
}
