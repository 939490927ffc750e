"""The run configuration: every tunable of a federated run, read once at an app's entry point.

Flower hands apps a flat `run_config` of kebab-case keys (`[tool.flwr.app.config]` in pyproject.toml, overridden by
`flwr run --run-config` or by `fer-sim`). `RunSettings.from_run_config` turns it into one typed, validated object that
is passed down as plain arguments, so nothing below the entry points reads a Context. A node's own settings (its
`--node-config`) are read the same way, into `client.node_config.NodeSettings`.

It lives in `client/` because both apps need it and `server/` may import `client/` but not the reverse.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from client.data.labels import NUM_CLASSES

if TYPE_CHECKING:
    from models.recipe import TrainingRecipe

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")
PARTITIONS = ("iid", "dirichlet", "pathological", "quantity")
OPTIMIZERS = ("adam", "sgd", "sgd-nesterov")
# The recipe keys (models/recipe.py): "recipe" (strings) or a negative number (floats; 0 for lr) means "what the
# model's registered recipe says", so `--model X` trains X the way X was measured to train.
RECIPE = "recipe"
SCHEDULES = ("constant", "warmup-cosine", "step")
AUGMENTS = ("none", "light", "strong")
CLASS_BALANCES = ("none", "weights", "sampling", "logit-adjust")
ON_OFF = ("on", "off")
LABEL_PRIORS = ("public", "uniform")
ACCOUNTANTS = ("rdp", "prv")
# Which parameters DP-SGD trains: every one, the classifier only, or the last block and the head. Mirrors
# models.finetune.DP_TRAIN_MODES without importing torch (tests/test_dp_finetune.py pins them equal).
DP_TRAIN_MODES = ("all", "head", "last")
# Hostile behaviours a simulated site can play (simulation/attacks.py implements them, in this order).
ATTACKS = ("scale", "sign-flip", "lie-count", "noise", "label-flip")
# Run-config keys whose values must be positive.
_POSITIVE = ("num-clients", "num-server-rounds", "local-epochs", "local-splits", "batch-size", "dp-lr", "dp-batch-size",
             "alpha", "public-epochs", "aug-mult",
             "image-size", "max-update-norm", "max-examples", "min-clients")


class ConfigError(ValueError):
    """A run-configuration value is invalid; the message names the key."""


@dataclass(frozen=True)
class RunSettings:
    """All run-level tunables. Field names are the kebab-case config keys with `_` for `-`."""

    # Data
    dataset: str = "synthetic"  # "KIND=PATH[@CLIENTS]" entries separated by ";"
    image_size: int = 48
    # The defaults are a run that learns in about a minute (`fer-sim run` with no options: 0.58 after 6 rounds of 3
    # local epochs, 63 s; 10 clients at Dirichlet 0.5 reach 0.42 in the same 6 x 3, in-process): benchmarks set
    # their own federation (benchmarks/bench_federated.py: 10 clients, Dirichlet 0.5).
    num_clients: int = 4
    partition: str = "dirichlet"
    alpha: float = 1.0
    classes_per_client: int = 2
    profile_mix: str = ""  # "" = no profiles; e.g. "hospital=0.3,iot=0.7"
    local_test_fraction: float = 0.2
    # Model and local training
    model: str = "cnn_am"
    # A model to start round 0 from instead of the seeded random one: a shipped reference (`fer_vgg@fer2013`,
    # models/reference.py) or a saved model.pt; its architecture must be `model` (server/init_model.py). "" = none
    init_model: str = ""
    # Public pretraining (server/public_pretrain.py): before round 1 the server trains round 0's model (after
    # init-model, on top of it) for public-epochs epochs on a stratified slice of this fraction of the run's
    # training data, seeded by `seed`. The slice belongs to no site, is unprotected, and costs no epsilon. 0 = none
    public_fraction: float = 0.0
    public_epochs: int = 2
    # The pretraining's own batch and rate (0 = the run's batch-size / lr), so runs whose sites differ share round 0
    public_batch_size: int = 0
    public_lr: float = 0.0
    local_epochs: int = 3
    # Shorter rounds at the same passes: each round a site trains local-epochs passes over the next 1/local-splits
    # of a seeded permutation of its data (task.round_slice), so local-splits rounds see each face once. Client
    # drift under label skew grows with the local steps; with server momentum the averaged steps then add up
    # (Flower-free screen, CNN-AM deep, Dirichlet 0.5, 10 passes: 10 rounds 0.361 on PublicTest, 80 rounds of 1/8 with
    # FedAvgM 0.415; docs/benchmarks.md). Not with DP-SGD, whose accountant samples from the whole local dataset.
    local_splits: int = 1
    # Each site keeps its optimiser's momentum from one of its rounds to the next, in its node's Flower context
    # (client/task.py MomentumCarry), instead of restarting it every round: under local-splits a round is a few
    # steps, too few for momentum 0.9 to build up. The buffers never leave the node. Non-private runs with a
    # momentum optimiser only. Measured Flower-free (CNN-AM deep, Dirichlet 0.5, 1/8 rounds, public start): validation
    # 0.473 with it against 0.494 without (docs/benchmarks.md), so off by default.
    keep_momentum: bool = False
    batch_size: int = 32
    # The training recipe (models/recipe.py). Each key left at "recipe" (or a negative number; lr 0) takes the
    # model's registered recipe (`fer-sim models` shows it); DP-SGD runs use dp-optimizer / dp-lr / dp-batch-size,
    # a constant rate, no weight decay or label smoothing and the light augmentation, as before the recipes.
    lr: float = 0.0  # the peak learning rate; 0 = the recipe's
    optimizer: str = RECIPE  # adam | sgd | sgd-nesterov
    # The schedule runs over the whole run: round r of R covers progress [(r-1)/R, r/R), which each client
    # computes from the round number the server sends and num-server-rounds (no learning rate travels).
    lr_schedule: str = RECIPE  # constant | warmup-cosine | step
    warmup: float = -1.0  # fraction of the run spent warming up
    weight_decay: float = -1.0
    label_smoothing: float = -1.0
    augment: str = RECIPE  # none | light | strong
    class_balance: str = RECIPE  # none | weights (inverse-frequency loss) | sampling | logit-adjust (models/recipe.py)
    # logit-adjust's target: the label mix the trained logits should carry. "public" = the public slice's mix (needs
    # public-fraction > 0), "uniform" = a classifier for balanced emotions, or seven class counts "n0,...,n6" in
    # client.data.labels order. The server resolves it and sends the frequencies in each round's fit config.
    label_prior: str = "public"
    flip_tta: str = RECIPE  # on | off: evaluate on the mean softmax of each face and its mirror
    # Federation
    num_server_rounds: int = 8  # rounds after round 0 (the initial model); the schedule runs over them
    strategy: str = "fedavg"  # server/strategies.py (the registry)
    fraction_fit: float = 1.0  # share of the connected sites trained each round (below 1: not reproducible)
    fraction_evaluate: float = 1.0  # share of the sites that score the global model on their own test split
    min_clients: int = 2  # a round waits for this many sites
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term mu/2 |w - w_global|^2
    # Server optimisers (Reddi et al. 2021): fedavgm takes an SGD step of server-lr with server-momentum along the
    # averaged update; fedadam / fedyogi a step of server-lr over sqrt(v) + server-tau per coordinate (0 = the
    # strategy's default: fedavgm 1.0, fedadam / fedyogi 0.01). Averaged updates are ~1e-4 a coordinate: tau 1e-4
    # adapts where 1e-3 barely does (Dirichlet 0.5: FedAdam 0.01 / 1e-4 0.533 vs FedAvgM 0.523; docs/benchmarks.md).
    server_lr: float = 0.0
    server_momentum: float = 0.9
    server_tau: float = 1e-3
    # The average of the global model over rounds (server/ema.py) is what the server evaluates, saves and delivers;
    # training goes on from the raw model. 0 = off; else the largest decay in (0, 1), warmed up over early rounds.
    # Post-processing: no privacy cost (De et al. 2022 average DP-SGD iterates the same way). Off by default: over
    # 5 DP rounds at eps 3 it scored 0.355 against 0.357 without (docs/benchmarks.md).
    server_ema: float = 0.0
    # Server learning (server/server_learning.py; Mai et al. 2023, "Federated learning with server
    # learning"): after every round's aggregation the server trains the new global model on the public slice for
    # the passes a site makes in a round (local-epochs over 1/local-splits of it), so the model every site starts
    # the next round from, and the final one, are pulled back towards the public mix of faces and labels that
    # label skew pulls them away from. The slice is public: no epsilon, no site's data. Needs public-fraction > 0.
    server_learning: bool = False
    # At the end of the run the server re-fits the model's linear classifier on the public slice, body frozen
    # (client/refit.py refit_classifier; server/head_refit.py): label skew bends the shared classifier towards the
    # sites' label mixes far more than it bends the features. A convex fit with head-refit-l2 * |W - W_trained|^2
    # pulling towards the trained weights; the delivered and scored model is the re-fitted one, and `fer-sim
    # centralized` takes the same step. Public faces only: no epsilon. Needs public-fraction > 0.
    head_refit: bool = False
    head_refit_l2: float = 0.0
    # Not-true distillation at each site (FedNTD, Lee et al. 2022; client/task.py not_true_distillation): the local
    # loss adds this weight of KL towards the round's global model over each face's not-true classes, so a skewed
    # site keeps what the global model knows about the classes it holds few of. 0 = off. Non-private runs only.
    # Measured Flower-free from the public start, 1/8 rounds, server-ema 0.9, weight 1: Dirichlet 0.1 validation
    # 0.505 against 0.470 without (docs/benchmarks.md).
    ntd_beta: float = 0.0
    trimmed_beta: float = 0.2  # fedtrimmedavg: fraction of the updates cut at each end, per coordinate
    krum_malicious: int = 0  # krum: how many sites the selection assumes malicious
    max_update_norm: float = 100.0  # a site update (delta) with a larger L2 norm is rejected (server/strategy.py)
    max_examples: int = 1_000_000  # a reply claiming more training examples is rejected (its FedAvg weight)
    # Server-side norm bounding: each accepted update is scaled down to at most this multiple of the round's median
    # update norm (0 = off); it blunts scaled updates whatever the strategy, and needs individual updates.
    norm_bound: float = 0.0
    seed: int = 42  # round 0, partitions and simulated sites; deployed sites draw from the OS
    out_dir: str = "runs/latest"  # the run directory (docs/run-directory.md); must be new or empty
    # Privacy (0 disables dp-epsilon and central-dp-noise)
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5  # delta of local and central DP; keep it below 1 / (examples per site)
    max_grad_norm: float = 1.0  # DP-SGD per-sample gradient clipping norm
    # Local training under DP-SGD (dp-epsilon > 0) uses its own recipe: with Adam at 3e-4 and batches of 32 the
    # clipped, noised gradients drown the signal and CNN-AM collapses to the majority class at every epsilon; SGD
    # (momentum 0.9) at 0.05 with expected batches of 128 (4x fewer, 4x less noisy steps) learns (docs/benchmarks.md).
    dp_optimizer: str = "sgd"  # sgd (momentum 0.9) | adam
    dp_lr: float = 0.05  # constant local rate under DP-SGD
    dp_batch_size: int = 128  # expected batch of Poisson sampling (rate = dp-batch-size / local examples)
    # Which parameters train under DP (models.finetune): all | head (the classifier) | last (the model's last block
    # and its head). Under DP-SGD the rest are frozen before Opacus wraps the model: no gradient, no noise, sent
    # unchanged. Under central DP sites train only these, and the server noises only these (privacy/central.py).
    dp_train: str = "all"
    # Augmentation multiplicity (De et al. 2022): DP-SGD averages the gradients of this many augmented views of
    # each sample before clipping it, so the clipped signal is less noisy for the same epsilon (the bound is still
    # one sample's). Costs K forward/backward rows per sample; needs a model with the book-keeping DP engine.
    aug_mult: int = 1
    accountant: str = "rdp"
    secure_agg: bool = False
    secagg_shares: int = 3
    secagg_threshold: int = 2
    secagg_max_weight: float = 10_000.0  # largest num-examples a client may report under SecAgg+ (sets precision)
    secagg_timeout: float = 0.0  # seconds per SecAgg+ stage; 0 waits forever (simulation), set it in deployments
    # Seconds a plain round waits for replies before going on with those it has; 0 waits forever (simulation).
    # A deployment needs it: one reply lost in transit would otherwise stall the federation.
    round_timeout: float = 0.0
    central_dp_noise: float = 0.0
    central_clip: float = 0.0
    # Simulation only: this many sites (chosen by the seed) play `attack` (simulation/attacks.py); 0 = all honest
    attackers: int = 0
    attack: str = "scale"
    # Deployment: a checkpoint (checkpoints/round-XXX.pt of this run's out-dir) to continue from; "" starts fresh
    resume_from: str = ""
    # Deployment: the file of the coordinator's per-node privacy-ledger record (server/ledger_registry.py), kept
    # across resumes and runs so a rolled-back or reset ledger is caught; "" keeps it in memory (simulations)
    ledger_registry: str = ""

    @classmethod
    def keys(cls) -> list[str]:
        """The kebab-case config keys, in declaration order."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        """Builds settings from Flower's run config; unknown keys and wrong types raise ConfigError naming the key."""
        kwargs: dict[str, Any] = {}
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        for key, value in run_config.items():
            field = by_key.get(key)
            if field is None:
                raise ConfigError(f"unknown run-config key {key!r}; known keys: {', '.join(by_key)}")
            kwargs[field.name] = _coerce(key, value, type(getattr(cls(), field.name)))
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case dict Flower expects (bool, int, float and str values only)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunSettings:
        settings = dataclasses.replace(self, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Checks ranges and combinations; raises ConfigError naming the offending key."""
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("partition", self.partition, PARTITIONS)
        _choice("optimizer", self.optimizer, (*OPTIMIZERS, RECIPE))
        _choice("dp-optimizer", self.dp_optimizer, OPTIMIZERS)
        _choice("lr-schedule", self.lr_schedule, (*SCHEDULES, RECIPE))
        _choice("augment", self.augment, (*AUGMENTS, RECIPE))
        _choice("class-balance", self.class_balance, (*CLASS_BALANCES, RECIPE))
        _choice("flip-tta", self.flip_tta, (*ON_OFF, RECIPE))
        if self.label_prior not in LABEL_PRIORS:
            parse_label_prior(self.label_prior, key="label-prior")
        elif self.label_prior == "public" and self.class_balance == "logit-adjust" and self.public_fraction <= 0:
            raise ConfigError("label-prior 'public' is the public slice's label mix: it needs public-fraction > 0; "
                              "give label-prior uniform or seven class counts instead")
        if self.lr < 0:
            raise ConfigError(f"lr must be positive (0 = the model's recipe), got {self.lr}")
        if not self.warmup < 1 or not self.label_smoothing < 1:
            raise ConfigError("warmup and label-smoothing must be below 1 (negative = the model's recipe)")
        _choice("accountant", self.accountant, ACCOUNTANTS)
        _choice("dp-train", self.dp_train, DP_TRAIN_MODES)
        if self.dp_train != "all" and not (self.dp_enabled or self.central_dp_enabled):
            # Non-private training trains every parameter; accepting the key would claim a fine-tuning that never ran.
            raise ConfigError(f"dp-train {self.dp_train!r} chooses what trains under DP: it needs dp-epsilon > 0 or "
                              "central-dp-noise > 0")
        if self.local_splits != 1 and self.dp_enabled:
            raise ConfigError(f"local-splits {self.local_splits} trains on a slice of each site's data a round, but "
                              "DP-SGD's accountant assumes Poisson sampling from all of it: use local-splits 1 with "
                              "dp-epsilon")
        if self.keep_momentum and self.dp_enabled:
            raise ConfigError("keep-momentum carries the recipe optimiser's momentum between rounds; DP-SGD builds "
                              "its own optimiser each round: use keep-momentum false with dp-epsilon")
        if self.keep_momentum and self.optimizer == "adam":
            raise ConfigError("keep-momentum carries SGD's momentum between rounds; optimizer adam has none: use "
                              "optimizer sgd or sgd-nesterov")
        if self.aug_mult != 1 and not self.dp_enabled:
            # Without clipping there is nothing to average before; K views would only cost K times the compute.
            raise ConfigError(f"aug-mult {self.aug_mult} averages views before DP-SGD's clipping: it needs "
                              "dp-epsilon > 0")
        if self.public_batch_size < 0 or not 0 <= self.public_lr < float("inf"):
            raise ConfigError(f"public-batch-size and public-lr must be >= 0 (0 = the run's batch-size / lr), "
                              f"got {self.public_batch_size} and {self.public_lr}")
        if not 0 <= self.public_fraction < 1:
            raise ConfigError(f"public-fraction must be in [0, 1) (0 = no public pretraining), got {self.public_fraction}")
        if not 0 <= self.ntd_beta < float("inf"):
            raise ConfigError(f"ntd-beta must be a finite number >= 0 (0 = off), got {self.ntd_beta}")
        if self.ntd_beta > 0 and self.dp_enabled:
            # Its teacher's pull is a loss term of every face; DP-SGD's clipping and accounting were checked for the
            # recipe's loss only.
            raise ConfigError(f"ntd-beta {self.ntd_beta} distills towards the global model in non-private training: "
                              "use ntd-beta 0 with dp-epsilon")
        if self.head_refit and self.public_fraction <= 0:
            raise ConfigError("head-refit fits the classifier on the public slice at the end of the run: it needs "
                              "public-fraction > 0")
        if not 0 <= self.head_refit_l2 < float("inf"):
            raise ConfigError(f"head-refit-l2 must be a finite number >= 0, got {self.head_refit_l2}")
        if self.server_learning and self.public_fraction <= 0:
            raise ConfigError("server-learning trains the global model on the public slice after every round: it "
                              "needs public-fraction > 0")
        _choice("attack", self.attack, ATTACKS)
        for key in _POSITIVE:
            value = getattr(self, key.replace("-", "_"))
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if not 0 < self.fraction_fit <= 1:
            raise ConfigError(f"fraction-fit must be in (0, 1], got {self.fraction_fit}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if not 0 <= self.local_test_fraction < 1:
            raise ConfigError(f"local-test-fraction must be in [0, 1), got {self.local_test_fraction}")
        if self.server_lr < 0 or not 0 <= self.server_momentum < 1 or not self.server_tau > 0:
            raise ConfigError(f"server-lr must be >= 0 (0 = the strategy's default), server-momentum in [0, 1) and "
                              f"server-tau > 0, got {self.server_lr}, {self.server_momentum} and {self.server_tau}")
        if not 0 <= self.server_ema < 1:
            raise ConfigError(f"server-ema must be in [0, 1) (0 = off), got {self.server_ema}")
        if not 0 <= self.trimmed_beta < 0.5:
            raise ConfigError(f"trimmed-beta must be in [0, 0.5), got {self.trimmed_beta}")
        if self.dp_epsilon < 0 or not 0 < self.dp_delta < 1:
            raise ConfigError("dp-epsilon must be >= 0 (0 = off) and dp-delta in (0, 1)")
        if self.secure_agg and self.strategy in ROBUST_STRATEGIES:
            # Robust rules need every individual update; under secure aggregation the server only sees the sum.
            raise ConfigError(f"strategy {self.strategy!r} needs individual updates and cannot run with secure-agg")
        if self.dp_enabled and self.strategy == "fedprox":
            # The proximal term depends on parameters only, so Opacus's per-sample gradients would not include it:
            # the client would silently train plain DP-SGD while claiming FedProx.
            raise ConfigError("strategy 'fedprox' cannot be combined with dp-epsilon (local DP-SGD)")
        if self.secure_agg and not (self.secagg_shares > 2 and 1 < self.secagg_threshold < self.secagg_shares):
            # Flower's SecAgg+ needs more than 2 shares and a threshold strictly below the share count.
            raise ConfigError("secagg-shares must be > 2 and secagg-threshold in (1, secagg-shares)")
        if self.secure_agg and 2 * self.secagg_threshold <= self.secagg_shares:
            # Sites refuse such a round (privacy.secagg): with t <= shares/2 a server could rebuild one node's masks.
            raise ConfigError(
                f"secagg-threshold must be more than half of secagg-shares ({self.secagg_shares}), "
                f"got {self.secagg_threshold}"
            )
        if self.central_dp_noise < 0 or self.central_clip < 0:
            raise ConfigError("central-dp-noise and central-clip must be >= 0 (0 = off)")
        if self.central_dp_enabled:
            if self.central_clip <= 0:
                raise ConfigError("central-dp-noise needs central-clip > 0 (the L2 bound each client clips to)")
            if self.strategy not in ("fedavg", "fedprox"):
                # The noise is calibrated for a uniform mean of clipped updates; a median, Krum's pick or an
                # Adam step has a different sensitivity, so the reported central epsilon would be wrong.
                raise ConfigError(f"central-dp-noise works with fedavg or fedprox, not {self.strategy!r}")
        if self.secagg_max_weight <= 0 or self.secagg_timeout < 0:
            raise ConfigError("secagg-max-weight must be positive and secagg-timeout >= 0")
        if not 0 <= self.attackers < self.num_clients:
            raise ConfigError(f"attackers must be in [0, num-clients), got {self.attackers}")
        if self.norm_bound < 0:
            raise ConfigError(f"norm-bound must be >= 0 (0 = off), got {self.norm_bound}")
        if self.secure_agg and (self.attackers or self.norm_bound):
            # Under SecAgg+ the server sees only the sum (nothing to bound), and the simulated attack would pass
            # through the honest client's own checks before masking, which a real hostile site would not run.
            raise ConfigError("attackers and norm-bound need individual updates and cannot run with secure-agg")
        if self.round_timeout < 0:
            raise ConfigError(f"round-timeout must be >= 0 (0 = wait forever), got {self.round_timeout}")

    @property
    def dp_enabled(self) -> bool:
        return self.dp_epsilon > 0

    def recipe(self, *, synthetic: bool = False) -> TrainingRecipe:
        """The training recipe of this run: the model's registered recipe with every key this run sets applied.

        On synthetic faces (`synthetic`: the data being trained on is generated) a "strong" augmentation that the
        run did not ask for is trained as "light": a synthetic face's label lives in a few pixels of mouth and
        brows, which random erasing and wide shifts remove. Measured on 2,800 synthetic faces, CNN-AM, SGD
        Nesterov 0.05, 5 epochs: light 0.75, light + 10 % shifts 0.68, light + erasing 0.57, strong 0.40 (held-out
        accuracy). The generator already draws its own occlusions and lighting. Imports `models` (and so torch)
        on first use, so reading settings stays light.
        """
        import dataclasses as dc

        from models import model_recipe

        base = model_recipe(self.model)
        given = {
            "optimizer": self.optimizer if self.optimizer != RECIPE else None,
            "lr": self.lr if self.lr > 0 else None,
            "schedule": self.lr_schedule if self.lr_schedule != RECIPE else None,
            "warmup": self.warmup if self.warmup >= 0 else None,
            "weight_decay": self.weight_decay if self.weight_decay >= 0 else None,
            "label_smoothing": self.label_smoothing if self.label_smoothing >= 0 else None,
            "augment": self.augment if self.augment != RECIPE else None,
            "class_balance": self.class_balance if self.class_balance != RECIPE else None,
            "flip_tta": self.flip_tta == "on" if self.flip_tta != RECIPE else None,
        }
        if synthetic and given["augment"] is None and base.augment == "strong":
            given["augment"] = "light"
        return dc.replace(base, **{key: value for key, value in given.items() if value is not None})

    @property
    def train_optimizer(self) -> str:
        """The local optimiser clients use: dp-optimizer under DP-SGD, the recipe's otherwise."""
        return self.dp_optimizer if self.dp_enabled else self.recipe().optimizer

    @property
    def train_lr(self) -> float:
        """The local (peak) learning rate clients use: dp-lr under DP-SGD, the recipe's otherwise."""
        return self.dp_lr if self.dp_enabled else self.recipe().lr

    @property
    def train_batch_size(self) -> int:
        """The local (expected, under Poisson sampling) batch size: dp-batch-size under DP-SGD, batch-size otherwise."""
        return self.dp_batch_size if self.dp_enabled else self.batch_size

    @property
    def central_dp_enabled(self) -> bool:
        return self.central_dp_noise > 0

    @property
    def update_bound(self) -> float:
        """The L2 norm a client clips its update to: central-clip under central DP, else max-update-norm."""
        return min(self.central_clip, self.max_update_norm) if self.central_dp_enabled else self.max_update_norm


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run-config key {key!r} expects {kind.__name__}, got {value!r}") from None


def parse_label_prior(text: str, *, key: str = "label-prior") -> tuple[float, ...]:
    """Seven class counts or frequencies ("n0,...,n6", client.data.labels order), normalised to sum 1.

    Every class needs a positive share: logit-adjust divides by it. Raises ConfigError naming `key` otherwise.
    """
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != NUM_CLASSES or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{key} must be public, uniform or {NUM_CLASSES} positive class counts 'n0,...,n6'; "
                          f"got {text!r}")
    total = sum(values)
    return tuple(v / total for v in values)


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key} must be one of {', '.join(options)}; got {value!r}")
