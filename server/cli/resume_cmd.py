"""`fer-server resume RUN_DIR`: continue an interrupted run from its last completed round's checkpoint.

Flower marks the interrupted run as failed; this submits a new run with the same configuration that starts from
the checkpoint, writing into the same run directory (rounds after the checkpoint replace any the dead run logged).
SuperNodes reconnect by themselves; each node's privacy ledger lives on the node, so its spend carries over.

It refuses to start while anything of the dead run is still alive (its supervisor still holds the state and run
directory locks, or something holds the port): see `launch`. On success it writes summary.json, report.md and the
plots like an uninterrupted run; on failure its own SuperLink tree is stopped, so nothing goes on advancing the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import click
import typer

from client.cli.runner import option_group
from server.cli.serve_cmd import ListenOptions, launch, with_default_timeouts


@option_group(ListenOptions, into="listen")
def resume(
    run_dir: Annotated[Path, typer.Argument(help="The interrupted run's directory.")],
    listen: ListenOptions = ListenOptions(),
) -> None:
    """Resume RUN_DIR from its latest checkpoint and run it to its last round."""
    from client.config import ConfigError, RunSettings
    from server.rundir import RunDirectory

    run_dir = run_dir.resolve()
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise click.ClickException(f"{run_dir} is not a run directory (no config.json)")
    try:
        # Reads metrics.jsonl: a run directory of another schema version is refused here, in one line.
        run = RunDirectory(run_dir, create=False)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise click.ClickException(f"{run_dir} has no checkpoint yet; start the run again with `fer-server start`")
    try:
        run_config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise click.ClickException(f"{config_path}: not a readable JSON run config ({err})") from None
    if not isinstance(run_config, dict):
        raise click.ClickException(f"{config_path}: expected a JSON object of run-config keys")
    try:
        settings = RunSettings.from_run_config(run_config)
        settings = with_default_timeouts(settings.replace(out_dir=str(run_dir), resume_from=str(checkpoint)))
    except ConfigError as err:
        raise click.ClickException(f"{config_path}: {err}") from None
    done = _checkpoint_round(checkpoint, model=settings.model)
    if done >= settings.num_server_rounds:
        raise click.ClickException(f"{run_dir} already completed all {settings.num_server_rounds} rounds")
    launch(
        settings=settings, listen=listen, command="fer-server resume",
        banner=f"resuming {run_dir} after round {done} of {settings.num_server_rounds}",
    )


def _checkpoint_round(checkpoint: Path, *, model: str) -> int:
    """The round `checkpoint` completed, after checking here, before any SuperLink starts, what the ServerApp would
    only find once the sites have joined: that the file is intact (sha256, weights only) and holds the run's model.
    """
    from models.card import SchemaVersionError
    from models.files import load_model

    try:
        _, card = load_model(checkpoint)
    except SchemaVersionError as err:
        raise click.ClickException(str(err)) from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise click.ClickException(f"checkpoint {checkpoint} cannot be resumed from ({reason})") from None
    if card.name != model:
        raise click.ClickException(
            f"checkpoint {checkpoint} holds model {card.name!r} but the run's config.json says {model!r}"
        )
    return card.round
