"""Run options shared by `fer-sim run` and `fer-sim centralized`: the command line over a TOML file over defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click

from client.config import ConfigError, RunSettings


def load_toml(path: Path) -> dict[str, Any]:
    """Reads a run-config TOML (flat kebab-case keys, or a `[tool.flwr.app.config]` table as in pyproject.toml)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise click.ClickException(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise click.ClickException(f"{path}: not valid TOML ({err})") from None
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
    if isinstance(table.get("dataset"), list):
        table["dataset"] = ";".join(table["dataset"])
    return table


def resolve_settings(*, config_file: Path | None, overrides: dict[str, Any]) -> RunSettings:
    """Defaults, then the TOML file, then every command-line option that was given.

    Raises:
        click.ClickException: an invalid value, naming the key (and the file when it came from one).
    """
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(load_toml(config_file))
        try:
            RunSettings.from_run_config(dict(merged))
        except ConfigError as err:
            raise click.ClickException(f"{config_file}: {err}") from None
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunSettings.from_run_config(merged)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
