"""The SuperNode's output on the operator's terminal: Flower's lines pass, a Python traceback becomes one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from client.relay import OutputRelay, relay_lines

# Real Python output: a thread's unraisable error at shutdown (what the SuperNode printed in CI of c732bbe) and a
# chained exception, each between ordinary log lines.
_CHILD = r'''
import sys, threading
print("INFO :      Starting Flower SuperNode", flush=True)
print("ERROR :     Connection refused", file=sys.stderr, flush=True)
def fail():
    raise OSError("Signal 15 ignored due to race condition")
thread = threading.Thread(target=fail)
thread.start(); thread.join()
print("INFO :      between", flush=True)
try:
    try:
        {}["missing"]
    except KeyError:
        raise RuntimeError("second")
except RuntimeError:
    import traceback; traceback.print_exc()
sys.stdout.flush()
print("INFO :      last line", file=sys.stderr, flush=True)
'''


def _child_output() -> list[str]:
    """What a real Python child prints, stdout and stderr merged as the relay receives them."""
    done = subprocess.run([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=True, timeout=60)
    return done.stdout.splitlines()


def _relay(lines: list[str]) -> tuple[list[str], int]:
    shown: list[str] = []
    blocks = relay_lines(lines, show=shown.append, log_name="site/supernode.log")
    return shown, blocks


def test_tracebacks_become_one_line_each_and_the_other_lines_pass_in_order():
    """Two real traceback blocks are replaced by one line each naming their last exception; Flower's lines stay."""
    # Prepare
    lines = _child_output()
    assert sum("Traceback" in line for line in lines) == 3  # the thread's, and the chained pair

    # Execute
    shown, blocks = _relay(lines)

    # Assert
    assert blocks == 2
    assert shown == [
        "INFO :      Starting Flower SuperNode",
        "ERROR :     Connection refused",
        "fer-client: the SuperNode printed a Python error (OSError: Signal 15 ignored due to race condition); "
        "full text in site/supernode.log",
        "INFO :      between",
        "fer-client: the SuperNode printed a Python error (RuntimeError: second); full text in site/supernode.log",
        "INFO :      last line",
    ]


def test_a_traceback_at_the_end_of_the_output_is_still_replaced():
    """A child that dies with a traceback as its last words gets the one line, not silence and not the frames."""
    # Prepare
    lines = ["INFO : hello", "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "    boom()", "ValueError: boom"]

    # Execute
    shown, blocks = _relay(lines)

    # Assert
    assert (blocks, shown) == (1, ["INFO : hello", "fer-client: the SuperNode printed a Python error "
                                                   "(ValueError: boom); full text in site/supernode.log"])


def test_a_preamble_without_a_traceback_and_blank_lines_are_shown():
    """'Exception in thread' not followed by a traceback is Flower's text, shown as is, blank lines included."""
    # Prepare
    lines = ["Exception in thread pool: none", "", "INFO : next"]

    # Execute
    shown, blocks = _relay(lines)

    # Assert
    assert (blocks, shown) == (0, lines)


def test_output_relay_logs_everything_and_shows_the_filtered_lines(tmp_path: Path):
    """The relay thread appends the child's whole output to the log (frames included) and shows the filtered lines."""
    # Prepare
    log = tmp_path / "supernode.log"
    log.write_text("an earlier start's line\n")
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shown: list[str] = []

    # Execute
    relay = OutputRelay(child.stdout, log_file=log, show=shown.append, log_name=str(log)).start()
    child.wait(timeout=60)
    relay.join(timeout=10)

    # Assert
    logged = log.read_text().splitlines()
    assert logged[0] == "an earlier start's line"
    assert logged[1:] == _child_output()
    assert not any("Traceback" in line or line.startswith("  File") for line in shown)
    assert shown[-1] == "INFO :      last line" and len(shown) == 6


def test_output_relay_keeps_relaying_when_the_log_cannot_be_written(tmp_path: Path):
    """A log that cannot be opened is one line; the child's lines still flow (a stalled reader would block it)."""
    # Prepare
    log = tmp_path / "missing-folder" / "supernode.log"
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shown: list[str] = []

    # Execute
    relay = OutputRelay(child.stdout, log_file=log, show=shown.append, log_name=str(log)).start()
    child.wait(timeout=60)
    relay.join(timeout=10)

    # Assert
    assert shown[0].startswith(f"fer-client: cannot write {log} (")
    assert shown[1:3] == ["INFO :      Starting Flower SuperNode", "ERROR :     Connection refused"]
    assert shown[-1] == "INFO :      last line" and len(shown) == 7
    assert not log.exists()
