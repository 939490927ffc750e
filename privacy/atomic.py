"""One way to replace a file on disk: never half-written, still there after a power loss.

Every layer writes files that must survive a crash whole (privacy ledgers, SecAgg+ contributions, released updates,
keys, certificates, run records), and privacy/ is the lowest layer that every writer may import (client/ and server/
import privacy/; design.md), so the one implementation lives here.

The sequence is the strongest any former copy used: a temporary file in the same folder (a rename is atomic only
within one file system), fsync the file, rename it over the target, fsync the folder (the rename lives in the
directory, not in the file, so without it a power loss can bring the old name back). Temporary names are
``.<target name>.<random>.tmp``, the pattern privacy/ledger.py sweeps away as leftovers of killed writes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_with"]


def atomic_write(target: Path | str, payload: bytes | str, *, mode: int | None = None) -> Path:
    """Replaces `target` with `payload` atomically and durably.

    Args:
        target: The file to write; its folder must exist.
        payload: Bytes, or text (written as UTF-8).
        mode: File mode, e.g. ``0o600`` for a secret. The temporary file is created 0600 (mkstemp), so a secret is
            never readable by others, not even briefly; without `mode` the file gets 0666 less the umask, as
            ``open`` would give it.

    Returns:
        The target path.
    """
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    return atomic_write_with(target, lambda handle: handle.write(data), mode=mode)


def atomic_write_with(target: Path | str, write: Callable[[BinaryIO], object], *, mode: int | None = None) -> Path:
    """Like :func:`atomic_write`, for writers that stream into a binary file handle (e.g. ``np.savez``).

    If `write` raises, the target keeps its previous content and no temporary file is left.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
    return target


def fsync_directory(path: Path) -> None:
    """Flushes a folder's entries (renames, new names) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    # Linux shows the umask in /proc without changing it; elsewhere os.umask can only be read by setting it, which
    # for an instant changes it for every thread of the process.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current
