"""Packs an image-folder dataset into one file small enough to travel to a lent GPU machine, and unpacks it there.

    .venv/bin/python benchmarks/pack_fer2013.py pack --data ../shared/data/fer2013 --out .device/fer2013.npz
    python3 benchmarks/pack_fer2013.py unpack --pack .device/fer2013.npz --out /tmp/fer2013

Why: the device tool sends the working tree and what `carry` names, 64 MiB in all; the project's tracked files are
about 16 MB and FER2013's 32,299 files 50.8 MB, so the folder as it is does not fit beside them. Every FER2013 JPEG
starts with the same 328 bytes (JFIF, quantisation and Huffman tables, frame and scan headers: packing the folder
finds 2 distinct headers, that one and the README's empty one), so storing each distinct header once and each file's
remaining bytes (the entropy-coded scan) packs the folder into 42.1 MB, losslessly: unpacking rebuilds every file byte for byte,
checked against the SHA-256 of the whole tree, so the GPU run trains on exactly the pixels the CPU runs do. A file
that is not a JPEG, or one whose header differs, is stored whole or under its own header.

The pack is a plain .npz of uint8 / int64 arrays (read with allow_pickle=False: nothing in it is unpickled).
`unpack` writes into a sibling temporary folder and renames it into place, so an interrupted or refused unpack
leaves no half-written dataset; an existing `--out` is refused rather than overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privacy.atomic import atomic_write_with  # noqa: E402

FORMAT = 1


class PackError(Exception):
    """A pack or a folder that cannot be used; the message is one line naming the file."""


def jpeg_header_length(data: bytes) -> int:
    """Bytes up to the end of the start-of-scan segment of a baseline JPEG (what precedes its entropy-coded data);
    0 for anything that is not a well-formed JPEG up to its scan, which is then stored whole."""
    if data[:2] != b"\xff\xd8":
        return 0
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return 0
        marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        at += 2 + length
        if marker == 0xDA:
            return at if at <= len(data) else 0
    return 0


def pack(folder: Path, out: Path) -> dict:
    """Writes `folder`'s files (recursively, sorted by path) into the .npz `out`; returns figures for the report."""
    if not folder.is_dir():
        raise PackError(f"{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise PackError(f"{folder}: holds no files")
    headers: dict[bytes, int] = {}
    header_index, bodies, names = [], [], []
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        digest.update(data)
        cut = jpeg_header_length(data)
        header_index.append(headers.setdefault(data[:cut], len(headers)))
        bodies.append(data[cut:])
        names.append(path.relative_to(folder).as_posix())
    header_list = list(headers)
    arrays = {
        "format": np.array([FORMAT], dtype=np.int64),
        "headers": _blob(header_list), "header_offsets": _offsets(header_list),
        "header_index": np.array(header_index, dtype=np.int64),
        "bodies": _blob(bodies), "body_offsets": _offsets(bodies),
        "names": _blob([n.encode() for n in names]), "name_offsets": _offsets([n.encode() for n in names]),
        "sha256": np.frombuffer(digest.digest(), dtype=np.uint8),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, lambda handle: np.savez(handle, **arrays))
    return {"files": len(files), "distinct_headers": len(header_list), "bytes_in": sum(p.stat().st_size for p in files),
            "bytes_out": out.stat().st_size}


def unpack(pack_file: Path, out: Path) -> int:
    """Rebuilds the packed folder at `out` (which must not exist); returns the number of files written."""
    if out.exists():
        raise PackError(f"{out}: already exists; unpack writes a new folder and overwrites nothing")
    try:
        with np.load(pack_file, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise PackError(f"{pack_file}: not a readable pack ({error})") from None
    expected = {"format", "headers", "header_offsets", "header_index", "bodies", "body_offsets", "names",
                "name_offsets", "sha256"}
    if set(arrays) != expected or int(arrays["format"][0]) != FORMAT:
        raise PackError(f"{pack_file}: not a format-{FORMAT} pack from benchmarks/pack_fer2013.py")
    headers = _split(arrays["headers"], arrays["header_offsets"])
    bodies = _split(arrays["bodies"], arrays["body_offsets"])
    names = [n.decode() for n in _split(arrays["names"], arrays["name_offsets"])]
    index = arrays["header_index"]
    if not len(names) == len(bodies) == len(index) or (len(index) and not 0 <= index.min() <= index.max() < len(headers)):
        raise PackError(f"{pack_file}: its tables disagree (damaged pack)")
    digest = hashlib.sha256()
    files = [(name, headers[h] + body) for name, h, body in zip(names, index, bodies)]
    for _, data in files:
        digest.update(data)
    if digest.digest() != arrays["sha256"].tobytes():
        raise PackError(f"{pack_file}: the rebuilt files do not match the packed SHA-256 (damaged pack)")
    outside = [name for name in names if not name or ".." in Path(name).parts or Path(name).is_absolute()]
    if outside:
        raise PackError(f"{pack_file}: names a path outside the folder ({outside[0]!r})")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for name, data in files:
        target = partial / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    os.replace(partial, out)
    return len(files)


def _blob(parts: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def _offsets(parts: list[bytes]) -> np.ndarray:
    return np.concatenate(([0], np.cumsum([len(p) for p in parts], dtype=np.int64))).astype(np.int64)


def _split(blob: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = blob.tobytes()
    return [raw[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack", help="folder -> one .npz")
    packing.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/fer2013")
    packing.add_argument("--out", type=Path, default=Path(".device/fer2013.npz"))
    unpacking = verbs.add_parser("unpack", help="one .npz -> folder")
    unpacking.add_argument("--pack", type=Path, default=Path(".device/fer2013.npz"))
    unpacking.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.verb == "pack":
            figures = pack(args.data, args.out)
            print(f"packed {figures['files']} files ({figures['bytes_in'] / 1e6:.1f} MB, "
                  f"{figures['distinct_headers']} distinct headers) into {args.out} ({figures['bytes_out'] / 1e6:.1f} MB)")
        else:
            print(f"unpacked {unpack(args.pack, args.out)} files into {args.out}")
    except PackError as error:
        print(f"pack_fer2013: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
