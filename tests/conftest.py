"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Small tensors: one intra-op thread is as fast and does not fight other tests for the 2 shared cores.
    Restored afterwards for other modules' tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def superlink_identity():
    """Messages are stamped with the sending process's identity; a test that builds them plays the SuperLink's
    ServerApp. The identity is process-wide, so it is put back afterwards for every other module's tests."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# `make test` runs the suite on both cores in two fixed halves (pytest-xdist, `-n 2`), one per worker, each in
# collection order, so a module-scoped fixture (a whole federation) is built once. The first half is the modules that
# run federations of real processes (many fer-client, SuperNode and ClientApp processes each, one federation at a
# time: their heartbeats and kill windows assume it) plus the default-run test to balance the halves: by the
# per-module durations of a serial run on this 2-core machine, ~950 s and ~1,080 s of its 2,030 s.
_PROCESS_HALF = {"test_deploy_faults", "test_deploy_e2e", "test_fab_signing", "test_ledger_registry",
                 "test_control_api", "test_recipe"}


@pytest.hookimpl(optionalhook=True)  # `pytest -p no:xdist` (one process) has no such hook
def pytest_xdist_make_scheduler(config, log):
    """Splits the run into the two halves above (xdist's own --dist loadgroup reads the group into the test's
    id, which pytest 9.2 no longer lets a plugin rewrite: with it the halves were silently mixed)."""
    from xdist.scheduler import LoadScopeScheduling

    class Halves(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "processes" if Path(nodeid.split("::")[0]).stem in _PROCESS_HALF else "in-process"

    return Halves(config, log)
