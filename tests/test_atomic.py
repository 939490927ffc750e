"""privacy/atomic.py: the one atomic, durable file write every layer uses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from privacy.atomic import atomic_write, atomic_write_with


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def test_atomic_write_replaces_content_and_leaves_no_temporary_file(tmp_path):
    """A second write replaces the first whole; no .tmp file stays behind."""
    # Prepare
    target = tmp_path / "record.json"
    atomic_write(target, b"old")
    # Execute
    atomic_write(target, "new text")
    # Assert
    assert target.read_text() == "new text"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_atomic_write_secret_mode_is_owner_only(tmp_path):
    """mode=0o600 gives a file only its owner can read."""
    # Execute
    target = atomic_write(tmp_path / "node.key", b"secret", mode=0o600)
    # Assert
    assert _mode(target) == 0o600 and target.read_bytes() == b"secret"


def test_atomic_write_without_mode_is_not_private(tmp_path):
    """Without mode the file is readable by others, as open() would make it (public certs, reports)."""
    # Execute
    target = atomic_write(tmp_path / "ca.pem", b"public")
    # Assert
    assert _mode(target) == 0o666 & ~_umask()


def test_atomic_write_with_failure_keeps_old_content(tmp_path):
    """A writer that raises half-way leaves the previous file intact and no temporary file."""
    # Prepare
    target = tmp_path / "released-update.npz"
    atomic_write_with(target, lambda handle: np.savez(handle, a=np.arange(3)))

    def _half_write(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    # Execute
    with pytest.raises(RuntimeError):
        atomic_write_with(target, _half_write)
    # Assert
    with np.load(target) as data:
        assert data["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["released-update.npz"]
