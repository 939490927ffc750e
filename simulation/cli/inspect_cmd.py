"""`fer-sim inspect`: what a dataset holds and what is wrong with it, as tables or one JSON object."""

from __future__ import annotations

import json
from typing import Annotated

import click
import typer

from client.data.formats import DatasetError
from client.data.inspect import inspect_dataset, print_report


def inspect(
    dataset: Annotated[str, typer.Option(
        "--dataset", "-d", metavar="KIND=PATH",
        help="fer2013=PATH (CSV or image folders), rafdb=PATH, folder=PATH (photos), faces=PATH (face crops), "
             "or synthetic[=N].")] = "synthetic",
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (for scripts) instead of tables.")] = False,
) -> None:
    """Detect and validate a dataset's format; print per-split and per-class counts, image sizes and problems."""
    try:
        report = inspect_dataset(dataset)
    except DatasetError as err:
        raise click.ClickException(str(err)) from err
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report)
