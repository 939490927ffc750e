"""Reference weights shipped in models/weights/: loadable by name wherever a model file is, honest cards, and
`--init-model` starting a federation's round 0 from them (issue 12 item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from client.config import ConfigError, RunSettings
from client.inference.model import resolve_model
from models import create_model
from models.files import load_model
from models.reference import (
    UnknownReferenceError,
    best_reference,
    list_references,
    read_reference_info,
    reference_path,
)
from server.init_model import with_init_model
from server.rundir import RunDirectory
from simulation.cli.demo_cmd import DEMO_SETTINGS
from simulation.cli.evaluate_cmd import evaluate_saved_model

FER2013 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013"
FEDERATED_BUILDS = ["cnn_am_deep@fer2013", "fer_vgg@fer2013"]
BATCHNORM_BUILDS = ["fer_vgg@fer2013-bn", "dmsnet_iot@fer2013-bn"]
SHIPPED = FEDERATED_BUILDS + BATCHNORM_BUILDS
FER_VGG = "fer_vgg@fer2013"
needs_fer2013 = pytest.mark.skipif(not (FER2013 / "test").is_dir(), reason="the real FER2013 folder is not here")


def _fer2013_test_slice(tmp_path: Path, *, every: int) -> tuple[str, int]:
    """A dataset spec for every `every`-th PublicTest face of each emotion, by file name (FER2013's class mix), and
    how many faces it holds."""
    count = 0
    for emotion_dir in sorted((FER2013 / "test").iterdir()):
        target = tmp_path / "slice" / "test" / emotion_dir.name
        target.mkdir(parents=True)
        for face in sorted(emotion_dir.iterdir())[::every]:
            (target / face.name).symlink_to(face)
            count += 1
    return f"fer2013={tmp_path / 'slice'}", count


def test_the_reference_weights_are_shipped():
    """The package holds the references the docs promise, and the edge default is one of them."""
    assert set(SHIPPED) <= set(list_references())
    assert best_reference() in list_references()


@pytest.mark.parametrize("name", FEDERATED_BUILDS)
def test_a_reference_loads_by_name_into_the_federations_build(name):
    """`load_model(NAME)` reads the shipped safetensors, checks its sha256 and fits the default GroupNorm build."""
    # Execute
    state, card = load_model(name)

    # Assert
    model = create_model(card.name, dp=True)
    model.load_state_dict(state)  # strict: every key and shape fits
    assert card.name == name.split("@")[0] and card.format == "safetensors" and card.cfg == {"dp": True}
    assert all(torch.isfinite(t.float()).all() for t in state.values())


@pytest.mark.parametrize("name", BATCHNORM_BUILDS)
def test_a_batchnorm_reference_loads_for_inference_and_cannot_start_a_federation(name):
    """A `-bn` reference fits the BatchNorm build (for the edge), and --init-model refuses it in one line."""
    # Execute
    state, card = load_model(name)

    # Assert
    model = create_model(card.name, dp=False)
    model.load_state_dict(state)  # strict: the BatchNorm build, running statistics included
    assert card.cfg == {"dp": False} and any(key.endswith("running_var") for key in state)
    with pytest.raises(ConfigError, match=f"init-model {name} was trained with the BatchNorm build"):
        with_init_model(RunSettings(init_model=name), model_given=False)


def test_a_tampered_reference_is_refused(tmp_path):
    """A weights file that no longer matches the sha256 in its card does not load."""
    # Prepare: a copy of a shipped reference with one byte flipped near the end (inside a tensor)
    source = reference_path(SHIPPED[0])
    copy = tmp_path / source.name
    shutil.copy(source.with_suffix(".json"), copy.with_suffix(".json"))
    payload = bytearray(source.read_bytes())
    payload[-10] ^= 0xFF
    copy.write_bytes(bytes(payload))

    # Execute / Assert
    with pytest.raises(ValueError, match="sha256"):
        load_model(copy)


def test_an_unknown_reference_name_lists_the_shipped_ones():
    """A MODEL@DATASET name that is not shipped is one line listing what is."""
    with pytest.raises(UnknownReferenceError, match="shipped: .*fer_vgg@fer2013"):
        load_model("cnn_am@rafdb")


def test_edge_inference_defaults_to_the_best_reference(tmp_path):
    """With no --model and nothing delivered, predict/watch run the shipped reference with the best PublicTest score."""
    # Execute
    chosen = resolve_model(model=None, runtime="torch", state_dir=tmp_path)

    # Assert
    scores = {name: read_reference_info(name).public_test.flip_accuracy for name in list_references()}
    assert chosen == reference_path(max(scores, key=scores.get))
    assert resolve_model(model=Path(SHIPPED[0]), runtime="torch") == reference_path(SHIPPED[0])


@needs_fer2013
@pytest.mark.parametrize("name", SHIPPED)
def test_a_reference_scores_above_0_60_on_a_slice_of_real_fer2013(tmp_path, name):
    """On every 6th PublicTest face of each emotion (about 600, FER2013's class mix) the reference scores above 0.60
    (chance is 0.14, always "happy" 0.25)."""
    # Prepare
    dataset, faces = _fer2013_test_slice(tmp_path, every=6)

    # Execute
    scored = evaluate_saved_model(model_path=Path(name), dataset=dataset, split="test")

    # Assert
    assert scored["num_examples"] == faces > 550
    assert scored["accuracy"] > 0.60


@needs_fer2013
@pytest.mark.parametrize("name", SHIPPED)
def test_the_cards_public_test_figures_are_what_the_weights_score(tmp_path, name):
    """The accuracy and macro-F1 in a card are recomputed from the shipped weights on all of PublicTest."""
    # Prepare
    info = read_reference_info(name)

    # Execute
    scored = evaluate_saved_model(model_path=Path(name), dataset=f"fer2013={FER2013}", split="test")

    # Assert
    assert scored["flip_averaging"]["on"]["accuracy"] == pytest.approx(info.public_test.flip_accuracy, abs=1e-6)
    assert scored["flip_averaging"]["off"]["accuracy"] == pytest.approx(info.public_test.accuracy, abs=1e-6)
    assert scored["flip_averaging"]["on"]["macro_f1"] == pytest.approx(info.public_test.flip_macro_f1, abs=1e-6)


def test_init_model_names_the_model_when_none_was_given():
    """`--init-model fer_vgg@fer2013` alone makes the run train fer_vgg; a conflicting --model is one line."""
    # Prepare
    settings = RunSettings(init_model=FER_VGG)

    # Execute
    chosen = with_init_model(settings, model_given=False)

    # Assert
    assert chosen.model == "fer_vgg"
    with pytest.raises(ConfigError, match="init-model fer_vgg@fer2013 is a fer_vgg; this run trains cnn_am"):
        with_init_model(settings.replace(model="cnn_am"), model_given=True)


def test_init_model_refuses_a_batchnorm_build_and_a_missing_file(tmp_path):
    """A model.pt of the BatchNorm build cannot start a federation (which trains the GroupNorm build)."""
    # Prepare
    saved = RunDirectory(tmp_path / "run").save_model(create_model("fer_vgg", dp=False).state_dict(),
                                                     model_name="fer_vgg", model_cfg={"dp": False}, round=3)

    # Execute / Assert
    with pytest.raises(ConfigError, match="BatchNorm build"):
        with_init_model(RunSettings(init_model=str(saved)), model_given=False)
    with pytest.raises(ConfigError, match="init-model: .*does not exist"):
        with_init_model(RunSettings(init_model=str(tmp_path / "nothing.pt")), model_given=False)


@pytest.mark.slow
def test_init_model_starts_round_zero_at_the_references_accuracy(tmp_path):
    """A simulation started from a reference evaluates round 0 exactly as the reference scores on its own."""
    # Prepare: two sites, one short round on the demo's synthetic faces
    from simulation.runner import run_simulation

    settings = with_init_model(DEMO_SETTINGS.replace(
        num_clients=2, min_clients=2, num_server_rounds=1, local_epochs=1, init_model=FER_VGG,
        out_dir=str(tmp_path / "run")), model_given=False)

    # Execute
    run_simulation(settings, run_dir=RunDirectory(tmp_path / "run"), num_cpus=2)

    # Assert
    round0 = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    alone = evaluate_saved_model(model_path=Path(FER_VGG), dataset=settings.dataset, split="test",
                                 seed=settings.seed)
    assert round0["round"] == 0
    assert round0["server"]["accuracy"] == pytest.approx(alone["accuracy"])
    assert round0["server"]["confusion_matrix"] == alone["confusion_matrix"]
    untrained = evaluate_saved_model(model_path=RunDirectory(tmp_path / "random").save_model(
        create_model("fer_vgg", dp=True).state_dict(), model_name="fer_vgg", model_cfg={"dp": True}, round=0),
        dataset=settings.dataset, split="test", seed=settings.seed)
    assert round0["server"]["confusion_matrix"] != untrained["confusion_matrix"]
    assert np.isfinite(round0["server"]["loss"])
