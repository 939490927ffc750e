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
        "references": references_of(name),
    }


def references_of(name: str) -> list[dict[str, Any]]:
    """The shipped reference weights of architecture `name` (models/reference.py) with what they score."""
    from models.reference import list_references, read_reference_info

    rows = []
    for reference in list_references():
        if reference.split("@")[0] != name:
            continue
        info = read_reference_info(reference)
        rows.append({"name": reference, "public_test": info.public_test.to_json(),
                     "validation": info.validation.to_json(), "epochs": info.epochs,
                     "train_minutes": info.train_minutes, "hardware": info.hardware, "terms": info.terms})
    return rows


def _count(value: float | None, *, unit: float, suffix: str) -> str:
    return "-" if value is None else f"{value / unit:.1f} {suffix}".strip()


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="MACs: multiply-accumulates per image, what FER papers call FLOPs")
    for column in ("model", "params", "MMACs 48²", "built for", "params there", "MMACs there",
                   "paper params", "paper MFLOPs", "paper FPS", "FER2013 test"):
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
            " ".join(f"{ref['public_test']['flip_accuracy']:.3f}" for ref in row["references"]) or "-",
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for row in rows:
        # Summaries contain brackets ("2× [conv3×3 …]") that rich would otherwise read as markup.
        console.print(f"[bold]{row['name']}[/bold]: {escape(row['summary'])}")
        if row["deviation"]:
            console.print(f"  vs the paper: {escape(row['deviation'])}")
        for ref in row["references"]:
            test = ref["public_test"]
            console.print(f"  reference weights {ref['name']} (--model / --init-model {ref['name']}): FER2013 "
                          f"PublicTest {test['flip_accuracy']:.3f} with flip averaging ({test['accuracy']:.3f} "
                          f"without), macro-F1 {test['flip_macro_f1']:.3f}; {ref['epochs']} epochs in "
                          f"{ref['train_minutes']:.0f} min on {ref['hardware']}; research use only")
    if any(row["references"] for row in rows):
        console.print("FER2013 test: PublicTest accuracy of the shipped reference weights (flip-averaged)")
