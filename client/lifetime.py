"""Process lifetime for `fer-server` and `fer-client`: nothing they start outlives them, and no second copy starts
over a live first one.

**Supervision.** Flower's SuperLink and SuperNode start children of their own (`flower-superexec`, which starts
`flwr-serverapp` / `flwr-clientapp`, some in new sessions). A parent-death signal set on our direct child does not
reach them (Linux clears it on fork), and a process-group kill misses the ones in new sessions. So every Flower
process is started under a small supervisor, `python -m client.lifetime -- CMD...`, which:

- is a *child subreaper* (PR_SET_CHILD_SUBREAPER): whatever Flower detaches or orphans below it is re-parented to
  it, never to init, so the whole tree stays findable under its pid;
- reads a pipe whose only writer is the command that started it: when that command dies, however (SIGKILL, OOM
  kill, a crash), the kernel closes the pipe, the supervisor reads end-of-file and stops the whole tree (SIGTERM,
  then SIGKILL after a grace period), then exits;
- gives its direct child PR_SET_PDEATHSIG(SIGKILL), so killing the supervisor itself also takes the Flower
  process down (Flower's own helpers watch their `--parent-pid` and follow);
- exits only when no descendant is left, so a lock it inherited (below) is released only then.

**Single instance.** `InstanceLock` is an fcntl lock file holding the JSON `{"pid", "command", "helpers"}` of the
process that owns a directory. The kernel drops an flock when the last descriptor on it closes, so a SIGKILLed
owner's lock is free at once (taken over safely, its file rewritten); the owner hands the descriptor to its
supervisors, so the lock stays held until the last process of its tree is gone.
"""

from __future__ import annotations

import ctypes
import functools
import errno
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# SIGTERM first: the SuperLink closes its SQLite state and the SuperNode its connection. Then SIGKILL.
GRACE_SECONDS = 3.0

# Write ends of supervisors' lifeline pipes, by supervisor pid: open for as long as this process lives.
_LIFELINES: dict[int, int] = {}


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def die_with_parent(parent: int) -> None:
    """`preexec_fn` (with `functools.partial(die_with_parent, os.getpid())`) for a child that must not outlive
    `parent`, the process that starts it (Linux parent-death signal).

    The signal is armed only from here on: a parent that died between the fork and this call would be missed, so
    the child then exits at once (it has been re-parented already)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def dying_with_me() -> Any:
    """The `preexec_fn` that ties a child to this process: it gets SIGKILL when this process dies."""
    return functools.partial(die_with_parent, os.getpid())


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc), children first. Flower detaches some of its helpers into new
    sessions, so a process-group kill misses them; walking the parent links does not."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cmdline(pid: int) -> str:
    """A process's command line, space-joined ('' when it is gone)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True when `pid` is a live process (a zombie counts as gone)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def spawn_supervised(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, stdout: Any = None,
    stderr: Any = None, pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen:
    """Starts `cmd` under a supervisor (see the module docstring) and returns the supervisor's Popen.

    Stop it with `stop_tree(process)`; if this process dies first, the supervisor stops the tree by itself.
    `pass_fds` reach the supervisor only (e.g. an `InstanceLock`'s descriptor), never `cmd`.
    """
    read_end, write_end = os.pipe()  # both non-inheritable; only the read end is handed over, as stdin
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "client.lifetime", "--", *cmd], stdin=read_end, stdout=stdout, stderr=stderr,
            env=env, cwd=cwd, pass_fds=pass_fds,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    _LIFELINES[process.pid] = write_end
    return process


def stop_tree(process: subprocess.Popen, *, timeout: float = 5.0, kill: bool = False) -> None:
    """Stops `process` and everything it started: SIGTERM (SIGKILL with `kill`), then SIGKILL after `timeout`.

    For a supervised process the supervisor does the work (and is the one that finds what Flower detached); the
    walk over /proc here covers processes started without one."""
    write_end = _LIFELINES.pop(process.pid, None)
    try:
        if process.poll() is not None:
            return
        pids = [process.pid, *descendants(process.pid)]
        # A polite signal first (unless told to kill), then SIGKILL for whatever is still there.
        for sig in ([] if kill else [signal.SIGTERM]) + [signal.SIGKILL]:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    if sig == signal.SIGTERM:
                        os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
                except ProcessLookupError:
                    pass
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if write_end is not None:
            os.close(write_end)


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop(signum)


def _reap(child: int) -> int | None:
    """Reaps every exited descendant (we are their subreaper); returns `child`'s exit code if it was among them."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if pid == 0:
            return code
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code


def _stop_descendants(grace: float) -> None:
    """SIGTERM to every descendant, SIGKILL to those left after `grace` seconds; returns when none is left."""
    me = os.getpid()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        for pid in descendants(me):
            try:
                os.kill(pid, sig)
                if sig == signal.SIGTERM:
                    os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(-1)
            if not any(pid_alive(pid) for pid in descendants(me)):
                _reap(-1)
                return
            time.sleep(0.05)


def supervise(cmd: list[str], *, grace: float = GRACE_SECONDS) -> int:
    """The supervisor's body: runs `cmd` until it exits, stdin reaches end-of-file (our starter died) or a signal
    arrives; then stops every descendant. Returns `cmd`'s exit code, or 128+signal when stopped."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    code: int | None = None
    try:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=dying_with_me())
        while code is None:
            code = _reap(child.pid)
            if code is not None:
                break
            readable, _, _ = select.select([0], [], [], 0.5)
            if readable and not os.read(0, 4096):
                code = 128 + signal.SIGTERM  # our starter is gone: so must everything under us be
    except _Stop as stop:
        code = 128 + stop.signum
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the clean-up below must not be interrupted half-way
    _stop_descendants(grace)
    return code


# --- single-instance locks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockHolder:
    """Who holds an `InstanceLock`: the owning command's pid, its supervisors' pids, and its command line."""

    pid: int
    command: str
    helpers: tuple[int, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "command": self.command, "helpers": list(self.helpers)})

    @classmethod
    def from_json(cls, text: str) -> LockHolder:
        data = json.loads(text)
        return cls(pid=int(data["pid"]), command=str(data["command"]),
                   helpers=tuple(int(p) for p in data.get("helpers", [])))

    def describe(self) -> str:
        """'fer-server start (pid 12)', or, when that process is gone but a supervisor is still stopping its tree,
        'the processes of a killed fer-server start (pid 12; pid 13 is stopping them)'."""
        if pid_alive(self.pid):
            return f"{self.command} (pid {self.pid})"
        live = [pid for pid in self.helpers if pid_alive(pid)]
        if live:
            return f"the processes of a killed {self.command} (pid {self.pid}; pid {live[0]} is stopping them)"
        return f"{self.command} (pid {self.pid}, exiting)"

    def advice(self, otherwise: str) -> str:
        """What the user can do about it: stop the holder, or wait for its supervisor to finish."""
        if pid_alive(self.pid):
            return f"stop it first (kill {self.pid}) or {otherwise}"
        return "retry in a few seconds"


class LockedError(RuntimeError):
    """The lock is held by a live process; `holder` says which (None when its file could not be read)."""

    def __init__(self, path: Path, holder: LockHolder | None) -> None:
        self.path = path
        self.holder = holder
        who = holder.describe() if holder else "another process"
        super().__init__(f"{path} is locked by {who}")


@dataclass
class InstanceLock:
    """An exclusive fcntl lock on `path`, whose content names the owner (see the module docstring)."""

    path: Path
    fd: int
    holder: LockHolder
    _closed: bool = field(default=False, repr=False)

    @staticmethod
    def holder_of(path: Path) -> LockHolder | None:
        """The live holder of the lock at `path`, or None when it is free; writes nothing."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return LockHolder.from_json(os.pread(fd, 4096, 0).decode())
                except (ValueError, KeyError, TypeError):
                    return LockHolder(pid=0, command="an unknown process")
            return None  # free: a dead predecessor's lock, taken over by acquire()
        finally:
            os.close(fd)

    @classmethod
    def acquire(cls, path: Path, *, command: str) -> InstanceLock:
        """Takes the lock (creating its folder and file if needed) and writes our pid into it.

        Raises:
            LockedError: a live process holds it.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = LockHolder.from_json(os.pread(fd, 4096, 0).decode())
            except (ValueError, KeyError, TypeError):
                holder = None
            os.close(fd)
            raise LockedError(path, holder) from None
        lock = cls(path=path, fd=fd, holder=LockHolder(pid=os.getpid(), command=command))
        lock._write()
        return lock

    def add_helper(self, pid: int) -> None:
        """Records a supervisor that holds this lock too (it inherited the descriptor)."""
        self.holder = LockHolder(pid=self.holder.pid, command=self.holder.command, helpers=(*self.holder.helpers, pid))
        self._write()

    def _write(self) -> None:
        data = (self.holder.to_json() + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self) -> None:
        """Drops our descriptor (supervisors that inherited it keep the lock until they exit)."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)


def port_holder(port: int) -> int | None:
    """The pid of a process of ours listening on TCP `port` (from /proc/net/tcp{,6} and /proc/*/fd), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


def port_in_use(host: str, port: int) -> bool:
    """True when binding `host:port` for listening fails because something already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: python -m client.lifetime -- COMMAND [ARGS...]")
    sys.exit(supervise(args))


if __name__ == "__main__":
    main()
