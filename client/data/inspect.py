"""What a dataset holds and what is wrong with it, before anyone trains on it.

A hospital's export or a public dataset copy can be silently broken: blank frames, the same face filed under two
emotions, test images that are also in the training set (which inflates every accuracy reported on it). The report
makes those visible: `inspect_dataset` returns it as a JSON-able dict, `print_report` prints it as tables.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from rich.console import Console
from rich.table import Table

from client.data.formats import MAX_EXAMPLES, FERDataset, load_dataset
from client.data.labels import EMOTIONS, NUM_CLASSES


def inspect_dataset(spec: str) -> dict:
    """Loads the dataset named by `spec` ("KIND=PATH", see `load_dataset`) and reports what it holds.

    Returns:
        One JSON-able dict: "dataset", "kind", "format", "root", "synthetic", "image_size" (side of the loaded
        faces), "native_sizes" (size "WxH" -> images, before resizing; the most common few), "total", "splits"
        ({split: {"total": n, "per_class": {emotion: n}}}) and "problems" (see `FERDataset.problems`).

    Raises:
        DatasetError: the data cannot be used; the message names the file (and row).
    """
    return summarise(load_dataset(spec), spec=spec)


def summarise(dataset: FERDataset, *, spec: str | None = None) -> dict:
    """The inspection report of an already-loaded dataset (see `inspect_dataset`)."""
    splits = {}
    for name, split in dataset.splits.items():
        counts = np.bincount(split.labels, minlength=NUM_CLASSES)
        splits[name] = {"total": len(split), "per_class": {e: int(counts[i]) for i, e in enumerate(EMOTIONS)}}
    sizes = Counter(dataset.native_sizes).most_common()
    native_sizes = dict(sizes[:MAX_EXAMPLES])
    if len(sizes) > MAX_EXAMPLES:
        native_sizes["other"] = sum(n for _, n in sizes[MAX_EXAMPLES:])
    first = next(iter(dataset.splits.values()))
    return {
        "dataset": spec,
        "kind": dataset.kind,
        "format": dataset.format,
        "root": dataset.root,
        "synthetic": dataset.synthetic,
        "image_size": int(first.images.shape[1]),
        "native_sizes": native_sizes,
        "total": sum(s["total"] for s in splits.values()),
        "splits": splits,
        "problems": dataset.problems,
    }


def _problem_rows(problems: dict) -> list[tuple[str, int, str, list[str]]]:
    """(problem, images affected, detail, example sources) for each problem that occurred."""
    rows = []
    for key, label in (("unreadable", "unreadable files (skipped)"), ("non_image", "non-image files (skipped)"),
                       ("missing", "listed but missing (skipped)"), ("no_face", "no face found (skipped)")):
        if problems[key]["count"]:
            rows.append((label, problems[key]["count"], "", problems[key]["examples"]))
    unknown = problems["unknown_folders"]
    if unknown["count"] or unknown["folders"]:
        detail = ", ".join(f"{folder} ({n:,})" for folder, n in unknown["folders"].items())
        rows.append(("unknown class folders (skipped)", unknown["count"], detail, []))
    blank = problems["blank"]
    if blank["count"]:
        by_split = ", ".join(f"{n:,} in {s}" for s, n in blank["by_split"].items() if n)
        rows.append(("blank images (kept)", blank["count"],
                     f"{blank['all_black']:,} all-black, {blank['flat']:,} flat; {by_split}", blank["examples"]))
    for split, dup in problems["duplicates"]["by_split"].items():
        if dup["groups"]:
            # Conflicting duplicates are the ones that hurt training, so they are the examples shown first.
            examples = [" = ".join(g) for g in (dup["conflicting_examples"] or dup["examples"])]
            rows.append((f"duplicates in {split} (kept)", dup["extra_copies"],
                         f"extra copies in {dup['groups']:,} groups; {dup['conflicting_groups']:,} groups with "
                         f"conflicting labels", examples))
    for pair, shared in problems["shared_across_splits"]["by_pair"].items():
        if shared["groups"]:
            later = pair.split("/")[1]
            rows.append((f"{later} images also in {pair.split('/')[0]}", shared["images"][later],
                         f"{shared['groups']:,} distinct images; " +
                         ", ".join(f"{n:,} copies in {s}" for s, n in shared["images"].items()),
                         [" = ".join(g) for g in shared["examples"]]))
    return rows


def print_report(report: dict, *, console: Console | None = None) -> None:
    """Prints an inspection report as tables: counts per split and class, image sizes, problems, examples."""
    console = console or Console()
    where = f" at {report['root']}" if report["root"] else ""
    console.print(f"[bold]{report['format']}[/bold]{where}", highlight=False)
    if report["synthetic"]:
        console.print("[bold yellow]SYNTHETIC data[/bold yellow]: generated faces, not real people")

    counts = Table(title="Images per split and class")
    counts.add_column("class")
    for split in report["splits"]:
        counts.add_column(split, justify="right")
    for emotion in EMOTIONS:
        counts.add_row(emotion, *(f"{s['per_class'][emotion]:,}" for s in report["splits"].values()))
    counts.add_row("[bold]total[/bold]", *(f"[bold]{s['total']:,}[/bold]" for s in report["splits"].values()))
    console.print(counts)

    sizes = ", ".join(f"{size} ({n:,})" for size, n in report["native_sizes"].items())
    console.print(f"Native image sizes: {sizes}; loaded as {report['image_size']}x{report['image_size']}",
                  highlight=False)

    rows = _problem_rows(report["problems"])
    if not rows:
        console.print("No problems found.")
        return
    problems = Table(title="Problems")
    problems.add_column("problem")
    problems.add_column("images", justify="right")
    problems.add_column("detail")
    for label, count, detail, _ in rows:
        problems.add_row(label, f"{count:,}", detail)
    console.print(problems)
    console.print("Examples (paths relative to the dataset root):")
    for label, _, _, examples in rows:
        for example in examples[:3]:
            console.print(f"  {label.split(' (')[0]}: {example}", highlight=False, soft_wrap=True)
