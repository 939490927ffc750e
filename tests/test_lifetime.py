"""Process lifetime (client/lifetime.py): supervised trees die with their starter, locks name a live holder and
are taken over from a dead one, a busy port names its listener. Real processes, real signals, no Flower."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.lifetime import InstanceLock, LockedError, cmdline, pid_alive, port_holder, port_in_use, stop_tree

REPO = Path(__file__).resolve().parents[1]

# Starts a supervised child that, like Flower's SuperLink, detaches a grandchild into a new session; prints
# {"supervisor": pid} and the lock it holds, then sleeps until killed.
STARTER = """
import json, sys, time
from pathlib import Path
from client.lifetime import InstanceLock, spawn_supervised
lock = InstanceLock.acquire(Path(sys.argv[1]), command="starter")
child = ("import subprocess, time; subprocess.Popen(['sleep', '600'], start_new_session=True); time.sleep(600)")
process = spawn_supervised([sys.executable, "-c", child], pass_fds=(lock.fd,))
lock.add_helper(process.pid)
print(json.dumps({"supervisor": process.pid}), flush=True)
time.sleep(600)
"""


def _make_starter(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path / "x.lock")], stdout=subprocess.PIPE,
                               text=True, env=env)
    supervisor = json.loads(starter.stdout.readline())["supervisor"]
    return starter, supervisor


def _tree_pids(pid: int, *, want: int, timeout: float = 30.0) -> list[int]:
    """`pid` and its descendants, once there are `want` of them (the grandchild starts a moment later)."""
    from client.lifetime import descendants

    deadline = time.monotonic() + timeout
    while len(pids := [pid, *descendants(pid)]) < want and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def _wait_gone(pids: list[int], *, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def test_sigkilled_starter_takes_its_whole_supervised_tree_and_lock_with_it(tmp_path):
    """SIGKILL of the starter: supervisor, child and a grandchild in its own session all exit; the lock is held
    until they have, then taken over."""
    # Prepare
    starter, supervisor = _make_starter(tmp_path)
    try:
        tree = _tree_pids(supervisor, want=3)
        commands = [cmdline(p) for p in tree]
        held_by = InstanceLock.holder_of(tmp_path / "x.lock")

        # Execute
        starter.send_signal(signal.SIGKILL)
        starter.wait(timeout=10)
        left = _wait_gone(tree, timeout=20)
        lock = InstanceLock.acquire(tmp_path / "x.lock", command="successor")
    finally:
        for pid in _tree_pids(supervisor, want=0, timeout=0):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    # Assert
    assert len(tree) == 3, tree
    assert commands[-1] == "sleep 600"  # the grandchild in its own session, found by the /proc walk
    assert held_by.pid == starter.pid and held_by.helpers == (supervisor,)
    assert left == []
    assert json.loads((tmp_path / "x.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_names_its_live_holder_and_refuses_a_second_owner(tmp_path):
    """A held lock: holder_of and the refused acquire name the holder's pid; nothing is rewritten."""
    # Prepare
    first = InstanceLock.acquire(tmp_path / "d" / "a.lock", command="fer-client start")
    before = (tmp_path / "d" / "a.lock").read_bytes()

    # Execute
    probed = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from client.lifetime import InstanceLock; "
                               "print(InstanceLock.holder_of(Path(sys.argv[1])).to_json())", str(first.path)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
    with pytest.raises(LockedError) as refused:
        InstanceLock.acquire(first.path, command="second")

    # Assert
    assert json.loads(probed.stdout)["pid"] == os.getpid()
    assert refused.value.holder.pid == os.getpid()
    assert f"pid {os.getpid()}" in str(refused.value)
    assert (tmp_path / "d" / "a.lock").read_bytes() == before
    first.release()


def test_free_lock_of_a_dead_owner_is_reported_free_and_taken_over(tmp_path):
    """A lock file left by a process that died reads as free and is rewritten with the new owner's pid."""
    # Prepare
    dead = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from client.lifetime import InstanceLock; "
                               "InstanceLock.acquire(Path(sys.argv[1]), command='old'); print('held')",
         str(tmp_path / "b.lock")], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=True)

    # Execute
    free = InstanceLock.holder_of(tmp_path / "b.lock")
    lock = InstanceLock.acquire(tmp_path / "b.lock", command="new")

    # Assert
    assert dead.stdout.strip() == "held"
    assert free is None
    assert json.loads((tmp_path / "b.lock").read_text()) == {"pid": os.getpid(), "command": "new", "helpers": []}
    lock.release()


def test_busy_port_names_the_listening_process():
    """port_in_use and port_holder find the pid that listens on a port (and nothing on a closed one)."""
    # Prepare
    listener = subprocess.Popen(
        [sys.executable, "-c", "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
                               "print(s.getsockname()[1], flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())

        # Execute
        busy, holder = port_in_use("127.0.0.1", port), port_holder(port)
        busy_any = port_in_use("0.0.0.0", port)
    finally:
        stop_tree(listener, timeout=3)
    listener.wait(timeout=10)

    # Assert
    assert busy and busy_any
    assert holder == listener.pid
    assert not port_in_use("127.0.0.1", port)
