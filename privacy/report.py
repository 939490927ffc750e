"""The content of ``privacy.json`` and the privacy section of ``report.md``.

The server collects every client's :meth:`privacy.dp.DPClient.status` (sent as fit metrics) and its own
central-DP settings, and hands them here; this module checks them, computes the central ε and states
the threat model the numbers live in, so that no report shows an ε without saying what it protects.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from models.card import parse_record
from privacy.accounting import ACCOUNTANTS, central_epsilon

SCHEMA_VERSION = 1

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

# The Flower metric key of each DPClient.status field: kebab-case, as Flower's own keys are. One table, read both
# ways (the client sends under these keys, the server reads by them), so no side strips or rewrites prefixes.
DP_METRIC_KEYS = {
    "client_id": "dp-client-id",
    "epsilon_spent": "dp-epsilon-spent",
    "epsilon_budget": "dp-epsilon-budget",
    "delta": "dp-delta",
    "noise_multiplier": "dp-noise-multiplier",
    "max_grad_norm": "dp-max-grad-norm",
    "sample_rate": "dp-sample-rate",
    "steps": "dp-steps",
    "accountant": "dp-accountant",
    "rounds_charged": "dp-rounds-charged",
    "ledger_seq": "dp-ledger-seq",
    "ledger_id": "dp-ledger-id",
    "secure_mode": "dp-secure-mode",
    # Which parameters trained under DP-SGD (dp-train) and how many values that is; the rest were frozen, unnoised.
    "dp_train": "dp-train",
    "trainable_params": "dp-trainable-params",
    "frozen_params": "dp-frozen-params",
}


def dp_metrics(status: Mapping[str, Any]) -> dict[str, Any]:
    """A node's DPClient.status as Flower fit metrics (the keys of DP_METRIC_KEYS; other fields stay home)."""
    return {DP_METRIC_KEYS[name]: value for name, value in status.items() if name in DP_METRIC_KEYS}


def dp_status(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The DP status carried by a reply's (validated) fit metrics, under DPClient.status's field names."""
    return {name: metrics[key] for name, key in DP_METRIC_KEYS.items() if key in metrics}


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
_CENTRAL_FIELDS = ("noise_multiplier", "clipping_norm", "sample_rate", "rounds", "delta")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class ClientPrivacy:
    """One site's cumulative local-DP spend for the whole federation, as it last reported it."""

    client_id: str
    epsilon_spent: float  # cumulative over every round the site was charged for, as its ledger holds it
    epsilon_budget: float  # the site's budget for the whole federation (the lower of the run's and its own)
    delta: float
    noise_multiplier: float  # sigma of DP-SGD, calibrated once so the whole run fits the budget
    max_grad_norm: float  # per-sample clipping norm
    sample_rate: float  # Poisson sampling rate (expected batch / local examples)
    steps: int  # DP-SGD steps taken over all rounds
    accountant: str  # rdp | prv
    # The fields below are None in the reports of runs from before they existed.
    rounds_charged: int | None = None  # rounds the ledger charged (a round refused before training costs none)
    secure_mode: bool | None = None  # sampling and noise drawn from the OS-keyed CSPRNG (privacy/noise.py)
    ledger_seq: int | None = None  # the ledger's sequence number: a lower one later means a rolled-back ledger
    ledger_id: str | None = None  # the ledger's identity: a new one mid-run means a reset ledger
    dp_train: str | None = None  # all | head | last: which parameters trained (and were noised)
    trainable_params: int | None = None  # parameters DP-SGD trained
    frozen_params: int | None = None  # parameters sent back as the server sent them: no gradient, no noise

    @property
    def budget_exhausted(self) -> bool:
        return self.epsilon_budget - self.epsilon_spent < 1e-9 * self.epsilon_budget

    @classmethod
    def from_status(cls, index: int, status: Mapping[str, Any]) -> ClientPrivacy:
        """Checks one DPClient.status (`index` names it in errors).

        Raises:
            ValueError: a missing field, a non-finite number or an unknown accountant.
        """
        missing = [name for name in _CLIENT_FIELDS if name not in status]
        if missing:
            raise ValueError(f"clients[{index}] lacks {', '.join(missing)}")
        if status["accountant"] not in ACCOUNTANTS:
            raise ValueError(f"clients[{index}].accountant must be one of {', '.join(ACCOUNTANTS)}")
        numbers = {name: float(_number(status[name], f"clients[{index}].{name}"))
                   for name in _CLIENT_FIELDS if name not in ("steps", "accountant")}
        return cls(
            client_id=str(status.get("client_id", index)), steps=int(_number(status["steps"], f"clients[{index}].steps")),
            accountant=status["accountant"], rounds_charged=status.get("rounds_charged"),
            secure_mode=status.get("secure_mode"), ledger_seq=status.get("ledger_seq"),
            ledger_id=status.get("ledger_id"), dp_train=status.get("dp_train"),
            trainable_params=status.get("trainable_params"), frozen_params=status.get("frozen_params"), **numbers,
        )

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "budget_exhausted": self.budget_exhausted}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientPrivacy:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True)
class CentralPrivacy:
    """Central (client-level) DP: the server's noise on the clipped mean and the ε it gives; with `dp_train` other
    than "all", the part of the model the sites trained and the server noised (`noised_values` values), the rest
    being round 0's public model, unchanged."""

    noise_multiplier: float
    clipping_norm: float
    sample_rate: float
    rounds: int
    delta: float
    accountant: str
    epsilon: float
    dp_train: str = "all"
    noised_values: int | None = None

    @classmethod
    def from_settings(cls, central: Mapping[str, Any]) -> CentralPrivacy:
        """Checks the central-DP settings and computes ε.

        Raises:
            ValueError: a missing field or a non-finite number.
        """
        missing = [name for name in _CENTRAL_FIELDS if name not in central]
        if missing:
            raise ValueError(f"central lacks {', '.join(missing)}")
        entry = {name: _number(central[name], f"central.{name}") for name in _CENTRAL_FIELDS}
        entry["rounds"] = int(entry["rounds"])
        accountant = central.get("accountant", "rdp")
        epsilon = central_epsilon(
            noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"], rounds=entry["rounds"],
            delta=entry["delta"], accountant=accountant,
        )
        return cls(accountant=accountant, epsilon=epsilon, dp_train=str(central.get("dp_train", "all")),
                   noised_values=central.get("noised_values"), **entry)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CentralPrivacy:
        # privacy.json files written before dp_train / noised_values existed lack them: their runs noised everything.
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


PUBLIC_DATA_PROTECTION = (
    "none: public data is used in the clear, by the server, and no epsilon covers it (it needs none, being public; "
    "nothing about it is private either)"
)


@dataclass(frozen=True)
class PublicSlice:
    """The public slice of one dataset's training split (server/public_pretrain.py): set aside before the sites'
    partition, held by no site, trained on by the server without DP."""

    dataset: str
    faces: int
    per_class: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "faces": self.faces, "per_class": list(self.per_class)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PublicSlice:
        return cls(dataset=str(data["dataset"]), faces=int(data["faces"]),
                   per_class=tuple(int(n) for n in data["per_class"]))


@dataclass(frozen=True)
class PublicData:
    """What round 0's model learnt from outside the private federation, in the clear.

    Attributes:
        slices: the public slice of each dataset (public-fraction), empty when none.
        pretrain_epochs: epochs the server pretrained on the slices (public-epochs); None without slices.
        server_learning: whether the server also trained each round's global model on the slices (server-learning).
        head_refit: whether the server re-fitted the final model's classifier on the slices (head-refit).
        init_model: the init-model round 0 started from (before any pretraining), or None.
        init_model_dataset: the dataset its card says it was trained on (None when unknown).
        warning: set when the init model was trained on the same dataset the sites hold (it has seen their faces:
            not a fair public start); server/init_model.py `public_start_warning`.
        protection: what protects this data (nothing).
    """

    slices: tuple[PublicSlice, ...] = ()
    pretrain_epochs: int | None = None
    server_learning: bool = False
    head_refit: bool = False
    init_model: str | None = None
    init_model_dataset: str | None = None
    warning: str | None = None
    protection: str = PUBLIC_DATA_PROTECTION

    @property
    def faces(self) -> int:
        return sum(s.faces for s in self.slices)

    def describe(self) -> str:
        """One line naming the public data, for the epsilon scope and report.md."""
        parts = []
        if self.init_model:
            parts.append(f"init-model {self.init_model} (trained on {self.init_model_dataset or 'unknown data'})")
        if self.slices:
            where = ", ".join(f"{s.faces} of {s.dataset}" for s in self.slices)
            parts.append(f"a public slice of {self.faces} faces ({where}) the server pretrained on for "
                         f"{self.pretrain_epochs} epochs" + (" and trained each round's global model on again "
                                                             "(server-learning)" if self.server_learning else "")
                         + (" and re-fitted the final model's classifier on (head-refit)" if self.head_refit else ""))
        return " and ".join(parts) or "none"

    def to_json(self) -> dict[str, Any]:
        return {"slices": [s.to_json() for s in self.slices], "faces": self.faces,
                "pretrain_epochs": self.pretrain_epochs, "server_learning": self.server_learning,
                "head_refit": self.head_refit,
                "init_model": self.init_model,
                "init_model_dataset": self.init_model_dataset, "warning": self.warning, "protection": self.protection}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PublicData:
        return cls(slices=tuple(PublicSlice.from_json(s) for s in data.get("slices") or []),
                   pretrain_epochs=data.get("pretrain_epochs"),
                   server_learning=bool(data.get("server_learning", False)),
                   head_refit=bool(data.get("head_refit", False)), init_model=data.get("init_model"),
                   init_model_dataset=data.get("init_model_dataset"), warning=data.get("warning"),
                   protection=str(data.get("protection", PUBLIC_DATA_PROTECTION)))


def epsilon_scope(clients: Sequence[ClientPrivacy], public: PublicData | None) -> str:
    """What the reported epsilons cover, in words: the private DP-SGD steps only, on which parameters; never the
    public data or its pretraining steps."""
    if clients:
        trained = sorted({f"{c.dp_train} ({c.trainable_params} values trained, {c.frozen_params} frozen)"
                          for c in clients if c.dp_train is not None})
        text = ("Each site's epsilon covers only the private part: its own DP-SGD steps on its own data (the `steps` "
                "the accountant counted), which trained " + ("; ".join(trained) if trained else "every parameter")
                + ". Frozen parameters got no gradient and no noise and went back unchanged.")
    else:
        text = "No site trained under local DP-SGD: no epsilon covers the sites' data."
    if public is not None:
        text += (f" Public data used in the clear: {public.describe()}. Its pretraining steps are not private and "
                 "are not counted in any epsilon.")
    return text


@dataclass(frozen=True)
class PrivacyReport:
    """privacy.json: who spent which ε, the central ε, SecAgg+ and its quantisation cost, and the threat model.

    Attributes:
        clients: one entry per node that trained under local DP, sorted by client_id.
        local_dp_noise: where the local noise came from (None without local DP).
        secure_aggregation_quantization: the worst round's quantisation error on top, every round's below (see
            _quantization_entry); None without SecAgg+.
        seeded_noise_caveat: present when any client's noise was seeded (not private against whoever knows the
            seed).
        public_data: what round 0's model learnt in the clear (public slice, init-model), None when nothing.
        epsilon_scope: what the epsilons cover (the private DP-SGD steps only) and what they do not.
    """

    secure_aggregation: bool
    clients: tuple[ClientPrivacy, ...]
    central: CentralPrivacy | None
    threat_model: str
    local_dp_noise: str | None = None
    secure_aggregation_quantization: dict[str, Any] | None = None
    seeded_noise_caveat: str | None = None
    public_data: PublicData | None = None
    epsilon_scope: str | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def local_dp(self) -> bool:
        return bool(self.clients)

    @property
    def max_epsilon_spent(self) -> float | None:
        return max((c.epsilon_spent for c in self.clients), default=None)

    def to_json(self) -> dict[str, Any]:
        report = {
            "schema_version": self.schema_version,
            "secure_aggregation": self.secure_aggregation,
            "local_dp": self.local_dp,
            "local_dp_noise": self.local_dp_noise,
            "clients": [c.to_json() for c in self.clients],
            "max_epsilon_spent": self.max_epsilon_spent,
            "central": None if self.central is None else self.central.to_json(),
            "secure_aggregation_quantization": self.secure_aggregation_quantization,
            "threat_model": self.threat_model,
        }
        if self.seeded_noise_caveat:
            report["seeded_noise_caveat"] = self.seeded_noise_caveat
        # New keys only (older readers ignore them), so the schema version stays.
        report["public_data"] = None if self.public_data is None else self.public_data.to_json()
        if self.epsilon_scope:
            report["epsilon_scope"] = self.epsilon_scope
        return report

    @classmethod
    def from_json(cls, data: Any, *, source: str = "privacy.json") -> PrivacyReport:
        """Reads privacy.json; the errors are models.card.parse_record's (another version, a missing field)."""
        return parse_record(data, supported=SCHEMA_VERSION, source=source, kind="privacy report", build=lambda d: cls(
            secure_aggregation=bool(d["secure_aggregation"]),
            clients=tuple(ClientPrivacy.from_json(c) for c in d.get("clients") or []),
            central=None if d.get("central") is None else CentralPrivacy.from_json(d["central"]),
            threat_model=str(d.get("threat_model", THREAT_MODEL)),
            local_dp_noise=d.get("local_dp_noise"),
            secure_aggregation_quantization=d.get("secure_aggregation_quantization"),
            seeded_noise_caveat=d.get("seeded_noise_caveat"),
            public_data=None if d.get("public_data") is None else PublicData.from_json(d["public_data"]),
            epsilon_scope=d.get("epsilon_scope"),
        ))


def privacy_report(
    *,
    clients: Sequence[Mapping[str, Any]],
    central: Mapping[str, Any] | None,
    secure_aggregation: bool,
    secagg_quantization: Sequence[Mapping[str, Any]] | None = None,
    public_data: PublicData | None = None,
) -> PrivacyReport:
    """Builds the ``privacy.json`` record.

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
        public_data: What round 0's model learnt in the clear (public slice, init-model), or None.

    Returns:
        The report; its ``to_json()`` is privacy.json.

    Raises:
        ValueError: A missing field or a non-finite number, named by client index and field.
    """
    entries = sorted((ClientPrivacy.from_status(i, c) for i, c in enumerate(clients)), key=lambda e: e.client_id)
    # A client that does not say its noise came from the CSPRNG is counted as seeded: never claim more than known.
    seeded = [e.client_id for e in entries if e.secure_mode is not True]
    caveat = None
    if seeded:
        who = "every client" if len(seeded) == len(entries) else "clients " + ", ".join(seeded)
        caveat = SEEDED_NOISE_CAVEAT.format(clients=who)
    return PrivacyReport(
        secure_aggregation=bool(secure_aggregation),
        clients=tuple(entries),
        central=None if central is None else CentralPrivacy.from_settings(central),
        threat_model=THREAT_MODEL,
        local_dp_noise=_noise_source(entries, seeded),
        secure_aggregation_quantization=_quantization_entry(secagg_quantization),
        seeded_noise_caveat=caveat,
        public_data=public_data,
        epsilon_scope=epsilon_scope(entries, public_data) if entries or public_data is not None else None,
    )


def _noise_source(entries: Sequence[ClientPrivacy], seeded: list[str]) -> str | None:
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
