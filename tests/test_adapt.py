"""Personal adaptation (issue 14 item 5): `fer-client adapt` fits a personal head on a carer's corrections, on the
device, apart from the federated weights; shown on a simulated patient whose expressions are systematically shifted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from client.cli.main import main
from client.cli.predict_cmd import predict
from client.cli.watch_cmd import watch
from client.data.labels import EMOTIONS
from client.data.preprocess import standardize
from client.data.synthetic import Patient, make_synthetic
from client.inference.adapt import (PERSONAL_DIR, AdaptError, Corrections, adapt, load_personal, personal_paths,
                                    with_personal)
from client.inference.media import iter_video, read_image
from client.inference.model import load_classifier, softmax
from client.inference.pipeline import FramePipeline
from models import create_model
from tests.adapt_builds import (CORRECTION_SEED, OTHERS_TEST_SEED, PATIENT, PATIENT_TEST_SEED, accuracy,
                                train_synthetic_base, write_corrections)
from tests.inference_builds import paste, pick_faces, save_run_model, write_video

# Corrections a carer gives: 10 per expression (make_synthetic balances the labels).
CORRECTIONS = 70


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(argv: list[str], capture) -> tuple[int, str, str]:
    """`fer-client ARGV` in-process: (exit code, stdout, stderr) as `capture` (capsys, or capfd for native output)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    out, err = capture.readouterr()
    return exit_info.value.code, out, err


def _make_untrained_base(root: Path, *, seed: int = 0) -> Path:
    """A small untrained cnn_am saved as a run's model.pt (enough where only the plumbing is under test)."""
    torch.manual_seed(seed)
    return save_run_model(root, create_model("cnn_am", dp=True, width=0.25), name="cnn_am",
                          cfg={"dp": True, "width": 0.25})


def _make_personal(base: Path, state_dir: Path, name: str = "bed-3") -> Path:
    """A personal head fitted on 14 synthetic faces (in memory) for `base`; returns its weights file."""
    images, labels = make_synthetic(14, seed=4)
    adapt(base=base, corrections=Corrections(faces=images, labels=labels), name=name, state_dir=state_dir)
    return personal_paths(state_dir, name)[0]


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory) -> Path:
    """A small cnn_am trained on 2,100 ordinary synthetic faces for 5 epochs (10-30 s on the 2-core machine)."""
    return train_synthetic_base(tmp_path_factory.mktemp("federated"))


@pytest.fixture(scope="module")
def untrained_base(tmp_path_factory) -> Path:
    return _make_untrained_base(tmp_path_factory.mktemp("untrained"))


@pytest.mark.slow
def test_adapt_raises_the_patients_accuracy_and_leaves_everyone_elses_model_unchanged(trained_base, tmp_path, capsys):
    """70 corrections lift the shifted patient's held-out accuracy by at least 20 points; everyone else is served by
    the federated model, whose file and predictions adapt leaves exactly as they were (a drop of 0 points)."""
    # Prepare
    corrections = write_corrections(tmp_path / "corrections",
                                    *make_synthetic(CORRECTIONS, seed=CORRECTION_SEED, patient=PATIENT))
    held_out = make_synthetic(420, seed=PATIENT_TEST_SEED, patient=PATIENT)
    others = make_synthetic(700, seed=OTHERS_TEST_SEED)
    state = tmp_path / "state"
    sha_before = _sha256(trained_base)
    federated = load_classifier(trained_base, runtime="torch")
    others_logits_before = federated.logits(standardize(others[0]))
    patient_before = accuracy(federated, *held_out)
    # Execute
    code, out, err = _run(["adapt", corrections, "--name", "bed-3", "--model", trained_base, "--state-dir", state],
                          capsys)
    # Assert
    assert code == 0, err
    card = json.loads(out)
    assert (card["name"], card["base_sha256"], card["corrections"]) == ("bed-3", sha_before, CORRECTIONS)
    assert card["per_class"] == {name: CORRECTIONS // len(EMOTIONS) for name in EMOTIONS}
    assert card["classes"] == list(EMOTIONS) and card["layers"] == ["classifier.weight", "classifier.bias"]
    personal = with_personal(load_classifier(trained_base, runtime="torch"), name="bed-3", state_dir=state)
    patient_after = accuracy(personal, *held_out)
    federated_after = load_classifier(trained_base, runtime="torch")
    others_logits_after = federated_after.logits(standardize(others[0]))
    others_before = float((others_logits_before.argmax(1) == others[1]).mean())
    others_after = float((others_logits_after.argmax(1) == others[1]).mean())
    print(f"\npatient held-out: federated {patient_before:.3f} -> personal {patient_after:.3f}; everyone else "
          f"(federated head): {others_before:.3f} -> {others_after:.3f}; everyone else if given this patient's head "
          f"(never done): {accuracy(personal, *others):.3f}")
    assert patient_after >= patient_before + 0.20
    assert _sha256(trained_base) == sha_before
    assert np.array_equal(others_logits_after, others_logits_before) and others_after == others_before
    assert {p.name for p in state.rglob("*")} == {PERSONAL_DIR, "bed-3.pt", "bed-3.json"}


@pytest.mark.slow
def test_a_personal_head_for_a_patient_who_needs_none_costs_them_at_most_2_points(trained_base, tmp_path):
    """The control: the same identity without the shift, whom the federated model already reads well, loses at most
    2 points of held-out accuracy with a head fitted on 70 of their corrections (the pull to the federated head)."""
    # Prepare
    control = Patient(identity_seed=PATIENT.identity_seed)
    faces, labels = make_synthetic(CORRECTIONS, seed=CORRECTION_SEED, patient=control)
    held_out = make_synthetic(420, seed=PATIENT_TEST_SEED, patient=control)
    federated = load_classifier(trained_base, runtime="torch")
    # Execute
    adapt(base=trained_base, corrections=Corrections(faces=faces, labels=labels), name="bed-4", state_dir=tmp_path)
    personal = with_personal(federated, name="bed-4", state_dir=tmp_path)
    # Assert
    assert accuracy(personal, *held_out) >= accuracy(federated, *held_out) - 0.02


@pytest.mark.slow
def test_the_federated_model_misreads_the_simulated_patient_as_their_look_alike(trained_base):
    """The synthetic patient is systematically shifted: the federated model calls their neutral faces sad (and the
    other swapped pairs likewise) more often than it names the true expression, while a patient drawn without the
    shift is read about as well as the crowd."""
    # Prepare
    federated = load_classifier(trained_base, runtime="torch")
    shifted_images, labels = make_synthetic(420, seed=PATIENT_TEST_SEED, patient=PATIENT)
    plain_images, plain_labels = make_synthetic(420, seed=PATIENT_TEST_SEED,
                                                patient=Patient(identity_seed=PATIENT.identity_seed))
    # Execute
    predicted = federated.logits(standardize(shifted_images)).argmax(1)
    # Assert
    assert np.array_equal(labels, plain_labels)
    for true, shown in PATIENT.looks_like.items():
        rows = labels == EMOTIONS.index(true)
        assert (predicted[rows] == EMOTIONS.index(shown)).mean() > (predicted[rows] == EMOTIONS.index(true)).mean()
    assert accuracy(federated, plain_images, plain_labels) > accuracy(federated, shifted_images, labels) + 0.2


def test_patient_shift_draws_one_identity_and_refuses_unknown_expressions():
    """A Patient keeps the crowd's labels, changes the faces, and names an unknown expression in its error."""
    crowd, crowd_labels = make_synthetic(21, seed=2)
    patient, labels = make_synthetic(21, seed=2, patient=PATIENT)
    assert np.array_equal(labels, crowd_labels) and not np.array_equal(patient, crowd)
    assert list(PATIENT.shown(np.arange(7))) == [EMOTIONS.index(PATIENT.looks_like.get(e, e)) for e in EMOTIONS]
    assert np.array_equal(make_synthetic(21, seed=2, patient=None)[0], crowd)
    with pytest.raises(ValueError, match="'grumpy'"):
        Patient(identity_seed=1, looks_like={"sad": "grumpy"})


def test_the_clientapp_never_opens_the_personal_folder(untrained_base, tmp_path, superlink_identity):
    """A training round through the real ClientApp, with a personal head in the node's state directory, opens and
    lists nothing under STATE_DIR/personal (Python's audit hook sees every open and listdir); the same hook does
    see load_personal read it, so the check can fail."""
    from client.client_app import make_client_app
    from server.server_app import initial_weights
    from tests.test_client_app import SETTINGS, _delta, _make_context, _make_message

    # Prepare
    personal_dir = _make_personal(untrained_base, tmp_path).parent
    before = {p: p.read_bytes() for p in personal_dir.iterdir()}
    message = _make_message("train", initial_weights(SETTINGS), {"server-round": 1, "proximal-mu": 0.0})
    # Execute
    with _opened_under(personal_dir) as during_round:
        reply = make_client_app()(message, _make_context(tmp_path))
    with _opened_under(personal_dir) as during_load:
        load_personal(tmp_path, "bed-3")
    # Assert
    assert _delta(reply).size > 0
    assert during_round == []
    assert len(during_load) >= 2  # the card and the weights: the hook would have seen the round read them
    assert {p: p.read_bytes() for p in personal_dir.iterdir()} == before


# (folder, paths seen) while a test watches a folder; Python's audit hooks cannot be removed, so one is installed
# once and does nothing while this is empty.
_WATCHING: list[tuple[str, list[str]]] = []


def _audit(event: str, args: tuple) -> None:
    if _WATCHING and event in ("open", "os.listdir", "os.scandir") and args and \
            isinstance(args[0], (str, bytes, os.PathLike)):
        folder, seen = _WATCHING[-1]
        path = os.path.realpath(os.fsdecode(args[0]))
        if path == folder or path.startswith(folder + os.sep):
            seen.append(path)


@contextlib.contextmanager
def _opened_under(folder: Path):
    """Yields the list of paths under `folder` this process opens or lists inside the `with` block."""
    if not getattr(_audit, "installed", False):
        sys.addaudithook(_audit)
        _audit.installed = True
    seen: list[str] = []
    _WATCHING.append((os.path.realpath(folder), seen))
    try:
        yield seen
    finally:
        _WATCHING.pop()


def _corrupt_png(folder: Path) -> Path:
    (folder / "sad").mkdir(parents=True)
    (folder / "sad" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder / "sad" / "0001.png"


def _unknown_folder(folder: Path) -> Path:
    write_corrections(folder, *make_synthetic(7, seed=1))
    (folder / "grumpy").mkdir()
    return folder / "grumpy"


def _not_an_image(folder: Path) -> Path:
    write_corrections(folder, *make_synthetic(7, seed=1))
    (folder / "happy" / "notes.txt").write_text("bed 3 smiled at lunch")
    return folder / "happy" / "notes.txt"


def _no_face(folder: Path) -> Path:
    (folder / "fear").mkdir(parents=True)
    cv2.imwrite(str(folder / "fear" / "wall.png"), np.full((120, 160), 128, np.uint8))
    return folder / "fear" / "wall.png"


def _empty(folder: Path) -> Path:
    (folder / "sad").mkdir(parents=True)  # an emotion folder, but no face in any
    return folder


def _missing(folder: Path) -> Path:
    return folder


@pytest.mark.parametrize("make, says", [
    (_missing, "no such folder"), (_empty, "no labelled images"), (_unknown_folder, "not an emotion folder"),
    (_corrupt_png, "not a readable image"), (_not_an_image, "not an image file"), (_no_face, "no face found"),
])
def test_bad_corrections_are_one_line_naming_them_and_nothing_is_written(untrained_base, tmp_path, capfd, make,
                                                                         says):
    """Each bad input: exit 1, one stderr line naming the folder or file (OpenCV's own warnings included, hence
    capfd), no personal folder."""
    culprit = make(tmp_path / "corrections")
    code, out, err = _run(["adapt", tmp_path / "corrections", "--name", "bed-3", "--model", untrained_base,
                           "--state-dir", tmp_path / "state"], capfd)
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1 and str(culprit) in err and says in err
    assert not (tmp_path / "state" / PERSONAL_DIR).exists()


@pytest.mark.parametrize("name", ["../bed-3", ".hidden", "a/b", ""])
def test_a_name_that_is_not_a_plain_file_name_is_refused(untrained_base, tmp_path, capsys, name):
    """--name becomes a file name: a path or a hidden name is one line, exit 1."""
    write_corrections(tmp_path / "c", *make_synthetic(7, seed=1))
    code, _, err = _run(["adapt", tmp_path / "c", "--name", name, "--model", untrained_base, "--state-dir",
                         tmp_path / "state"], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "--name" in err
    assert not (tmp_path / "state").exists()


def test_predict_and_watch_use_the_personal_head_only_when_asked(untrained_base, tmp_path, capsys):
    """predict/watch --personal NAME give the personal head's probabilities; without it, the federated model's."""
    # Prepare
    _make_personal(untrained_base, tmp_path)
    face = pick_faces(("happy",))["happy"]
    cv2.imwrite(str(tmp_path / "bed.png"), paste(face, 0))
    write_video(tmp_path / "bed.avi", [("happy", 3)], {"happy": face})
    personal = with_personal(load_classifier(untrained_base, runtime="torch"), name="bed-3", state_dir=tmp_path)
    expected = FramePipeline(classifier=personal).process(read_image(tmp_path / "bed.png"))[0].probabilities
    expected_video = [FramePipeline(classifier=personal).process(frame.image)[0].probabilities
                      for frame in iter_video(tmp_path / "bed.avi")]
    # Execute
    predict([tmp_path / "bed.png"], model=untrained_base, state_dir=tmp_path)
    predict([tmp_path / "bed.png"], model=untrained_base, state_dir=tmp_path, personal="bed-3")
    plain, adapted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    watch(video=tmp_path / "bed.avi", model=untrained_base, state_dir=tmp_path, personal="bed-3", half_life=0.0)
    watched = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # Assert
    assert [adapted["probabilities"][e] for e in EMOTIONS] == pytest.approx(expected, abs=1e-4)
    assert plain["probabilities"] != adapted["probabilities"]
    assert len(watched) == 3
    for line, probabilities in zip(watched, expected_video):
        assert [line["probabilities"][e] for e in EMOTIONS] == pytest.approx(probabilities, abs=1e-4)


def test_a_personal_head_is_refused_on_another_model_a_changed_file_or_onnx(untrained_base, tmp_path, capsys):
    """A head fitted on one federated model is refused, in one line, on the next one (its embedding differs), when
    its weights no longer match its card, under --runtime onnx, and when it does not exist."""
    # Prepare
    weights_file = _make_personal(untrained_base, tmp_path)
    newer = _make_untrained_base(tmp_path / "round-2", seed=1)
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((64, 64), np.uint8))
    # Execute / Assert
    with pytest.raises(AdaptError, match="run fer-client adapt again"):
        with_personal(load_classifier(newer, runtime="torch"), name="bed-3", state_dir=tmp_path)
    with pytest.raises(AdaptError, match="--runtime torch"):
        with_personal(type("Onnx", (), {"runtime": "onnx"})(), name="bed-3", state_dir=tmp_path)
    code, _, err = _run(["predict", tmp_path / "x.png", "--model", untrained_base, "--state-dir", tmp_path,
                         "--personal", "bed-4"], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "--personal bed-4" in err
    payload = bytearray(weights_file.read_bytes())
    payload[-20] ^= 0xFF
    weights_file.write_bytes(bytes(payload))
    with pytest.raises(AdaptError, match="sha256"):
        load_personal(tmp_path, "bed-3")


def test_watch_save_uncertain_crops_sorted_by_a_carer_are_corrections(untrained_base, tmp_path, capsys):
    """The loop of the paper: watch keeps uncertain crops (only when asked), a carer moves them into an emotion
    folder, and adapt fits on exactly those crops; unsorted crops are counted, not used."""
    # Prepare
    faces = pick_faces(("sad",))
    write_video(tmp_path / "ward.avi", [("sad", 21)], faces)
    watch(video=tmp_path / "ward.avi", model=untrained_base, save_uncertain=tmp_path / "uncertain",
          uncertain_below=1.01)
    crops = sorted((tmp_path / "uncertain").iterdir())
    (tmp_path / "uncertain" / "sad").mkdir()
    for crop in crops[:-1]:
        shutil.move(crop, tmp_path / "uncertain" / "sad" / crop.name)
    capsys.readouterr()
    # Execute
    code, out, err = _run(["adapt", tmp_path / "uncertain", "--name", "bed-3", "--model", untrained_base,
                           "--state-dir", tmp_path / "state"], capsys)
    # Assert
    assert len(crops) == 3  # frames at 0, 1 and 2 s of a 10 FPS video
    assert code == 0, err
    assert json.loads(out)["per_class"] == {"sad": 2}
    assert "1 unlabelled images" in err
    state, card = load_personal(tmp_path / "state", "bed-3")
    assert card.corrections == 2 and set(state) == {"classifier.weight", "classifier.bias"}


def test_personal_files_are_private_to_the_device_user(untrained_base, tmp_path):
    """The personal folder is 0700 and its files 0600: they are fitted on a patient's faces."""
    weights_file = _make_personal(untrained_base, tmp_path)
    assert weights_file.parent.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in weights_file.parent.iterdir()} == {0o600}


def test_softmax_of_the_personal_head_is_the_adapted_layer_on_frozen_features(untrained_base, tmp_path):
    """The personal classifier equals the federated backbone followed by the saved layer (nothing else changes)."""
    _make_personal(untrained_base, tmp_path)
    state, _ = load_personal(tmp_path, "bed-3")
    base = load_classifier(untrained_base, runtime="torch")
    personal = with_personal(base, name="bed-3", state_dir=tmp_path)
    x = standardize(make_synthetic(5, seed=9)[0])
    with torch.no_grad():
        hidden = base.model.forward_head(base.model.forward_features(torch.from_numpy(x)), pre_logits=True)
        expected = (hidden @ state["classifier.weight"].T + state["classifier.bias"]).numpy()
    assert np.allclose(personal.logits(x), expected, atol=1e-5)
    assert not np.allclose(softmax(base.logits(x)), softmax(personal.logits(x)), atol=1e-3)
