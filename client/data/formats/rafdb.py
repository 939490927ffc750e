"""RAF-DB basic: EmoLabel/list_patition_label.txt + Image/aligned (cropped, aligned) or Image/original (photos)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from client.data.formats.audit import _finish, _LoadProblems
from client.data.formats.dataset import _EXPECTED, SPLIT_ORDER, DatasetError, FERDataset
from client.data.formats.images import _decode_items, _Item
from client.data.labels import RAFDB_TO_LABEL

_RAFDB_LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"


def _load_rafdb(root_arg: str, *, image_size: int) -> FERDataset:
    root = Path(root_arg)
    if not (root / _RAFDB_LABEL_FILE).is_file() and (root / "basic" / _RAFDB_LABEL_FILE).is_file():
        root = root / "basic"  # the archive unpacks to basic/; accept its parent too
    label_file = root / _RAFDB_LABEL_FILE
    if not label_file.is_file():
        raise DatasetError(f"{label_file}: not found (expected {_EXPECTED['rafdb']})")
    aligned, original = root / "Image" / "aligned", root / "Image" / "original"
    if aligned.is_dir():
        fmt, image_dir = "rafdb-aligned", aligned
    elif original.is_dir():
        fmt, image_dir = "rafdb-original", original
    else:
        raise DatasetError(f"{root / 'Image'}: no aligned/ or original/ image folder (expected {_EXPECTED['rafdb']})")

    loaded = _LoadProblems()
    items: list[_Item] = []
    try:
        lines = label_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{label_file}: cannot read as text ({err})") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file}:{number}"
        if len(fields) != 2:
            raise DatasetError(f"{where}: expected 'IMAGE LABEL' (e.g. 'train_00001.jpg 5'), got '{line[:40]}'")
        filename, raf_label = fields
        split = "train" if filename.startswith("train_") else "test" if filename.startswith("test_") else ""
        if not split:
            raise DatasetError(f"{where}: image name '{filename[:40]}' does not start with train_ or test_")
        if not raf_label.isdigit() or int(raf_label) not in RAFDB_TO_LABEL:
            raise DatasetError(f"{where}: label '{raf_label[:20]}' is out of range 1..7")
        stem, suffix = os.path.splitext(filename)
        image_name = f"{stem}_aligned{suffix}" if fmt == "rafdb-aligned" else filename
        relpath = f"Image/{image_dir.name}/{image_name}"
        if not os.path.isfile(os.path.join(root, relpath)):
            loaded.missing.add(relpath)
            continue
        items.append(_Item(split=split, label=RAFDB_TO_LABEL[int(raf_label)], relpath=relpath))
    if not items and loaded.missing.count == 0:
        raise DatasetError(f"{label_file}: no labelled images listed")
    items.sort(key=lambda it: (SPLIT_ORDER.index(it.split), it.relpath))
    native_sizes: Counter[str] = Counter()
    contents = _decode_items(root, items, image_size=image_size, detect_faces=fmt == "rafdb-original",
                             loaded=loaded, native_sizes=native_sizes)
    return _finish("rafdb", fmt, root_arg, contents, loaded, native_sizes)
