"""Passing the SuperNode's output to the operator's terminal: Flower's lines as they come, its tracebacks as one line.

`fer-client start` shows what `flower-supernode` prints (its "Connection refused" is the best explanation of a
failed join), and keeps a copy of all of it in the state folder's `supernode.log`. A Python traceback is not for
the operator's screen: the CLI contract (client/cli/runner.py) is one line per failure. Evidence that they do
arrive: a SuperNode that gives up on an unreachable server can race its own SIGTERM handling while its threads
shut down and print `Traceback ... threading.py ... _acquire_restore ... OSError` (seen in CI of c732bbe, on a
loaded 2-core machine). So a traceback block goes to the log only, and the terminal gets one line naming its
last exception and the log.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

TRACEBACK_HEADER = "Traceback (most recent call last):"
# Python prints these before or between the tracebacks of one failure (unraisable hooks, chained exceptions).
_PREAMBLES = ("Exception ignored in", "Exception in thread")
_CHAINS = ("During handling of the above exception", "The above exception was the direct cause")
_SHOWN_EXCEPTION_CHARS = 200


def relay_lines(lines: Iterable[str], *, show: Callable[[str], None], log_name: str, prog: str = "fer-client") -> int:
    """Calls `show` for each line of `lines` that is not part of a Python traceback; returns the blocks held back.

    A block is an optional preamble line ("Exception ignored in ...", "Exception in thread ..."), the traceback
    header, its indented frames, the exception line, and any chained tracebacks after it. In its place `show` gets
    one line: `<prog>: the SuperNode printed a Python error (<exception line>); full text in <log_name>`.

    Args:
        lines: The child's output, one line each, without line ends.
        show: Where the operator's lines go.
        log_name: The log that holds the full text, named in the replacement line.
        prog: The program name that starts the replacement line.
    """
    held: list[str] = []  # a preamble or blank lines whose fate depends on the next line
    in_block = False  # inside frames (indented lines) of a traceback
    after_exception = False  # the exception line was seen; a chain may still follow
    exception = ""
    blocks = 0

    def close_block() -> None:
        nonlocal after_exception, blocks
        text = exception.strip()[:_SHOWN_EXCEPTION_CHARS] or "no exception line"
        show(f"{prog}: the SuperNode printed a Python error ({text}); full text in {log_name}")
        after_exception = False
        blocks += 1

    for line in lines:
        if TRACEBACK_HEADER in line:
            held.clear()  # its preamble, or the blank lines of a chain, belong to the block
            in_block, after_exception = True, False
            continue
        if in_block:
            if line.startswith((" ", "\t")) or not line.strip():
                continue  # a frame, its source line, a caret line, an exception group's box
            exception, in_block, after_exception = line, False, True
            continue
        if after_exception:
            if not line.strip():
                held.append(line)
                continue
            if line.startswith(_CHAINS):
                held.clear()
                continue
            close_block()
            held.clear()  # the blank lines after an exception are part of Python's chain format, not Flower's output
        if line.startswith(_PREAMBLES):
            for waiting in held:
                show(waiting)
            held = [line]
            continue
        for waiting in held:
            show(waiting)
        held.clear()
        show(line)
    if in_block or after_exception:
        close_block()
    for waiting in held:
        show(waiting)
    return blocks


class OutputRelay:
    """A thread that copies a child's output (a binary pipe) to `log_file` in full and, filtered by `relay_lines`,
    to `show`. `join()` after the child has exited returns once everything it printed has been shown."""

    def __init__(self, source: IO[bytes], *, log_file: Path, show: Callable[[str], None], log_name: str) -> None:
        self._source = source
        self._log_file = log_file
        self._show = show
        self._log_name = log_name
        self._thread = threading.Thread(target=self._run, name="supernode-output", daemon=True)

    def start(self) -> OutputRelay:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            log = open(self._log_file, "a", encoding="utf-8", errors="replace")
        except OSError as err:
            # Still relay: a reader that stopped would leave the SuperNode blocked on a full pipe.
            self._show(f"fer-client: cannot write {self._log_file} ({err.strerror}); the SuperNode's tracebacks are "
                       "not kept")
            log = None

        def lines():
            for raw in self._source:
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if log is not None:
                    log.write(text + "\n")
                    log.flush()
                yield text

        try:
            relay_lines(lines(), show=self._show, log_name=self._log_name)
        finally:
            if log is not None:
                log.close()
