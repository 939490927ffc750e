"""The content of ``privacy.json`` and the privacy section of ``report.md``.

The server collects every client's :meth:`privacy.dp.DPClient.status` (sent as fit metrics) and its own
central-DP settings, and hands them here; this module checks them, computes the central ε and states
the threat model the numbers live in, so that no report shows an ε without saying what it protects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from privacy.accounting import ACCOUNTANTS, central_epsilon

SCHEMA = "fer-fl/privacy-report/1"

THREAT_MODEL = (
    "The coordinating server is assumed honest-but-curious: it follows the protocol but may inspect "
    "everything it receives. With secure aggregation (SecAgg+) on, it sees only masked updates and learns "
    "the sum of the surviving clients' updates, never an individual one, as long as fewer clients than the "
    "reconstruction threshold collude with it; without secure aggregation it sees every client's update. "
    "Local differential privacy (DP-SGD with per-image clipping, Gaussian noise and Poisson sampling; one "
    "cumulative (epsilon, delta) budget per client for the whole federation, charged to an encrypted ledger "
    "before any update leaves the site) bounds what anyone who sees a client's updates or any model built "
    "from them (the server, other sites, whoever receives the final model) can learn about any single "
    "training image, membership included. Central DP (noise added by the server to the clipped aggregate) "
    "bounds what the released model reveals about one site's whole contribution, but the server itself sees "
    "the aggregate before it adds that noise. Neither covers: a server that deviates from the protocol or "
    "controls many sybil clients; a compromised client machine (its raw images, its ledger key); a patient "
    "who appears in many images, whose protection is that of several images rather than one; facts shared "
    "by many patients or about a whole site (its case mix, its demographics); side channels such as who "
    "takes part, when and for how long; and poisoned updates from malicious clients."
)

SEEDED_NOISE_CAVEAT = (
    "The local DP-SGD noise and Poisson sampling of {clients} were drawn from torch's generator seeded from the "
    "run's seed (a reproducible simulation): they are not private against anyone who knows that seed and the "
    "code, who can regenerate the noise and subtract it. Their epsilon figures hold only against an adversary who "
    "does not know the seed. Deployed nodes (fer-client) draw both from a cryptographically secure generator keyed "
    "by the operating system, which nobody else can reproduce."
)

_CLIENT_FIELDS = (
    "epsilon_spent",
    "epsilon_budget",
    "delta",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "accountant",
)
_CLIENT_OPTIONAL = ("rounds_charged", "secure_mode", "ledger_seq", "ledger_id")
_CENTRAL_FIELDS = ("noise_multiplier", "clipping_norm", "sample_rate", "rounds", "delta")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return value


def _client_entry(index: int, client: Mapping[str, Any]) -> dict[str, Any]:
    missing = [name for name in _CLIENT_FIELDS if name not in client]
    if missing:
        raise ValueError(f"clients[{index}] lacks {', '.join(missing)}")
    entry: dict[str, Any] = {"client_id": str(client.get("client_id", index))}
    for name in _CLIENT_FIELDS:
        if name == "accountant":
            if client[name] not in ACCOUNTANTS:
                raise ValueError(f"clients[{index}].accountant must be one of {', '.join(ACCOUNTANTS)}")
            entry[name] = client[name]
        elif name == "steps":
            entry[name] = int(_number(client[name], f"clients[{index}].steps"))
        else:
            entry[name] = float(_number(client[name], f"clients[{index}].{name}"))
    entry.update({name: client[name] for name in _CLIENT_OPTIONAL if name in client})
    entry["budget_exhausted"] = entry["epsilon_budget"] - entry["epsilon_spent"] < 1e-9 * entry["epsilon_budget"]
    return entry


def _central_entry(central: Mapping[str, Any]) -> dict[str, Any]:
    missing = [name for name in _CENTRAL_FIELDS if name not in central]
    if missing:
        raise ValueError(f"central lacks {', '.join(missing)}")
    entry = {name: _number(central[name], f"central.{name}") for name in _CENTRAL_FIELDS}
    entry["rounds"] = int(entry["rounds"])
    entry["accountant"] = central.get("accountant", "rdp")
    entry["epsilon"] = central_epsilon(
        noise_multiplier=entry["noise_multiplier"],
        sample_rate=entry["sample_rate"],
        rounds=entry["rounds"],
        delta=entry["delta"],
        accountant=entry["accountant"],
    )
    return entry


def privacy_report(
    *,
    clients: Sequence[Mapping[str, Any]],
    central: Mapping[str, Any] | None,
    secure_aggregation: bool,
    secagg_quantization: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Builds the ``privacy.json`` document.

    Args:
        clients: One :meth:`~privacy.dp.DPClient.status` dict per client that trained with local DP
            (``epsilon_spent``, ``epsilon_budget``, ``delta``, ``noise_multiplier``, ``max_grad_norm``,
            ``sample_rate``, ``steps``, ``accountant``; ``client_id`` and the ledger fields optional).
            Empty when local DP was off.
        central: Central-DP settings (``noise_multiplier``, ``clipping_norm``, ``sample_rate`` = fraction
            of clients per round, ``rounds`` released, ``delta``; ``accountant`` optional), or None.
        secure_aggregation: Whether SecAgg+ was on.
        secagg_quantization: Under SecAgg+, one `server.secagg.QuantizationCost.to_json()` per aggregated
            round: the error the integer encoding adds to each value of the decoded average (worst case and
            expected RMS) and to one update. Summarised under ``secure_aggregation_quantization``.

    Returns:
        A JSON-ready dict: ``schema``, ``secure_aggregation``, ``local_dp``, ``local_dp_noise`` (where the
        noise came from), ``clients`` (sorted by id, each with ``budget_exhausted``), ``max_epsilon_spent``,
        ``central`` (with its ``epsilon``), ``threat_model``, and ``seeded_noise_caveat`` when any client's
        noise was seeded (not private against whoever knows the seed).

    Raises:
        ValueError: A missing field or a non-finite number, named by client index and field.
    """
    entries = sorted((_client_entry(i, c) for i, c in enumerate(clients)), key=lambda e: e["client_id"])
    # A client that does not say its noise came from the CSPRNG is counted as seeded: never claim more than known.
    seeded = [e["client_id"] for e in entries if e.get("secure_mode") is not True]
    report = {
        "schema": SCHEMA,
        "secure_aggregation": bool(secure_aggregation),
        "local_dp": bool(entries),
        "local_dp_noise": _noise_source(entries, seeded),
        "clients": entries,
        "max_epsilon_spent": max((e["epsilon_spent"] for e in entries), default=None),
        "central": None if central is None else _central_entry(central),
        "secure_aggregation_quantization": _quantization_entry(secagg_quantization),
        "threat_model": THREAT_MODEL,
    }
    if seeded:
        who = "every client" if len(seeded) == len(entries) else "clients " + ", ".join(seeded)
        report["seeded_noise_caveat"] = SEEDED_NOISE_CAVEAT.format(clients=who)
    return report


def _noise_source(entries: list[dict[str, Any]], seeded: list[str]) -> str | None:
    if not entries:
        return None
    if not seeded:
        return "csprng (keyed by the OS; not reproducible)"
    return "seeded (reproducible; not private against whoever knows the seed)" if len(seeded) == len(entries) \
        else "mixed (see seeded_noise_caveat)"


def _quantization_entry(rounds: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    """The run's SecAgg+ quantisation cost: the worst round's figures on top, every round below."""
    if not rounds:
        return None
    worst = max(rounds, key=lambda r: r["max_abs_error"])
    per_update = [r["max_abs_error_per_update"] for r in rounds if r.get("max_abs_error_per_update") is not None]
    return {
        "meaning": "error SecAgg+'s integer encoding adds to each model value (unbiased stochastic rounding)",
        "step": worst["step"],
        "max_abs_error_of_average": worst["max_abs_error"],
        "rms_error_of_average": worst["rms_error"],
        "max_abs_error_per_update": max(per_update, default=None),
        "rounds": [dict(r) for r in rounds],
    }


def render_privacy_markdown(report: Mapping[str, Any]) -> str:
    """The ``## Privacy`` section of ``report.md``: the guarantees in a table, then the threat model."""
    lines = ["## Privacy", ""]
    lines.append(f"Secure aggregation (SecAgg+): {'on' if report['secure_aggregation'] else 'off'}.")
    quantization = report.get("secure_aggregation_quantization")
    if quantization:
        worst, rms = quantization["max_abs_error_of_average"], quantization["rms_error_of_average"]
        per_update = quantization["max_abs_error_per_update"]
        lines.append(
            f"SecAgg+ quantisation: each value of the aggregate is off by at most {worst:.3g} (RMS at most "
            f"{rms:.3g})" + (f"; one update's values by at most {per_update:.3g}." if per_update is not None else ".")
        )
    if report["clients"]:
        lines += [
            "",
            "Local DP-SGD, per client, for the whole federation:",
            "",
            "| client | epsilon spent | budget | delta | sigma | clip | q | steps | accountant |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in report["clients"]:
            lines.append(
                f"| {c['client_id']} | {c['epsilon_spent']:.3f} | {c['epsilon_budget']:.3f} | {c['delta']:.0e} | "
                f"{c['noise_multiplier']:.3f} | {c['max_grad_norm']:g} | {c['sample_rate']:.4f} | {c['steps']} | "
                f"{c['accountant']} |"
            )
        if report.get("seeded_noise_caveat"):
            lines += ["", f"**Seeded noise.** {report['seeded_noise_caveat']}"]
    else:
        lines += ["", "Local DP-SGD: off."]
    central = report["central"]
    if central is None:
        lines += ["", "Central DP: off."]
    else:
        lines += [
            "",
            f"Central (client-level) DP: epsilon = {central['epsilon']:.3f} at delta = {central['delta']:.0e} after "
            f"{central['rounds']} rounds (sigma = {central['noise_multiplier']:g}, clip = {central['clipping_norm']:g}, "
            f"client fraction = {central['sample_rate']:g}, {central['accountant']} accountant).",
        ]
    lines += ["", "### Threat model", "", report["threat_model"], ""]
    return "\n".join(lines)
