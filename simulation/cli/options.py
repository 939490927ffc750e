"""Run options shared by `fer-sim run` and `fer-sim centralized`: the command line over a TOML file over defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from client.config import ConfigError, RunSettings
from client.config_file import read_run_config_file


def resolve_settings(*, config_file: Path | None, overrides: dict[str, Any]) -> RunSettings:
    """Defaults, then the TOML file, then every command-line option that was given; an `init-model` is checked
    (and names the model where neither the file nor the command line does).

    Raises:
        click.ClickException: an invalid value, naming the key (and the file when it came from one).
    """
    merged: dict[str, Any] = {}
    if config_file is not None:
        try:
            merged.update(read_run_config_file(config_file))
        except ConfigError as err:
            raise click.ClickException(str(err)) from None
        try:
            RunSettings.from_run_config(dict(merged))
        except ConfigError as err:
            raise click.ClickException(f"{config_file}: {err}") from None
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = RunSettings.from_run_config(merged)
        if settings.init_model:
            from server.init_model import with_init_model

            settings = with_init_model(settings, model_given="model" in merged)
        return settings
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
