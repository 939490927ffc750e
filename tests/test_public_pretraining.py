"""Public pretraining (public-fraction) and honest privacy reporting: the public slice is no site's, round 0 learns
from it, and privacy.json / report.md name the public data and count only the private DP-SGD steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from client.config import RunSettings
from client.node_data import cached_dataset
from models import create_model, freeze_for_dp
from privacy.report import PublicData, privacy_report
from server.evaluation import ServerEvaluator
from server.init_model import public_start_warning, with_init_model
from server.public_pretrain import public_split
from server.report import write_report
from server.rundir import RunDirectory
from server.server_app import initial_weights, load_server_test_set
from simulation.federation import federation_plan, federation_stats
from simulation.runner import run_simulation

from tests.report_tables import markdown_table


def _make_settings(**changes) -> RunSettings:
    """A small synthetic federation with a public slice of 30 %."""
    base = RunSettings(dataset="synthetic=600", num_clients=3, min_clients=3, partition="dirichlet", alpha=0.5,
                       public_fraction=0.3, seed=7)
    return base.replace(**changes)


def _make_saved_model(tmp_path, *, dataset: str) -> str:
    """A run's model.pt whose card says it was trained on `dataset`."""
    torch.manual_seed(0)
    model = create_model("cnn_am", dp=True)
    path = RunDirectory(tmp_path / "trained").save_model(model.state_dict(), model_name="cnn_am", model_cfg={"dp": True},
                                                         round=1, dataset=dataset)
    return str(path)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "quantity"])
def test_public_slice_is_disjoint_from_every_site_and_stratified(partition):
    """No site holds a public face; sites and slice cover the training split; each class gives about F of itself."""
    # Prepare
    settings = _make_settings(partition=partition)
    labels = cached_dataset(settings.dataset, settings.image_size, settings.seed).splits["train"].labels

    # Execute
    split = public_split(settings, settings.dataset)
    sites = [set(plan.indices.tolist()) for plan in federation_plan(settings)]

    # Assert
    public = set(split.public.tolist())
    assert all(not (site & public) for site in sites)
    assert set().union(*sites) | public == set(range(len(labels))) and not set().union(*sites) & public
    for label in np.unique(labels):
        in_class = int((labels == label).sum())
        assert abs(int((labels[split.public] == label).sum()) - settings.public_fraction * in_class) <= 1


def test_public_slice_follows_the_seed_and_is_absent_at_fraction_zero():
    """The same seed draws the same slice, another seed another one; fraction 0 leaves every sample to the sites."""
    first = public_split(_make_settings(), "synthetic=600").public
    again = public_split(_make_settings(), "synthetic=600").public
    other = public_split(_make_settings(seed=8), "synthetic=600").public
    none = public_split(_make_settings(public_fraction=0.0), "synthetic=600")

    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert len(none.public) == 0 and np.array_equal(none.private, np.arange(600))


def test_partition_json_records_the_public_slice(tmp_path):
    """partition.json (as the runner writes it) says how many faces are public, per class, and that they are."""
    # Prepare
    settings = _make_settings()
    run = RunDirectory(tmp_path / "run")

    # Execute
    run.write_partition(federation_stats(settings))
    written = json.loads((tmp_path / "run" / "partition.json").read_text())

    # Assert
    split = public_split(settings, settings.dataset)
    block = written["public_slice"]
    assert block["public"] is True and block["faces"] == len(split.public)
    assert abs(block["faces"] - settings.public_fraction * 600) <= 7  # one rounding per class
    assert sum(block["per_class"]) == block["faces"]
    assert written["datasets"][settings.dataset]["unassigned"] == block["faces"]
    assert sum(c["size"] for c in written["clients"].values()) == 600 - block["faces"]


@pytest.mark.slow
def test_public_pretraining_starts_round_zero_above_a_random_start():
    """Round 0's model (server_app.initial_weights, the ServerApp's and the baseline's) scores higher on the held-out
    test set after public pretraining (measured 0.133 -> 0.217 with these settings, ~45 s on a loaded CPU)."""
    # Prepare
    settings = RunSettings(dataset="synthetic=1200", num_clients=2, public_fraction=0.6, public_epochs=4,
                           batch_size=16, seed=1)
    images, labels, _ = load_server_test_set(settings)
    evaluator = ServerEvaluator(model_name=settings.model, images=images, labels=labels, flip_tta=False)

    # Execute
    plain = evaluator(0, initial_weights(settings.replace(public_fraction=0.0)))[1]["accuracy"]
    pretrained = evaluator(0, initial_weights(settings))[1]["accuracy"]

    # Assert
    assert pretrained > plain + 0.05


def test_public_batch_size_and_lr_pin_round_zero_whatever_the_sites_train_with():
    """With public-batch-size and public-lr set, round 0 is what that batch and rate give as the run's own values,
    and the sites' batch-size and lr no longer move it (without them, they do)."""
    # Prepare
    base = _make_settings(public_epochs=1, batch_size=16, lr=0.01)
    sites_changed = base.replace(batch_size=8, lr=0.005)

    # Execute
    reference = initial_weights(base)
    pinned = initial_weights(sites_changed.replace(public_batch_size=16, public_lr=0.01))
    unpinned = initial_weights(sites_changed)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(reference, pinned))
    assert max(float(np.abs(a - b).max()) for a, b in zip(reference, unpinned)) > 1e-4


def test_a_fer2013_trained_init_model_on_fer2013_sites_warns_on_stderr_once(tmp_path, capsys):
    """A start that has seen the sites' dataset is flagged (one stderr line); other sites' data is not."""
    # Prepare
    trained = _make_saved_model(tmp_path, dataset="fer2013=/data/fer2013")

    # Execute
    same = with_init_model(RunSettings(init_model=trained, dataset="fer2013=/sites/fer@4"), model_given=False)
    err = capsys.readouterr().err
    other = public_start_warning(RunSettings(init_model=trained, dataset="rafdb=/sites/raf"))

    # Assert
    assert err.count("\n") == 1 and err.startswith("WARNING: init-model") and "fer2013" in err
    assert "not a fair public start" in public_start_warning(same)
    assert other is None


def test_report_md_shows_the_warning_and_the_public_data(tmp_path):
    """report.md repeats privacy.json's warning on top and lists the public slice and init-model."""
    # Prepare
    trained = _make_saved_model(tmp_path, dataset="fer2013=/data/fer2013")
    settings = RunSettings(init_model=trained, dataset="fer2013=/sites/fer", out_dir=str(tmp_path / "run"))
    public = PublicData(init_model=trained, init_model_dataset="fer2013=/data/fer2013",
                        warning=public_start_warning(settings))
    run = RunDirectory(tmp_path / "run")
    run.write_config(settings.to_run_config())
    run.write_privacy(privacy_report(clients=[], central=None, secure_aggregation=False, public_data=public))

    # Execute
    text = write_report(tmp_path / "run").read_text()

    # Assert
    assert f"> **Warning.** {public.warning}." in text
    assert f"- init-model: {trained} (trained on fer2013=/data/fer2013)" in text
    assert "Public data used in the clear" in text


@pytest.fixture(scope="module")
def public_dp_run(tmp_path_factory):
    """A DP-SGD simulation (real ServerApp and ClientApp) after public pretraining, fine-tuning the head only."""
    out = tmp_path_factory.mktemp("public") / "run"
    settings = RunSettings(dataset="synthetic=400", num_clients=2, min_clients=2, partition="iid",
                           num_server_rounds=2, local_epochs=1, public_fraction=0.25, public_epochs=1,
                           dp_epsilon=8.0, dp_batch_size=32, dp_train="head", seed=3, out_dir=str(out))
    run_simulation(settings, run_dir=RunDirectory(out), num_cpus=2)
    return settings, out


@pytest.mark.slow
def test_privacy_json_and_report_name_the_public_data_and_the_trained_parameters(public_dp_run):
    """privacy.json and report.md (as the run wrote them) name the public slice and each site's trainable and frozen
    parameter counts, which are the ones dp-train head gives."""
    # Prepare
    settings, out = public_dp_run
    counts = freeze_for_dp(create_model(settings.model, dp=True), "head")

    # Execute
    privacy = json.loads((out / "privacy.json").read_text())
    partition = json.loads((out / "partition.json").read_text())
    text = (out / "report.md").read_text()

    # Assert
    public = privacy["public_data"]
    faces = len(public_split(settings, settings.dataset).public)
    assert public["faces"] == partition["public_slice"]["faces"] == faces
    assert public["slices"][0]["per_class"] == partition["public_slice"]["per_class"]
    assert public["pretrain_epochs"] == 1 and public["protection"].startswith("none")
    assert [(c["dp_train"], c["trainable_params"], c["frozen_params"]) for c in privacy["clients"]] == \
        [("head", counts.trainable, counts.frozen)] * 2
    assert "covers only the private part" in privacy["epsilon_scope"]
    assert "not counted in any epsilon" in privacy["epsilon_scope"]
    rows = markdown_table(text, "Privacy")
    assert [(r["dp_train"], r["trainable_params"]) for r in rows] == [("head", str(counts.trainable))] * 2
    assert f"- public slice of synthetic=400: {faces} faces" in text


@pytest.mark.slow
def test_epsilon_counts_only_the_private_steps_and_equals_opacus(public_dp_run):
    """Each site's steps are its own DP-SGD steps (rounds x ceil(1/q)), none of the server's pretraining steps, and
    its epsilon is Opacus's RDP accountant's for exactly those steps."""
    # Prepare
    settings, out = public_dp_run

    # Execute
    clients = json.loads((out / "privacy.json").read_text())["clients"]

    # Assert
    for client in clients:
        steps = settings.num_server_rounds * settings.local_epochs * math.ceil(1 / client["sample_rate"])
        assert client["steps"] == steps
        accountant = RDPAccountant()
        accountant.history = [(client["noise_multiplier"], client["sample_rate"], steps)]
        assert client["epsilon_spent"] == pytest.approx(accountant.get_epsilon(settings.dp_delta), rel=1e-9)


@pytest.mark.slow
def test_frozen_parameters_come_back_from_the_federation_unchanged(public_dp_run):
    """With dp-train head, the final model's frozen parameters are bit-identical to round 0's pretrained model: no
    site moved them and the server's average left them as they were; the classifier did move."""
    # Prepare
    settings, out = public_dp_run
    model = create_model(settings.model, dp=True)
    trained = freeze_for_dp(model, "head") and {n for n, p in model.named_parameters() if p.requires_grad}

    # Execute
    from client import wire
    from models.files import load_model

    wire.set_weights(model, initial_weights(settings))
    start = model.state_dict()
    final, _ = load_model(out / "model.pt")

    # Assert
    assert all(torch.equal(final[n], start[n]) for n in start if n not in trained)
    assert all(not torch.equal(final[n], start[n]) for n in trained)
