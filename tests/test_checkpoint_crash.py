"""Checkpoints survive a crash mid-write: a real SIGKILL between a checkpoint's two files never leaves a pair that
a resume would pick up half-written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from models.files import load_model
from server.rundir import RunDirectory

# Saves round 1 (and, when asked, an earlier round 2) completely, then writes round 2 and SIGKILLs itself just before
# the KILL_AT-th rename of that write: the process dies with the checkpoint's files half in place, as in a power cut.
_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import server.rundir as rundir

    run_path, kill_at, overwrite = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    run = rundir.RunDirectory(run_path)
    save = lambda value, rnd: run.save_model({"w": np.full(4, value, np.float32)}, model_name="cnn_am",
                                             model_cfg={}, round=rnd, checkpoint=True)
    save(1.0, 1)
    if overwrite:
        save(2.0, 2)  # a resumed run rewrites round 2 below
    renames, real_replace = [], os.replace

    def dying_replace(src, dst):
        renames.append(dst)
        if len(renames) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = dying_replace  # every write of the run directory renames through privacy/atomic.py's os.replace
    save(3.0, 2)
    """
)


def _write_and_kill(run_path, *, kill_at: int, overwrite: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WRITER, str(run_path), str(kill_at), "1" if overwrite else "0"],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("kill_at", "overwrite", "expected_round", "expected_value"),
    [(1, False, 1, 1.0), (2, False, 1, 1.0), (1, True, 2, 2.0), (2, True, 1, 1.0)],
    ids=["new-round-before-first-rename", "new-round-between-the-files", "rewrite-before-first-rename",
         "rewrite-between-the-files"],
)
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_complete_pair(
    tmp_path, kill_at, overwrite, expected_round, expected_value
):
    """SIGKILL before the first or between the two renames of round 2's checkpoint (new, or rewritten after a
    resume): latest_checkpoint returns the last pair written completely (the old round 2 while nothing new is in
    place, else round 1), and it loads with the weights saved with it."""
    # Prepare
    run_path = tmp_path / "run"

    # Execute
    result = _write_and_kill(run_path, kill_at=kill_at, overwrite=overwrite)

    # Assert
    assert result.returncode == -signal.SIGKILL, result.stderr
    latest = RunDirectory(run_path, create=False).latest_checkpoint()
    assert latest == run_path / "checkpoints" / f"round-{expected_round:03d}.pt"
    state, card = load_model(latest)
    assert card.round == expected_round
    assert np.array_equal(state["w"].numpy(), np.full(4, expected_value, np.float32))


def test_a_complete_rewrite_is_found_and_a_sidecar_without_its_model_is_not(tmp_path):
    """An uninterrupted rewrite of round 2 is the latest checkpoint; a sidecar naming a different sha256 is not."""
    # Prepare
    run = RunDirectory(tmp_path / "run")
    for value, rnd in ((1.0, 1), (2.0, 2), (3.0, 2)):
        run.save_model({"w": np.full(4, value, np.float32)}, model_name="cnn_am", model_cfg={}, round=rnd,
                       checkpoint=True)
    sidecar = tmp_path / "run" / "checkpoints" / "round-001.json"

    # Execute
    latest = run.latest_checkpoint()
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "sha256": "0" * 64}))

    # Assert
    state, _ = load_model(latest)
    assert latest.name == "round-002.pt" and np.array_equal(state["w"].numpy(), np.full(4, 3.0, np.float32))
    (tmp_path / "run" / "checkpoints" / "round-002.pt").unlink()
    assert run.latest_checkpoint() is None
