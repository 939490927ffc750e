"""benchmarks/pack_fer2013.py: the dataset pack the GPU run carries rebuilds the folder byte for byte, or refuses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "pack_fer2013", Path(__file__).resolve().parents[1] / "benchmarks" / "pack_fer2013.py")
pack_fer2013 = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(pack_fer2013)


def _make_folder(root: Path) -> Path:
    """A FER2013-like tree: JPEGs at two qualities (two distinct headers), in two splits, and a README."""
    rng = np.random.default_rng(0)
    for split, emotion, quality in (("train", "happy", 95), ("train", "sad", 95), ("test", "happy", 75)):
        folder = root / split / emotion
        folder.mkdir(parents=True)
        for i in range(3):
            face = rng.integers(0, 256, (48, 48), dtype=np.uint8)
            ok, data = cv2.imencode(".jpg", face, [cv2.IMWRITE_JPEG_QUALITY, quality])
            assert ok
            (folder / f"{split}_{i}.jpg").write_bytes(data.tobytes())
    (root / "README.md").write_text("# a test folder\n")
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_unpack_rebuilds_every_file_byte_for_byte(tmp_path):
    """Pack then unpack gives the same files with the same bytes, each JPEG header stored once."""
    # Prepare
    source = _make_folder(tmp_path / "src")
    # Execute
    figures = pack_fer2013.pack(source, tmp_path / "p.npz")
    written = pack_fer2013.unpack(tmp_path / "p.npz", tmp_path / "out")
    # Assert
    assert _tree(tmp_path / "out") == _tree(source)
    assert written == figures["files"] == 10
    assert figures["distinct_headers"] == 3  # quality 95, quality 75, and the README stored whole
    assert figures["bytes_out"] < figures["bytes_in"] + 4096  # headers are not repeated per file


def test_jpeg_header_length_ends_at_the_scan_header():
    """The cut is where the entropy-coded data starts: right after the start-of-scan segment."""
    # Prepare
    ok, data = cv2.imencode(".jpg", np.full((48, 48), 128, np.uint8))
    data = data.tobytes()
    sos = data.index(b"\xff\xda")
    # Execute
    cut = pack_fer2013.jpeg_header_length(data)
    # Assert
    assert cut == sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    assert pack_fer2013.jpeg_header_length(b"# not a jpeg") == 0


def _rewrite(pack: Path, **changes) -> None:
    with np.load(pack, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays.update(changes)
    with open(pack, "wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize("damage", ["flip_a_byte", "escape_the_folder"])
def test_a_damaged_pack_is_refused_and_writes_nothing(tmp_path, damage):
    """A pack whose bytes or names were altered is refused in one line and leaves no folder behind."""
    # Prepare
    pack = tmp_path / "p.npz"
    pack_fer2013.pack(_make_folder(tmp_path / "src"), pack)
    with np.load(pack, allow_pickle=False) as npz:
        bodies, names, offsets = npz["bodies"].copy(), npz["names"].tobytes(), npz["name_offsets"]
    if damage == "flip_a_byte":
        bodies[len(bodies) // 2] ^= 0xFF
        _rewrite(pack, bodies=bodies)
    else:
        first = names[: int(offsets[1])]
        evil = b"../" + first[3:]  # same length, so the offsets still hold
        _rewrite(pack, names=np.frombuffer(evil + names[len(first):], dtype=np.uint8))
    # Execute
    with pytest.raises(pack_fer2013.PackError) as refused:
        pack_fer2013.unpack(pack, tmp_path / "out")
    # Assert
    assert "\n" not in str(refused.value) and str(pack) in str(refused.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unpack_never_overwrites(tmp_path, capsys):
    """An existing target folder is refused with exit code 2 and kept as it was."""
    # Prepare
    pack = tmp_path / "p.npz"
    pack_fer2013.pack(_make_folder(tmp_path / "src"), pack)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    # Execute
    code = pack_fer2013.main(["unpack", "--pack", str(pack), "--out", str(tmp_path / "out")])
    # Assert
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert _tree(tmp_path / "out") == {"keep.txt": b"mine"}
