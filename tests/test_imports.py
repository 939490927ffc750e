"""Every project module imports on its own, in a fresh interpreter: no import circle, no hidden order dependence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "privacy", "client", "server", "simulation")

# One interpreter for all modules (a subprocess each would take minutes): before each import every project module
# is dropped from sys.modules, so each one is imported as if it came first. Third-party modules stay cached; they
# cannot hide a circle among ours.
_PROBE = r"""
import importlib, sys, traceback
names, packages = sys.argv[1:], tuple(sys.argv[1].split(","))
failed = []
for name in names[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\n".join(failed))
"""


def _project_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_alone():
    """Each module of models/, privacy/, client/, server/, simulation/ imports first in a clean module table."""
    # Prepare
    modules = _project_modules()
    # Execute
    done = subprocess.run([sys.executable, "-c", _PROBE, ",".join(PACKAGES), *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout
    assert len(modules) > 50


# Who may import whom (docs: ../shared/design.md, "Who owns what"): a site's code (client/) never imports the
# coordinator's (server/), privacy/ serves both and imports neither, models/ imports no project package.
ALLOWED = {
    "models": set(),
    "privacy": {"models"},
    "client": {"models", "privacy"},
    "server": {"models", "privacy", "client"},
    "simulation": {"models", "privacy", "client", "server"},
}


def _project_imports(path: Path) -> set[str]:
    """Top-level project packages `path` imports anywhere, function-level imports included."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def test_no_module_imports_upward():
    """Every import between project packages follows the layering (client/ never imports server/, and so on)."""
    # Execute
    upward = [
        f"{path.relative_to(ROOT)} imports {target}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for target in _project_imports(path) - ALLOWED[package] - {package}
    ]
    # Assert
    assert upward == []


# Issue 11: a module that outgrows this has more than one job (server/strategy.py reached 457 lines unnoticed).
MAX_MODULE_LINES = 450


def test_no_project_module_is_over_the_line_limit():
    """Every module of the five packages has at most MAX_MODULE_LINES lines."""
    # Execute
    sizes = {path.relative_to(ROOT): len(path.read_text().splitlines())
             for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    # Assert
    assert len(sizes) > 50
    assert {str(path): n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}
