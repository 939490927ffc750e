"""Local DP-SGD: accounting against Opacus and dp_accounting, calibration, cumulative ε over real rounds."""

from __future__ import annotations

import math
import warnings

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from privacy.dp import GRAD_SAMPLE_MODES, DPClient, DPSettings, PlanExceeded, RoundPlan
from privacy.ledger import PrivacyLedger, generate_key_file
from privacy.noise import _SecureRandom

DELTA = 1e-5

# (history, rdp ε, prv ε) at δ = 1e-5, measured with Opacus 1.6.0; a change means the accounting changed.
GOLDEN = [
    ([(1.0, 0.01, 1000)], 2.1013652716430564, 1.8383716376346455),
    ([(1.1, 0.05, 60)], 2.7425446970632503, 2.346108445123955),
    ([(1.2, 0.05, 30), (0.9, 0.1, 20)], 5.381801489014021, 4.607605676845607),
]


@pytest.fixture(autouse=True)
def _quiet_opacus():
    # Opacus warns about backward hooks on inputs without grad and about empty Poisson batches.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _make_dataset(*, size: int = 60, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Small random classification data."""
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(size, features, generator=generator), torch.randint(0, classes, (size,), generator=generator)
    )


def _make_model(*, features: int = 8, classes: int = 3) -> nn.Module:
    """A tiny Opacus-compatible classifier."""
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def _open_ledger(tmp_path, *, epsilon: float = 3.0, accountant: str = "rdp") -> PrivacyLedger:
    """The client's ledger in tmp_path, creating its key on first use."""
    key = tmp_path / "ledger.key"
    if not key.exists():
        generate_key_file(key)
    return PrivacyLedger.open(
        tmp_path / "client" / "ledger.bin",
        key_file=key,
        anchor_path=tmp_path / "anchor" / "ledger.anchor",
        client_id="hospital-a",
        budget_epsilon=epsilon,
        delta=DELTA,
        accountant=accountant,
    )


def _make_client(tmp_path, *, size: int = 60, batch_size: int = 4, rounds: int = 3, secure: bool = False,
                 max_grad_norm: float = 1.0) -> DPClient:
    """A DP client as Flower would build it at the start of a round."""
    return DPClient(
        settings=DPSettings(epsilon=3.0, delta=DELTA, max_grad_norm=max_grad_norm, secure_mode=secure),
        ledger=_open_ledger(tmp_path),
        dataset_size=size,
        batch_size=batch_size,
        local_epochs=1,
        planned_rounds=rounds,
    )


def _train(private, *, epochs: int = 1) -> int:
    """Runs the plain DP-SGD loop over the private loader; returns the number of optimizer steps."""
    steps = 0
    for _ in range(epochs):
        for x, y in private.loader:
            private.optimizer.zero_grad()
            private.criterion(private.model(x), y).backward()
            private.optimizer.step()
            steps += 1
    return steps


def _dp_accounting_epsilon(history, delta: float) -> float:
    """ε from Google's dp_accounting RDP accountant (an independent implementation)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    for sigma, rate, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("history", "rdp_epsilon", "prv_epsilon"), GOLDEN)
def test_compute_epsilon_equals_opacus_accountant_and_golden(history, rdp_epsilon, prv_epsilon):
    """ε is exactly Opacus's RDP/PRV accountant for the same history, and its recorded golden value."""
    # Prepare
    rdp, prv = RDPAccountant(), PRVAccountant()
    rdp.history, prv.history = list(history), list(history)

    # Execute
    ours_rdp = compute_epsilon(history=history, delta=DELTA, accountant="rdp")
    ours_prv = compute_epsilon(history=history, delta=DELTA, accountant="prv")

    # Assert
    assert ours_rdp == rdp.get_epsilon(delta=DELTA)
    assert ours_prv == prv.get_epsilon(delta=DELTA)
    assert ours_rdp == pytest.approx(rdp_epsilon, rel=1e-9)
    assert ours_prv == pytest.approx(prv_epsilon, rel=1e-6)


@pytest.mark.parametrize(("history", "rdp_epsilon", "prv_epsilon"), GOLDEN)
def test_compute_epsilon_agrees_with_dp_accounting_within_5_percent(history, rdp_epsilon, prv_epsilon):
    """Our RDP ε agrees with Google's dp_accounting RDP accountant to within 5 %."""
    # Execute
    ours = compute_epsilon(history=history, delta=DELTA, accountant="rdp")
    theirs = _dp_accounting_epsilon(history, DELTA)

    # Assert
    assert ours / theirs == pytest.approx(1.0, abs=0.05)


def test_prv_epsilon_agrees_with_dp_accounting_pld_within_5_percent():
    """The PRV accountant agrees with dp_accounting's PLD accountant (both numerically tight) within 5 %."""
    # Prepare
    sigma, rate, steps = 1.1, 0.05, 60
    pld = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
    pld.compose(dp_accounting.SelfComposedDpEvent(event, steps))

    # Execute
    ours = compute_epsilon(history=[(sigma, rate, steps)], delta=DELTA, accountant="prv")

    # Assert
    assert ours / pld.get_epsilon(DELTA) == pytest.approx(1.0, abs=0.05)


def test_split_history_equals_merged_history():
    """Three rounds of (σ, q, s) cost exactly what one (σ, q, 3s) costs, for both accountants."""
    for accountant in ("rdp", "prv"):
        # Execute
        split = compute_epsilon(history=[(1.1, 0.05, 20)] * 3, delta=DELTA, accountant=accountant)
        merged = compute_epsilon(history=[(1.1, 0.05, 60)], delta=DELTA, accountant=accountant)

        # Assert
        assert split == merged


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("prv", marks=pytest.mark.slow)])
def test_calibrated_sigma_spends_just_under_the_target(accountant):
    """The calibrated σ spends ≤ ε over the planned steps, within Opacus's 0.01 search tolerance."""
    # Prepare
    target, rate, steps = 3.0, 4 / 60, 45

    # Execute
    sigma = calibrate_noise_multiplier(epsilon=target, delta=DELTA, sample_rate=rate, steps=steps, accountant=accountant)
    spent = compute_epsilon(history=[(sigma, rate, steps)], delta=DELTA, accountant=accountant)

    # Assert
    assert target - 0.01 <= spent <= target
    assert compute_epsilon(history=[(sigma * 0.9, rate, steps)], delta=DELTA, accountant=accountant) > target


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epsilon", 0.0),
        ("epsilon", float("inf")),
        ("delta", 1.0),
        ("delta", 0.0),
        ("max_grad_norm", -1.0),
        ("accountant", "gdp"),
        ("secure_mode", "yes"),
    ],
)
def test_settings_reject_bad_field_by_name(field, value):
    """An invalid DPSettings field raises ValueError naming that field."""
    # Prepare
    kwargs = {"epsilon": 3.0, field: value}

    # Execute / Assert
    with pytest.raises(ValueError, match=f"DPSettings.{field}"):
        DPSettings(**kwargs)


@pytest.mark.slow
def test_three_real_rounds_compose_instead_of_resetting(tmp_path):
    """After 3 rounds of real Opacus training, ε is the accountant of all 3 rounds composed, not one round's."""
    # Prepare
    torch.manual_seed(0)
    dataset = _make_dataset()
    epsilons, accountant_epsilons, steps_taken = [], [], []

    # Execute: a fresh DPClient and ledger handle every round, as Flower rebuilds clients per round.
    for server_round in (1, 2, 3):
        client = _make_client(tmp_path)
        plan = client.begin_round(server_round=server_round)
        model = _make_model()
        private = client.make_private(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=dataset, plan=plan
        )
        steps_taken.append(_train(private))
        epsilons.append(client.status()["epsilon_spent"])
        accountant_epsilons.append(client.accountant.get_epsilon(delta=DELTA))

    # Assert
    sigma, rate, per_round = plan.noise_multiplier, plan.sample_rate, plan.steps
    assert (rate, per_round) == (4 / 60, 15)
    assert steps_taken == [15, 15, 15]
    composed = RDPAccountant()
    composed.history = [(sigma, rate, per_round)] * 3
    reset = RDPAccountant()
    reset.history = [(sigma, rate, per_round)]
    assert epsilons[2] == pytest.approx(composed.get_epsilon(delta=DELTA), rel=1e-12)
    assert accountant_epsilons == pytest.approx(epsilons, rel=1e-12)
    assert epsilons[2] > epsilons[1] > epsilons[0] == pytest.approx(reset.get_epsilon(delta=DELTA), rel=1e-12)
    assert epsilons[2] <= 3.0
    assert epsilons[2] / _dp_accounting_epsilon([(sigma, rate, 3 * per_round)], DELTA) == pytest.approx(1.0, abs=0.05)


def test_step_beyond_the_charged_plan_is_refused_and_not_applied(tmp_path):
    """A second epoch on a one-epoch plan raises PlanExceeded and leaves the weights untouched."""
    # Prepare
    torch.manual_seed(0)
    client = _make_client(tmp_path)
    plan = client.begin_round(server_round=1)
    model = _make_model()
    private = client.make_private(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=_make_dataset(), plan=plan
    )
    assert _train(private) == plan.steps
    before = [p.detach().clone() for p in model.parameters()]

    # Execute / Assert
    with pytest.raises(PlanExceeded, match="charged for 15 steps"):
        _train(private)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_plan_pays_for_one_run_only(tmp_path):
    """Reusing a plan, or using one that is no longer the ledger's latest charge, is refused."""
    # Prepare
    client = _make_client(tmp_path)
    dataset = _make_dataset()
    first = client.begin_round(server_round=1)
    model = _make_model()
    client.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=dataset, plan=first)

    # Execute / Assert
    with pytest.raises(ValueError, match="already used"):
        client.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=dataset, plan=first)
    client.begin_round(server_round=2)
    with pytest.raises(ValueError, match="not the ledger's latest charge"):
        client.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=dataset, plan=first)


def test_model_with_batchnorm_is_refused(tmp_path):
    """A model Opacus cannot train privately (BatchNorm mixes examples) is refused with a clear error."""
    # Prepare
    client = _make_client(tmp_path)
    plan = client.begin_round(server_round=1)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot be trained with DP-SGD"):
        client.make_private(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=_make_dataset(), plan=plan
        )


def test_poisson_loader_has_the_charged_rate_and_steps(tmp_path):
    """The loader yields ceil(N/B) batches per epoch of Poisson sizes averaging q·N = B."""
    # Prepare
    torch.manual_seed(1)
    client = _make_client(tmp_path, size=60, batch_size=6)
    plan = client.begin_round(server_round=1)
    model = _make_model()
    private = client.make_private(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=_make_dataset(), plan=plan
    )

    # Execute
    sizes = [len(y) for _ in range(40) for _, y in private.loader]

    # Assert
    assert plan.steps_per_epoch == 10 and len(sizes) == 400
    assert np.mean(sizes) == pytest.approx(6.0, abs=0.4)  # binomial(60, 0.1): sd of the mean ≈ 0.12
    assert len(set(sizes)) > 3


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_standard_deviation_sigma_times_clip(tmp_path, secure):
    """With zero gradients, one step moves the weights by exactly the noise: sd σ·C / B, mean 0."""
    # Prepare: zero inputs make every per-example gradient of a bias-free linear layer zero.
    size, batch = 40, 4
    dataset = TensorDataset(torch.zeros(size, 200), torch.zeros(size, dtype=torch.long))
    client = _make_client(tmp_path, size=size, batch_size=batch, secure=secure)
    plan = client.begin_round(server_round=1)
    model = nn.Linear(200, 250, bias=False)
    nn.init.zeros_(model.weight)
    private = client.make_private(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), dataset=dataset, plan=plan
    )

    # Execute
    x, y = next(iter(private.loader))
    private.optimizer.zero_grad()
    private.criterion(private.model(x), y).backward()
    private.optimizer.step()
    noise = -model.weight.detach().double().flatten() * batch

    # Assert: 50 000 samples; the sample sd is within 2 % of σC with overwhelming probability.
    expected_sd = plan.noise_multiplier * plan.max_grad_norm
    assert noise.std().item() == pytest.approx(expected_sd, rel=0.02)
    assert abs(noise.mean().item()) < 5 * expected_sd / math.sqrt(noise.numel())


def test_secure_random_never_runs_out_of_chacha20_counter_whatever_the_os_returns(monkeypatch):
    """The keystream's 32-bit block counter starts at 0 whatever os.urandom returns, so a node draws its noise
    (here 1 MB, ~16,000 blocks) without ChaCha20's counter overflowing (a random start crashed 1 key in ~256)."""
    # Prepare: the OS returns the worst bytes for the counter (0xff...: one block before the 2^32 limit)
    import privacy.noise as noise

    monkeypatch.setattr(noise.os, "urandom", lambda n: b"\xff" * n)
    rng = _SecureRandom()

    # Execute
    draws = rng.uniform(128 * 1024)

    # Assert
    assert draws.shape == (128 * 1024,) and 0.0 < draws.min() and draws.max() < 1.0


def test_secure_random_is_gaussian_and_independent_of_torch_seed():
    """Secure-mode noise is N(0, 1) and does not repeat when torch's global seed is reset."""
    # Prepare
    rng = _SecureRandom()
    reference = torch.zeros(100_000, dtype=torch.float64)

    # Execute
    torch.manual_seed(0)
    first = rng.gaussian_like(reference, std=1.0)
    torch.manual_seed(0)
    second = rng.gaussian_like(reference, std=1.0)
    other = _SecureRandom().gaussian_like(reference, std=1.0)

    # Assert
    assert first.mean().item() == pytest.approx(0.0, abs=0.02)
    assert first.std().item() == pytest.approx(1.0, abs=0.01)
    assert (first.abs() > 1.96).double().mean().item() == pytest.approx(0.05, abs=0.005)
    assert not torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_every_grad_sample_mode_trains_the_charged_steps(tmp_path, mode):
    """Each supported per-sample-gradient engine trains the plan's steps and changes the weights."""
    # Prepare
    torch.manual_seed(0)
    client = _make_client(tmp_path, secure=True)
    plan = client.begin_round(server_round=1)
    model = _make_model()
    before = [p.detach().clone() for p in model.parameters()]
    private = client.make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dataset=_make_dataset(),
        plan=plan,
        grad_sample_mode=mode,
    )

    # Execute
    steps = _train(private)

    # Assert
    assert steps == plan.steps
    assert len(client.accountant.history) == 1 and client.accountant.history[0][2] == plan.steps
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_one_model_object_serves_consecutive_rounds(tmp_path, mode):
    """Wrapping the same model in round 2 replaces round 1's hooks instead of failing or doubling them."""
    # Prepare
    torch.manual_seed(0)
    model, dataset, steps = _make_model(), _make_dataset(), []

    # Execute
    for server_round in (1, 2):
        client = _make_client(tmp_path)
        plan = client.begin_round(server_round=server_round)
        private = client.make_private(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            dataset=dataset,
            plan=plan,
            grad_sample_mode=mode,
        )
        steps.append(_train(private))

    # Assert
    assert steps == [plan.steps, plan.steps]
    linear_layers = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    hooks = model._bookkeeping_hooks if mode == "bk" else model.autograd_grad_sample_hooks
    assert len(hooks) == 2 * linear_layers


CLIP = 2.0  # above the √2 a sample's output-bias gradient alone can reach, so small inputs stay under it


def _clipped_sum_of_one_step(tmp_path, *, mode: str, x: torch.Tensor, y: torch.Tensor) -> tuple[list, RoundPlan]:
    """One production DP-SGD step of a fresh DPClient on the batch (x, y); returns the clipped per-sample-gradient
    sum the optimizer added its noise to (Opacus keeps it as `summed_grad` until the next zero_grad)."""
    torch.manual_seed(0)
    model = _make_model()
    client = _make_client(tmp_path, max_grad_norm=CLIP)
    plan = client.begin_round(server_round=1)
    private = client.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  dataset=_make_dataset(), plan=plan, grad_sample_mode=mode)
    private.optimizer.zero_grad()
    private.criterion(private.model(x), y).backward()
    private.optimizer.step()
    return [p.summed_grad.detach().clone() for p in model.parameters()], plan


def _clipped_sum_by_hand(x: torch.Tensor, y: torch.Tensor, *, max_grad_norm: float) -> tuple[list, list[float]]:
    """Σᵢ gᵢ · min(1, C / ‖gᵢ‖) with each sample's gradient from its own backward pass (no Opacus)."""
    torch.manual_seed(0)
    model = _make_model()
    total = [torch.zeros_like(p) for p in model.parameters()]
    norms = []
    for xi, yi in zip(x, y):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        norms.append(norm)
        total = [t + g * min(1.0, max_grad_norm / (norm + 1e-6)) for t, g in zip(total, grads)]
    return total, norms


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_each_sample_contributes_at_most_max_grad_norm(tmp_path, mode):
    """The sum a step adds its noise to is Σ of per-sample gradients clipped to max_grad_norm, computed here one
    sample at a time without Opacus: no sample's pull exceeds the bound, whichever per-sample engine runs."""
    # Prepare: 3 samples with inputs scaled far past the bound, 3 left below it
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    x[:3] *= 50.0
    x[3:] *= 0.02
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    expected, norms = _clipped_sum_by_hand(x, y, max_grad_norm=CLIP)

    # Execute
    clipped_sum, plan = _clipped_sum_of_one_step(tmp_path, mode=mode, x=x, y=y)

    # Assert
    assert plan.max_grad_norm == CLIP and plan.noise_multiplier > 0
    assert min(norms[:3]) > 10 * CLIP and max(norms[3:]) < CLIP  # the bound bites, and only for the first three
    for got, want in zip(clipped_sum, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    total_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in clipped_sum)))
    assert total_norm <= (3 * CLIP + sum(norms[3:])) * (1 + 1e-4)


# --- augmentation multiplicity ------------------------------------------------------------------------------------

def _make_face_dataset(*, size: int = 60, views: int = 1):
    """Random 48x48 faces with the light augmentation, K views per item."""
    from client.data.preprocess import FERTorchDataset, make_augment

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (size, 48, 48), dtype=np.uint8)
    return FERTorchDataset(images, rng.integers(0, 7, size), augment=make_augment("light"), seed=3, views=views)


def test_augmentation_multiplicity_needs_the_bookkeeping_engine(tmp_path):
    """Opacus's engines would clip each view as a sample: views > 1 with them is refused before anything trains."""
    client = _make_client(tmp_path)
    plan = client.begin_round(server_round=1)
    model = _make_model()

    with pytest.raises(ValueError, match="needs grad_sample_mode 'bk'"):
        client.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            dataset=_make_dataset(), plan=plan, grad_sample_mode="hooks", views=2)


def test_augmentation_multiplicity_trains_the_charged_steps_at_the_same_epsilon(tmp_path):
    """K views per sample change neither the steps nor the epsilon charged: the accountant sees one sample's
    sensitivity at the same Poisson rate, and task.train reports samples, not rows."""
    from client import task
    from models import create_model
    from tests.model_builds import SMALL_CFG

    spent, examples = {}, {}
    for views in (1, 3):
        # Prepare
        torch.manual_seed(0)
        client = _make_client(tmp_path / f"k{views}", batch_size=8)
        plan = client.begin_round(server_round=1)
        model = create_model("cnn_am", dp=True, **SMALL_CFG["cnn_am"])
        before = [p.detach().clone() for p in model.parameters()]
        private = client.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      dataset=_make_face_dataset(views=views), plan=plan, grad_sample_mode="bk",
                                      views=views)

        # Execute
        result = task.train(private.model, private.loader, epochs=1, optimizer=private.optimizer,
                            criterion=private.criterion)

        # Assert
        assert result.steps == plan.steps
        examples[views] = result.num_examples
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        spent[views] = client.status()["epsilon_spent"]
    assert spent[3] == pytest.approx(spent[1], rel=1e-12)
    # 8 Poisson batches of expected size 8 (64 faces, sd 7.6): each face counted once, not once per view (~190 rows)
    assert 30 < examples[1] < 100 and 30 < examples[3] < 100


def test_face_dataset_views_are_distinct_and_reproducible():
    """An item with K views is K different augmentations, and the same seed gives the same K views."""
    first, second = _make_face_dataset(views=3), _make_face_dataset(views=3)

    views, label = first[5]
    again, _ = second[5]

    assert views.shape == (3, 1, 48, 48) and label.dim() == 0
    assert torch.equal(views, again)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])


@pytest.mark.parametrize(("options", "message"), [
    (["--aug-mult", "2"], "aug-mult 2 averages views before DP-SGD's clipping: it needs dp-epsilon > 0"),
    (["--aug-mult", "2", "--dp-epsilon", "3", "--model", "dmsnet_light"],
     "aug-mult 2 needs a model with the book-keeping DP engine; dmsnet_light uses 'hooks'"),
    (["--aug-mult", "2", "--dp-epsilon", "3", "--augment", "none"], "augment 'none' gives K copies"),
    (["--aug-mult", "0", "--dp-epsilon", "3"], "aug-mult must be positive"),
])
def test_fer_sim_refuses_aug_mult_it_cannot_honour_in_one_line(tmp_path, capsys, options, message):
    """fer-sim run refuses an aug-mult the run cannot train with, in one line, before a run directory exists."""
    from client.cli.runner import run_cli
    from simulation.cli.main import _register, app

    _register()
    out = tmp_path / "run"

    code = run_cli(app, "fer-sim", ["run", "--dataset", "synthetic=300", "--out", str(out), *options])

    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("fer-sim: error: ") and message in lines[0]
    assert not out.exists()
