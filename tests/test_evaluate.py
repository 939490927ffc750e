"""`fer-sim evaluate` on a labelled test set alone: image folders holding only `test/<emotion>/`, or bare
`<emotion>/` folders, as someone scoring a model on their own held-out faces has (issue 12 item 6)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import pytest

from client.data.labels import EMOTIONS
from client.data.synthetic import make_synthetic
from models import create_model
from server.rundir import RunDirectory
from simulation.cli.evaluate_cmd import evaluate_saved_model

FER2013 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013"


def _make_model(root: Path) -> Path:
    """A run's model.pt + model.json (an untrained CNN-AM: the test compares two readings of the same faces)."""
    return RunDirectory(root / "run").save_model(create_model("cnn_am", dp=True).state_dict(), model_name="cnn_am",
                                                 model_cfg={"dp": True}, round=1)


def _write_faces(folder: Path, *, n: int = 28, seed: int = 3) -> int:
    """n synthetic face crops as PNGs under folder/<emotion>/; returns how many were written."""
    images, labels = make_synthetic(n, seed=seed)
    for index, (image, label) in enumerate(zip(images, labels)):
        target = folder / EMOTIONS[int(label)]
        target.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target / f"face-{index:03d}.png"), image)
    return n


@pytest.mark.parametrize("layout", ["test-folder-only", "bare-emotion-folders"])
def test_a_test_set_alone_scores_as_the_test_split_of_a_full_dataset(tmp_path, layout):
    """The same faces give the same metrics whether they are a full dataset's test/ or a test set on their own."""
    # Prepare: a full dataset (train/ + test/) and the same test faces alone
    model = _make_model(tmp_path)
    _write_faces(tmp_path / "full" / "train", n=14, seed=1)
    count = _write_faces(tmp_path / "full" / "test")
    alone = tmp_path / "alone"
    _write_faces(alone / "test" if layout == "test-folder-only" else alone)
    kind = "fer2013" if layout == "test-folder-only" else "faces"

    # Execute
    reference = evaluate_saved_model(model_path=model, dataset=f"faces={tmp_path / 'full'}", split="test")
    scored = evaluate_saved_model(model_path=model, dataset=f"{kind}={alone}", split="test")

    # Assert
    assert scored["num_examples"] == reference["num_examples"] == count
    assert scored["confusion_matrix"] == reference["confusion_matrix"]
    for key in ("accuracy", "macro_f1", "per_class_recall", "loss"):
        assert scored[key] == pytest.approx(reference[key]), key
    assert sum(map(sum, scored["confusion_matrix"])) == count
    assert set(scored["flip_averaging"]) == {"off", "on"}
    headline = scored["flip_averaging"]["on" if scored["flip_tta"] else "off"]
    assert headline["accuracy"] == scored["accuracy"] and headline["confusion_matrix"] == scored["confusion_matrix"]


def test_both_flip_readings_are_the_plain_and_the_flip_averaged_evaluation(tmp_path):
    """`flip_averaging` holds the evaluation without and with flip averaging, each as task.evaluate computes it."""
    # Prepare
    from torch.utils.data import DataLoader

    from client import task
    from client.data.formats import load_dataset
    from client.data.preprocess import FERTorchDataset
    from models.files import load_model

    path = _make_model(tmp_path)
    _write_faces(tmp_path / "alone")
    state, _ = load_model(path)
    model = create_model("cnn_am", dp=True)
    model.load_state_dict(state)
    part = load_dataset(f"faces={tmp_path / 'alone'}", test_only=True).splits["test"]
    loader = DataLoader(FERTorchDataset(part.images, part.labels), batch_size=256)

    # Execute
    scored = evaluate_saved_model(model_path=path, dataset=f"faces={tmp_path / 'alone'}", split="test")

    # Assert
    for key, tta in (("off", False), ("on", True)):
        expected = task.evaluate(model, loader, flip_tta=tta)
        assert scored["flip_averaging"][key]["loss"] == pytest.approx(expected.loss)
    assert scored["flip_averaging"]["off"]["loss"] != pytest.approx(scored["flip_averaging"]["on"]["loss"])


def test_a_training_split_is_still_required_for_training_data(tmp_path):
    """Only scoring accepts a test set alone: loading data to train from still refuses a tree without train/."""
    # Prepare
    from client.data.formats import DatasetError, load_dataset

    _write_faces(tmp_path / "alone" / "test")

    # Execute, Assert
    with pytest.raises(DatasetError, match="no train/ folder"):
        load_dataset(f"fer2013={tmp_path / 'alone'}")


@pytest.mark.skipif(not (FER2013 / "test").is_dir(), reason="the real FER2013 folder is not on this machine")
def test_the_real_fer2013_test_folder_scores_on_its_own(tmp_path):
    """FER2013's PublicTest folder, without its train/, is scored: every one of its faces counts once."""
    # Prepare
    model = _make_model(tmp_path)
    (tmp_path / "fer").mkdir()
    os.symlink(FER2013 / "test", tmp_path / "fer" / "test")
    files = sum(len(files) for _, _, files in os.walk(FER2013 / "test"))

    # Execute
    scored = evaluate_saved_model(model_path=model, dataset=f"fer2013={tmp_path / 'fer'}", split="test")

    # Assert
    assert scored["num_examples"] == files == sum(map(sum, scored["confusion_matrix"]))
