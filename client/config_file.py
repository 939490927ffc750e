"""Run-config TOML files (`fer-server --config`, `fer-sim run/centralized --config`): read into the flat run-config
dict that `client.config.RunSettings.from_run_config` checks."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from client.config import ConfigError


def read_run_config_file(path: Path) -> dict[str, Any]:
    """Reads a run-config TOML file for `fer-server --config` and `fer-sim run/centralized --config`.

    The file holds flat kebab-case keys, or a `[tool.flwr.app.config]` table as in pyproject.toml; a `dataset` given
    as a list of specs is joined with ';' (the run config's one-string form). The keys are checked later, by
    `RunSettings.from_run_config`.

    Raises:
        ConfigError: the file is missing or not valid TOML, in one line naming it.
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
    if isinstance(table.get("dataset"), list):
        table["dataset"] = ";".join(table["dataset"])
    return table
