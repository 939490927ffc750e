"""Dataset formats: every layout loads into the shared label space, and every bad input is one clear DatasetError."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from client.data.formats import (
    KINDS,
    MAX_EXAMPLES,
    DatasetError,
    FERDataset,
    load_dataset,
    parse_dataset_spec,
)
from client.data.labels import EMOTIONS


def _face(seed: int, *, height: int = 48, width: int = 48) -> np.ndarray:
    """A textured, non-blank grey image, distinct per seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 236, size=(height, width), dtype=np.uint8)


def _write(path: Path, image: np.ndarray) -> Path:
    """Writes an image with OpenCV, the encoder chosen by the file's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def _csv_row(emotion: object, pixels: np.ndarray | str, usage: str | None = "Training") -> str:
    text = pixels if isinstance(pixels, str) else " ".join(str(int(v)) for v in pixels.ravel())
    return f"{emotion},{text}" + ("" if usage is None else f",{usage}")


def _make_fer_csv(path: Path, rows: list[str], header: str = "emotion,pixels,Usage") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _make_fer_folder(root: Path) -> dict[str, np.ndarray]:
    """FER2013's image-folder layout, PNG so pixels survive exactly; returns relative path -> image."""
    files = {
        "train/angry/Training_1.png": _face(1),
        "train/happy/Training_2.png": _face(2),
        "train/happy/Training_3.png": _face(3),
        "test/sad/PublicTest_4.png": _face(4),
        "test/neutral/PrivateTest_5.png": _face(5),
        "test/neutral/PrivateTest_6.png": _face(6),
    }
    for relpath, image in files.items():
        _write(root / relpath, image)
    return files


def _make_rafdb(root: Path, *, subdir: str = "aligned", lines: list[str] | None = None) -> list[str]:
    """A RAF-DB basic folder: one train image per RAF label 1..7 and one test image; returns the label lines."""
    lines = lines or [f"train_{k:05d}.jpg {k}" for k in range(1, 8)] + ["test_0001.jpg 4"]
    for line in lines:
        name = line.split()[0]
        stem, ext = name.rsplit(".", 1)
        image_name = f"{stem}_aligned.{ext}" if subdir == "aligned" else name
        _write(root / "Image" / subdir / image_name, _face(len(image_name) + int(stem[-3:]), height=100, width=100))
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return lines


def _as_dict(dataset: FERDataset, split: str) -> dict[str, tuple[int, np.ndarray]]:
    """source -> (label, image) of one split."""
    s = dataset.splits[split]
    return {src: (int(s.labels[i]), s.images[i]) for i, src in enumerate(s.sources)}


# --- specs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "expected"), [
    ("fer2013=data/fer.csv", ("fer2013", "data/fer.csv")),
    (" RAFDB = /x/raf ", ("rafdb", "/x/raf")),
    ("folder=a=b", ("folder", "a=b")),
    ("faces=crops", ("faces", "crops")),
    ("synthetic", ("synthetic", None)),
    ("synthetic=200", ("synthetic", "200")),
])
def test_parse_dataset_spec_splits_kind_and_argument(spec, expected):
    """A spec splits at the first '=' into a lower-case kind and its path or size."""
    assert parse_dataset_spec(spec) == expected


def test_parse_dataset_spec_unknown_kind_lists_the_known_ones():
    """An unknown kind names every kind the loader knows."""
    with pytest.raises(DatasetError) as err:
        parse_dataset_spec("affectnet=/data")
    assert "affectnet" in str(err.value)
    assert all(kind in str(err.value) for kind in KINDS)


@pytest.mark.parametrize("spec", ["fer2013", "rafdb=", "folder= "])
def test_parse_dataset_spec_needs_a_path(spec):
    """File-based kinds without a path are rejected."""
    with pytest.raises(DatasetError, match="needs a path"):
        parse_dataset_spec(spec)


# --- FER2013 CSV --------------------------------------------------------------------------------------------------

def test_fer2013_csv_maps_usage_to_splits_and_keeps_pixels(tmp_path):
    """Training/PublicTest/PrivateTest rows land in train/test/private_test with their exact pixels."""
    # Prepare
    images = [_face(i) for i in range(5)]
    rows = [_csv_row(3, images[0]), _csv_row(0, images[1], "PublicTest"), _csv_row(6, images[2]),
            _csv_row(5, images[3], "PrivateTest"), _csv_row(1, images[4], "Training")]
    path = _make_fer_csv(tmp_path / "fer.csv", rows)

    # Execute
    dataset = load_dataset(f"fer2013={path}")

    # Assert
    assert (dataset.kind, dataset.format, dataset.synthetic) == ("fer2013", "fer2013-csv", False)
    assert set(dataset.splits) == {"train", "test", "private_test"}
    train = dataset.splits["train"]
    assert train.sources == ("fer.csv:2", "fer.csv:4", "fer.csv:6")
    assert train.labels.tolist() == [3, 6, 1]
    assert train.labels.dtype == np.int64 and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images, np.stack([images[0], images[2], images[4]]))
    np.testing.assert_array_equal(dataset.splits["test"].images[0], images[1])
    assert dataset.splits["private_test"].labels.tolist() == [5]
    assert dataset.native_sizes == {"48x48": 5}


def test_fer2013_csv_without_usage_is_all_training_and_found_inside_a_folder(tmp_path):
    """The Kaggle train.csv variant (emotion,pixels) inside a folder loads as one train split."""
    # Prepare
    images = [_face(i) for i in range(3)]
    _make_fer_csv(tmp_path / "train.csv", [_csv_row(i, im, None) for i, im in enumerate(images)],
                  header="emotion,pixels")

    # Execute
    dataset = load_dataset(f"fer2013={tmp_path}")

    # Assert
    assert list(dataset.splits) == ["train"]
    assert dataset.splits["train"].labels.tolist() == [0, 1, 2]


def test_fer2013_csv_resizes_to_the_requested_size(tmp_path):
    """image_size=32 gives OpenCV's area-resampled 32x32 version of each 48x48 row."""
    # Prepare
    image = _face(7)
    path = _make_fer_csv(tmp_path / "fer.csv", [_csv_row(2, image)])

    # Execute
    dataset = load_dataset(f"fer2013={path}", image_size=32)

    # Assert
    expected = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(dataset.splits["train"].images[0], expected)


_GOOD = " ".join(["7"] * 2304)


@pytest.mark.parametrize(("content", "line", "what"), [
    ("emotion,pixel,Usage\n0," + _GOOD + ",Training\n", 1, "header"),
    ("emotion,pixels,Usage,extra\n", 1, "header"),
    ("emotion,pixels,Usage\n0," + _GOOD + ",Training\n0," + _GOOD + "\n", 3, "2 fields"),
    ("emotion,pixels,Usage\n0," + " ".join(["7"] * 2303) + ",Training\n", 2, "2303 values"),
    ("emotion,pixels,Usage\n0," + " ".join(["7"] * 2305) + ",Training\n", 2, "2305 values"),
    ("emotion,pixels,Usage\n0,1.5 " + " ".join(["7"] * 2303) + ",Training\n", 2, "'1.5'"),
    ("emotion,pixels,Usage\n0,x " + " ".join(["7"] * 2303) + ",Training\n", 2, "'x'"),
    ("emotion,pixels,Usage\n0,300 " + " ".join(["7"] * 2303) + ",Training\n", 2, "300"),
    ("emotion,pixels,Usage\n0," + _GOOD + ",Training\n7," + _GOOD + ",Training\n", 3, "out of range"),
    ("emotion,pixels,Usage\n-1," + _GOOD + ",Training\n", 2, "out of range"),
    ("emotion,pixels,Usage\nhappy," + _GOOD + ",Training\n", 2, "'happy'"),
    ("emotion,pixels,Usage\n0," + _GOOD + ",Validation\n", 2, "'Validation'"),
    ("", None, "empty"),
    ("emotion,pixels,Usage\n", None, "no data rows"),
])
def test_fer2013_csv_bad_input_names_file_and_row(tmp_path, content, line, what):
    """Each malformed CSV is one DatasetError line naming the file and the offending row."""
    # Prepare
    path = tmp_path / "fer.csv"
    path.write_text(content)

    # Execute
    with pytest.raises(DatasetError) as err:
        load_dataset(f"fer2013={path}")

    # Assert
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: ")
    assert what in message
    assert "\n" not in message


def test_fer2013_csv_binary_file_is_a_dataset_error(tmp_path):
    """A file that is not text (say a zip renamed .csv) is named, not a UnicodeDecodeError."""
    path = tmp_path / "fer.csv"
    path.write_bytes(b"PK\x03\x04\xff\xfe\x00\x9c" * 50)
    with pytest.raises(DatasetError, match="not a text CSV"):
        load_dataset(f"fer2013={path}")


# --- FER2013 image folders --------------------------------------------------------------------------------------

def test_fer2013_folder_recognises_public_and_private_test_prefixes(tmp_path):
    """train/ -> train; test/PublicTest_* -> test; test/PrivateTest_* -> private_test; labels from folder names."""
    # Prepare
    files = _make_fer_folder(tmp_path)

    # Execute
    dataset = load_dataset(f"fer2013={tmp_path}")

    # Assert
    assert dataset.format == "fer2013-folder"
    assert {name: len(s) for name, s in dataset.splits.items()} == {"train": 3, "test": 1, "private_test": 2}
    loaded = {**_as_dict(dataset, "train"), **_as_dict(dataset, "test"), **_as_dict(dataset, "private_test")}
    assert set(loaded) == set(files)
    for relpath, (label, image) in loaded.items():
        assert label == EMOTIONS.index(relpath.split("/")[1])
        np.testing.assert_array_equal(image, files[relpath])


def test_fer2013_folder_without_train_is_rejected(tmp_path):
    """A folder with neither a CSV nor train/ is an unrecognised layout naming the path."""
    _write(tmp_path / "happy" / "a.png", _face(0))
    with pytest.raises(DatasetError, match="no train/ folder") as err:
        load_dataset(f"fer2013={tmp_path}")
    assert str(tmp_path) in str(err.value)


# --- RAF-DB ---------------------------------------------------------------------------------------------------------

def test_rafdb_aligned_maps_raf_labels_and_resizes(tmp_path):
    """RAF labels 1..7 (surprise, fear, disgust, happiness, sadness, anger, neutral) map to the shared space."""
    # Prepare
    _make_rafdb(tmp_path)

    # Execute
    dataset = load_dataset(f"rafdb={tmp_path}")

    # Assert
    assert dataset.format == "rafdb-aligned"
    names = ["surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"]
    assert dataset.splits["train"].labels.tolist() == [EMOTIONS.index(n) for n in names]
    assert dataset.splits["test"].labels.tolist() == [EMOTIONS.index("happy")]
    assert dataset.splits["train"].sources[0] == "Image/aligned/train_00001_aligned.jpg"
    native = cv2.imread(str(tmp_path / "Image/aligned/train_00001_aligned.jpg"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(dataset.splits["train"].images[0],
                                  cv2.resize(native, (48, 48), interpolation=cv2.INTER_AREA))
    assert dataset.native_sizes == {"100x100": 8}


def test_rafdb_listed_but_missing_images_are_skipped_and_reported(tmp_path):
    """A label line whose image is absent is counted as missing, not fatal."""
    # Prepare
    _make_rafdb(tmp_path)
    (tmp_path / "Image/aligned/train_00002_aligned.jpg").unlink()

    # Execute
    dataset = load_dataset(f"rafdb={tmp_path}")

    # Assert
    assert len(dataset.splits["train"]) == 6
    assert dataset.problems["missing"] == {"count": 1, "examples": ["Image/aligned/train_00002_aligned.jpg"]}


@pytest.mark.parametrize(("bad_line", "what"), [
    ("train_00009.jpg 8", "out of range 1..7"),
    ("train_00009.jpg 0", "out of range 1..7"),
    ("train_00009.jpg x", "'x'"),
    ("train_00009.jpg", "expected 'IMAGE LABEL'"),
    ("val_00009.jpg 3", "train_ or test_"),
])
def test_rafdb_bad_label_line_names_file_and_line(tmp_path, bad_line, what):
    """A bad line in list_patition_label.txt is a DatasetError naming file:line."""
    # Prepare
    _make_rafdb(tmp_path, lines=["train_00001.jpg 1"])
    label_file = tmp_path / "EmoLabel" / "list_patition_label.txt"
    label_file.write_text(f"train_00001.jpg 1\n{bad_line}\n")

    # Execute
    with pytest.raises(DatasetError) as err:
        load_dataset(f"rafdb={tmp_path}")

    # Assert
    assert f"{label_file}:2:" in str(err.value)
    assert what in str(err.value)


def test_rafdb_without_label_file_is_rejected(tmp_path):
    """A folder that is not RAF-DB names the label file it expected."""
    _write(tmp_path / "Image" / "aligned" / "train_00001_aligned.jpg", _face(0))
    with pytest.raises(DatasetError, match="list_patition_label.txt: not found"):
        load_dataset(f"rafdb={tmp_path}")


# --- generic labelled folders ----------------------------------------------------------------------------------

def test_faces_folder_without_split_is_all_train_with_synonyms_and_skips(tmp_path):
    """Emotion folders (synonyms too) are train; unknown class folders, non-images and broken files are reported."""
    # Prepare
    _write(tmp_path / "Happiness" / "p1.jpg", _face(1))
    _write(tmp_path / "happiness" / "ward2" / "p2.png", _face(2))  # patient sub-folders are searched too
    _write(tmp_path / "anger" / "p3.bmp", _face(3))
    _write(tmp_path / "contempt" / "p4.jpg", _face(4))
    _write(tmp_path / "contempt" / "p5.jpg", _face(5))
    (tmp_path / "anger" / "notes.txt").write_text("not an image")
    (tmp_path / "anger" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "anger" / ".DS_Store").write_bytes(b"\x00\x01")

    # Execute
    dataset = load_dataset(f"faces={tmp_path}")

    # Assert
    assert (dataset.format, list(dataset.splits)) == ("faces", ["train"])
    assert dict(zip(dataset.splits["train"].sources, dataset.splits["train"].labels.tolist())) == {
        "Happiness/p1.jpg": 3, "happiness/ward2/p2.png": 3, "anger/p3.bmp": 0}
    assert dataset.problems["unknown_folders"] == {"count": 2, "folders": {"contempt": 2}}
    assert dataset.problems["non_image"] == {"count": 1, "examples": ["anger/notes.txt"]}
    assert dataset.problems["unreadable"] == {"count": 1, "examples": ["anger/broken.jpg"]}


def test_faces_folder_with_train_test_split_keeps_both(tmp_path):
    """<root>/train/<emotion> and <root>/test/<emotion> become the train and test splits."""
    # Prepare
    _write(tmp_path / "Train" / "sad" / "a.png", _face(1))
    _write(tmp_path / "Train" / "fear" / "b.png", _face(2))
    _write(tmp_path / "test" / "surprise" / "c.png", _face(3))

    # Execute
    dataset = load_dataset(f"faces={tmp_path}")

    # Assert
    assert dataset.splits["train"].labels.tolist() == [2, 4]  # sorted by path: fear/b, sad/a
    assert dataset.splits["test"].labels.tolist() == [5]


def test_faces_non_square_images_are_centre_cropped_then_resized(tmp_path):
    """A 60x90 crop keeps its proportions: its central 60x60 square is resized to 48x48."""
    # Prepare
    image = _face(9, height=60, width=90)
    _write(tmp_path / "neutral" / "wide.png", image)

    # Execute
    dataset = load_dataset(f"faces={tmp_path}")

    # Assert
    expected = cv2.resize(image[:, 15:75], (48, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(dataset.splits["train"].images[0], expected)
    assert dataset.native_sizes == {"90x60": 1}


def test_problems_audit_finds_blanks_duplicates_conflicts_and_shared_images(tmp_path):
    """Blank, duplicated (with and without conflicting labels) and train/test-shared images are counted exactly."""
    # Prepare
    x, y = _face(1), _face(2)
    grey = np.full((48, 48), 128, np.uint8)
    grey[0, :3] = (126, 129, 131)  # JPEG-like ringing: still blank
    for relpath, image in {
        "train/happy/x1.png": x, "train/sad/x2.png": x,                    # conflicting duplicate
        "train/happy/y1.png": y, "train/happy/y2.png": y, "train/happy/y3.png": y,  # agreeing, 2 extra copies
        "train/angry/black.png": np.zeros((48, 48), np.uint8),
        "train/neutral/grey.png": grey,
        "test/happy/y4.png": y,                                              # shared with train
        "test/fear/z.png": _face(3),
    }.items():
        _write(tmp_path / relpath, image)

    # Execute
    problems = load_dataset(f"faces={tmp_path}").problems

    # Assert
    assert problems["blank"]["count"] == 2
    assert (problems["blank"]["all_black"], problems["blank"]["flat"]) == (1, 1)
    assert problems["blank"]["by_split"] == {"train": 2, "test": 0}
    train_dups = problems["duplicates"]["by_split"]["train"]
    assert (train_dups["groups"], train_dups["extra_copies"], train_dups["conflicting_groups"]) == (2, 3, 1)
    assert train_dups["conflicting_examples"] == [["train/happy/x1.png", "train/sad/x2.png"]]
    assert problems["duplicates"]["by_split"]["test"]["groups"] == 0
    shared = problems["shared_across_splits"]["by_pair"]["train/test"]
    assert (shared["groups"], shared["images"]) == (1, {"train": 3, "test": 1})
    assert shared["examples"] == [["train/happy/y1.png", "test/happy/y4.png"]]


def test_problem_examples_are_capped(tmp_path):
    """Fifteen unreadable files are all counted but at most MAX_EXAMPLES are listed."""
    # Prepare
    _write(tmp_path / "happy" / "ok.png", _face(0))
    for i in range(15):
        (tmp_path / "happy" / f"bad{i:02d}.jpg").write_bytes(b"nope")

    # Execute
    problems = load_dataset(f"faces={tmp_path}").problems

    # Assert
    assert problems["unreadable"]["count"] == 15
    assert problems["unreadable"]["examples"] == [f"happy/bad{i:02d}.jpg" for i in range(MAX_EXAMPLES)]


@pytest.mark.parametrize(("make", "what"), [
    (lambda root: None, "no such file or folder"),
    (lambda root: _write(root / "x.png", _face(0)), "no emotion folders"),
    (lambda root: _write(root / "contempt" / "x.png", _face(0)), "no emotion folders"),
    (lambda root: (root / "happy").mkdir(parents=True), "no image files"),
    (lambda root: _write(root / "happy" / "bad.jpg", _face(0)).write_bytes(b"junk"), "no readable images"),
    (lambda root: _write(root / "test" / "happy" / "x.png", _face(0)), "no train/ folder"),
])
def test_faces_folder_bad_layout_names_the_path(tmp_path, make, what):
    """Missing path, unknown layout, empty or wholly unreadable data: one DatasetError naming the folder."""
    # Prepare
    root = tmp_path / "site"
    make(root)

    # Execute
    with pytest.raises(DatasetError) as err:
        load_dataset(f"faces={root}")

    # Assert
    assert str(root) in str(err.value)
    assert what in str(err.value)


def test_folder_path_that_is_a_file_is_rejected(tmp_path):
    """folder=FILE says a folder was expected."""
    path = _write(tmp_path / "x.png", _face(0))
    with pytest.raises(DatasetError, match="is a file, expected a folder"):
        load_dataset(f"folder={path}")


# --- synthetic ------------------------------------------------------------------------------------------------

def test_synthetic_sizes_determinism_and_separate_test_stream():
    """synthetic=N gives N train and N//5 test faces, reproducible from the seed, test unlike train."""
    # Execute
    first = load_dataset("synthetic=60", seed=3)
    again = load_dataset("synthetic=60", seed=3)
    other = load_dataset("synthetic=60", seed=4)

    # Assert
    assert (first.kind, first.format, first.root, first.synthetic) == ("synthetic", "synthetic", None, True)
    assert {name: len(s) for name, s in first.splits.items()} == {"train": 60, "test": 12}
    assert first.splits["train"].sources[:2] == ("synthetic:0", "synthetic:1")
    np.testing.assert_array_equal(first.splits["train"].images, again.splits["train"].images)
    np.testing.assert_array_equal(first.splits["test"].labels, again.splits["test"].labels)
    assert not np.array_equal(first.splits["train"].images, other.splits["train"].images)
    assert not np.array_equal(first.splits["test"].images, first.splits["train"].images[:12])
    assert first.problems["shared_across_splits"]["groups"] == 0


def test_synthetic_default_size_and_image_size():
    """Plain 'synthetic' is 3500 + 700 faces; image_size sets their side."""
    dataset = load_dataset("synthetic", image_size=32)
    assert {name: s.images.shape for name, s in dataset.splits.items()} == {
        "train": (3500, 32, 32), "test": (700, 32, 32)}


@pytest.mark.parametrize("spec", ["synthetic=abc", "synthetic=4", "synthetic=-10"])
def test_synthetic_bad_size_is_rejected(spec):
    """N must be an integer of at least 5 so the test split is not empty."""
    with pytest.raises(DatasetError, match="N must be an integer >= 5"):
        load_dataset(spec)


# --- photos that need face detection (folder kind, RAF-DB original) ---------------------------------------------

def _astronaut_gray() -> np.ndarray:
    """A real photograph of a face shipped with scikit-image (512x512)."""
    from skimage import data  # declared in the test extras: a missing one must fail, not skip
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)


@pytest.mark.slow  # the preprocessing module imports torch: seconds on a busy 2-core machine
def test_folder_kind_detects_faces_and_skips_photos_without_one(tmp_path):
    """A photo with a face becomes its aligned crop; a photo without one is skipped and reported as no_face."""
    # Prepare
    from client.data import preprocess
    photo = _astronaut_gray()
    _write(tmp_path / "happy" / "astronaut.png", photo)
    _write(tmp_path / "sad" / "wall.png", cv2.GaussianBlur(_face(0, height=300, width=400), (31, 31), 0))

    # Execute
    dataset = load_dataset(f"folder={tmp_path}")

    # Assert
    train = dataset.splits["train"]
    assert (dataset.format, train.sources, train.labels.tolist()) == ("folder", ("happy/astronaut.png",), [3])
    np.testing.assert_array_equal(train.images[0], preprocess.FacePreprocessor(size=48).process(photo))
    assert dataset.problems["no_face"] == {"count": 1, "examples": ["sad/wall.png"]}
    assert dataset.native_sizes == {"512x512": 1, "400x300": 1}


@pytest.mark.slow  # the preprocessing module imports torch: seconds on a busy 2-core machine
def test_rafdb_original_photos_go_through_face_detection(tmp_path):
    """Without Image/aligned, RAF-DB's original photos are detected and cropped to the requested size."""
    # Prepare
    _write(tmp_path / "Image" / "original" / "train_00001.jpg", _astronaut_gray())
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 4\n")

    # Execute
    dataset = load_dataset(f"rafdb={tmp_path}", image_size=64)

    # Assert
    assert dataset.format == "rafdb-original"
    assert dataset.splits["train"].images.shape == (1, 64, 64)
    assert dataset.splits["train"].labels.tolist() == [EMOTIONS.index("happy")]
