"""`fer-sim models`: the registered architectures, their size and cost, and the papers' figures beside ours."""

from __future__ import annotations

import json
from typing import Annotated, Any

import click
import typer

OUR_INPUT = (1, 48, 48)


def models(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", metavar="NAME", help="Show only this model (default: every registered model).")] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (for scripts) instead of a table.")] = False,
) -> None:
    """List the models: parameters and multiply-accumulates at 48×48 and at the input size each was designed for,
    the paper's parameters/FLOPs/FPS beside ours, and one line on where and why they differ."""
    from models import list_models

    names = list_models()
    if model is not None:
        if model not in names:
            raise click.ClickException(f"--model: unknown model {model!r}; known models: {', '.join(names)}")
        names = [model]
    rows = [describe(name) for name in names]
    if json_output:
        typer.echo(json.dumps({
            "units": {
                "params": "trainable parameters",
                "macs": "multiply-accumulates per image (what FER papers, DMSNet's included, call FLOPs)",
                "paper_flops": "as the paper reports it",
            },
            "models": rows,
        }, indent=2))
    else:
        _print_table(rows)


def describe(name: str) -> dict[str, Any]:
    """One model's figures as plain numbers (computed on the meta device: no weights are allocated)."""
    from models import complexity, model_info

    info = model_info(name)
    built_for = tuple(info["input_size"])
    ours = complexity(name, input_size=OUR_INPUT)
    native = ours if built_for == OUR_INPUT else complexity(name, input_size=built_for)
    return {
        "name": name,
        "summary": info["summary"],
        "paper": info["paper"],
        "default_cfg": info["default_cfg"],
        "at_48x48": {"input_size": list(OUR_INPUT), **ours},
        "at_built_for": {"input_size": list(built_for), **native},
        "paper_figures": {"params": info["paper_params"], "flops": info["paper_flops"], "fps": info["paper_fps"]},
        "deviation": info["deviation"],
    }


def _count(value: float | None, *, unit: float, suffix: str) -> str:
    return "-" if value is None else f"{value / unit:.1f} {suffix}".strip()


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="MACs: multiply-accumulates per image, what FER papers call FLOPs")
    for column in ("model", "params", "MMACs 48²", "built for", "params there", "MMACs there",
                   "paper params", "paper MFLOPs", "paper FPS"):
        table.add_column(column, justify="left" if column in ("model", "built for") else "right", no_wrap=True)
    for row in rows:
        ours, native, paper = row["at_48x48"], row["at_built_for"], row["paper_figures"]
        table.add_row(
            row["name"],
            _count(ours["params"], unit=1e6, suffix="M"),
            _count(ours["macs"], unit=1e6, suffix=""),
            "×".join(map(str, native["input_size"])),
            _count(native["params"], unit=1e6, suffix="M"),
            _count(native["macs"], unit=1e6, suffix=""),
            _count(paper["params"], unit=1e6, suffix="M"),
            _count(paper["flops"], unit=1e6, suffix=""),
            "-" if paper["fps"] is None else f"{paper['fps']:.0f}",
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for row in rows:
        # Summaries contain brackets ("2× [conv3×3 …]") that rich would otherwise read as markup.
        console.print(f"[bold]{row['name']}[/bold]: {escape(row['summary'])}")
        if row["deviation"]:
            console.print(f"  vs the paper: {escape(row['deviation'])}")
