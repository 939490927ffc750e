"""Reads report.md back as a reader would: the rows of the table under a `## ` heading, keyed by column."""

from __future__ import annotations


def markdown_table(text: str, heading: str) -> list[dict[str, str]]:
    """The first table after `## {heading}` as one dict per row (header cell -> cell text)."""
    lines = text[text.index(f"## {heading}\n"):].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip().replace("\\|", "|") for cell in line.strip()[1:-1].split(" | ")])
    header, rule, *rows = table
    assert set("".join(rule)) <= set("-|"), rule
    return [dict(zip(header, row, strict=True)) for row in rows]


def pct(value: float | None) -> str:
    """How report.md prints a share: one decimal percent, an em dash when absent."""
    return "—" if value is None else f"{100 * value:.1f} %"


def num(value: float | None) -> str:
    """How report.md prints a loss or F1: four decimals, an em dash when absent."""
    return "—" if value is None else f"{value:.4f}"


def expected_round_row(record: dict) -> dict[str, str]:
    """The Rounds-table row report.md should show for one metrics.jsonl record, computed from the record."""
    server, federated, fit = record.get("server") or {}, record.get("federated") or {}, record.get("fit") or {}
    return {
        "round": str(record["round"]), "server acc": pct(server.get("accuracy")), "macro-F1": num(server.get("macro_f1")),
        "server loss": num(server.get("loss")), "federated acc": pct(federated.get("accuracy")),
        "worst 10 %": pct((federated.get("distribution") or {}).get("worst_10pct")),
        "clients": "—" if fit.get("num_clients") is None else str(fit["num_clients"]),
        "rejected": "—" if fit.get("num_rejected") is None else str(fit["num_rejected"]),
        "seconds": num(record.get("seconds")),
    }
