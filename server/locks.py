"""The locks a running `fer-server start`/`resume` holds (its state directory and its run directory), and the
one-line refusals a second coordinator gets while they are held."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.lifetime import InstanceLock, LockedError, LockHolder, port_holder, port_in_use
from server.deploy import DeployError, _port_taken

STATE_LOCK = "fer-server.lock"


@dataclass
class CoordinatorLocks:
    """The locks a running `fer-server start`/`resume` holds: its state directory and its run directory.

    The run directory's lock is a hidden file beside it (`.NAME.fer-server.lock`): inside, it would make a new
    run directory non-empty."""

    state: InstanceLock
    run: InstanceLock

    @staticmethod
    def paths(*, state_dir: Path, run_dir: Path) -> tuple[Path, Path]:
        run_dir = Path(run_dir).resolve()
        return Path(state_dir).resolve() / STATE_LOCK, run_dir.parent / f".{run_dir.name}.fer-server.lock"

    @classmethod
    def probe(cls, *, state_dir: Path, run_dir: Path, host: str, port: int) -> None:
        """Checks for a live predecessor without writing anything.

        Raises:
            DeployError: one line naming the live holder (state directory, run directory or port) and what to do.
        """
        for lock_path, what, otherwise in cls._checks(state_dir=state_dir, run_dir=run_dir):
            holder = InstanceLock.holder_of(lock_path)
            if holder is not None:
                raise DeployError(_in_use(what, holder, otherwise))
        if port_in_use(host, port):
            raise DeployError(_port_taken(port, port_holder(port)))

    @classmethod
    def claim(cls, *, state_dir: Path, run_dir: Path, host: str, port: int, command: str) -> CoordinatorLocks:
        """`probe`, then takes both locks (creating the state directory): nothing is written unless it passes.

        Raises:
            DeployError: as `probe`, also when another start wins the race for a lock.
        """
        cls.probe(state_dir=state_dir, run_dir=run_dir, host=host, port=port)
        locks: list[InstanceLock] = []
        try:
            for lock_path, what, otherwise in cls._checks(state_dir=state_dir, run_dir=run_dir):
                try:
                    locks.append(InstanceLock.acquire(lock_path, command=command))
                except LockedError as err:
                    raise DeployError(_in_use(what, err.holder or LockHolder(0, "another process"), otherwise)) from None
        except BaseException:
            for lock in locks:
                lock.release()
            raise
        return cls(state=locks[0], run=locks[1])

    @classmethod
    def _checks(cls, *, state_dir: Path, run_dir: Path) -> tuple[tuple[Path, str, str], ...]:
        state_lock, run_lock = cls.paths(state_dir=state_dir, run_dir=run_dir)
        return ((state_lock, f"state directory {Path(state_dir).resolve()}", "use another --state-dir"),
                (run_lock, f"run directory {Path(run_dir).resolve()}", "let it finish"))

    @property
    def fds(self) -> tuple[int, int]:
        return self.state.fd, self.run.fd

    def add_helper(self, pid: int) -> None:
        """Records the SuperLink's supervisor, which holds both locks until its tree is gone."""
        self.state.add_helper(pid)
        self.run.add_helper(pid)

    def release(self) -> None:
        self.state.release()
        self.run.release()


def _in_use(what: str, holder: LockHolder, otherwise: str) -> str:
    return f"{what} is in use by {holder.describe()}: {holder.advice(otherwise)}"
