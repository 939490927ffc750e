"""`inspect_dataset` and `fer-sim inspect`: counts, problems, JSON output, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from client.data.formats import BLANK_RANGE, DatasetError, load_dataset
from client.data.inspect import inspect_dataset
from client.data.labels import EMOTIONS

REPO = Path(__file__).resolve().parents[1]
FER2013 = REPO.parent / "shared" / "data" / "fer2013"
FER_SIM = Path(sys.executable).with_name("fer-sim")
# A tiny FER2013 folder copy with planted duplicates, overlap and blanks (tests/fixtures/make_fer2013_mini.py).
MINI = REPO / "tests" / "fixtures" / "fer2013_mini"


def _face(seed: int) -> np.ndarray:
    """A textured, non-blank 48x48 grey image, distinct per seed."""
    return np.random.default_rng(seed).integers(20, 236, size=(48, 48), dtype=np.uint8)


def _make_site(root: Path) -> Path:
    """A small split folder: 3 happy + 1 sad train faces (one duplicated into test), 1 blank, 1 broken file."""
    files = {"train/happy/a.png": _face(1), "train/happy/b.png": _face(2), "train/happy/c.png": _face(3),
             "train/sad/d.png": np.zeros((48, 48), np.uint8), "test/happy/e.png": _face(1),
             "test/angry/f.png": _face(4)}
    for relpath, image in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / relpath), image)
    (root / "train" / "sad" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _fer_sim(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Runs the installed `fer-sim` as a user would."""
    return subprocess.run([str(FER_SIM), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_inspect_dataset_reports_counts_sizes_and_problems(tmp_path):
    """Per-split, per-class counts, native sizes and each planted problem appear in the report."""
    # Prepare
    _make_site(tmp_path)

    # Execute
    report = inspect_dataset(f"faces={tmp_path}")

    # Assert
    assert (report["kind"], report["format"], report["synthetic"]) == ("faces", "faces", False)
    assert report["splits"]["train"] == {"total": 4, "per_class": {**dict.fromkeys(EMOTIONS, 0), "happy": 3,
                                                                   "sad": 1}}
    assert report["splits"]["test"]["per_class"] == {**dict.fromkeys(EMOTIONS, 0), "happy": 1, "angry": 1}
    assert (report["total"], report["native_sizes"], report["image_size"]) == (6, {"48x48": 6}, 48)
    problems = report["problems"]
    assert problems["unreadable"]["examples"] == ["train/sad/broken.jpg"]
    assert problems["blank"]["examples"] == ["train/sad/d.png"]
    assert problems["shared_across_splits"]["by_pair"]["train/test"]["examples"] == [
        ["train/happy/a.png", "test/happy/e.png"]]
    assert json.loads(json.dumps(report)) == report


def test_inspect_synthetic_says_synthetic():
    """A synthetic dataset is labelled as such in the report."""
    report = inspect_dataset("synthetic=20")
    assert report["synthetic"] is True
    assert (report["splits"]["train"]["total"], report["splits"]["test"]["total"]) == (20, 4)


def test_inspect_dataset_propagates_bad_input_as_dataset_error(tmp_path):
    """The library raises DatasetError; only the CLI turns it into an exit code."""
    with pytest.raises(DatasetError, match="no such file or folder"):
        inspect_dataset(f"faces={tmp_path / 'absent'}")


def test_cli_json_is_one_object_matching_the_library(tmp_path):
    """`fer-sim inspect --json` prints exactly the report inspect_dataset returns."""
    # Prepare
    _make_site(tmp_path)

    # Execute
    result = _fer_sim("inspect", "--dataset", f"faces={tmp_path}", "--json")

    # Assert
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == inspect_dataset(f"faces={tmp_path}")


def _table_rows(text: str) -> dict[str, list[str]]:
    """The rows of every table `fer-sim inspect` prints, keyed by their first cell (rich's box drawing)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            if cells[0]:
                rows[cells[0]] = cells[1:]
    return rows


def test_cli_tables_show_counts_and_problems(tmp_path):
    """The human report's class table holds every split's counts and the problems table each problem's count."""
    # Prepare
    _make_site(tmp_path)

    # Execute
    result = _fer_sim("inspect", "--dataset", f"faces={tmp_path}")

    # Assert
    assert result.returncode == 0, result.stderr
    rows = _table_rows(result.stdout)
    assert {name: rows[name] for name in (*EMOTIONS, "total")} == {
        **{name: ["0", "0"] for name in EMOTIONS}, "happy": ["3", "1"], "sad": ["1", "0"], "angry": ["0", "1"],
        "total": ["4", "2"]}
    assert "48x48 (6)" in result.stdout
    assert rows["unreadable files (skipped)"][0] == "1"
    assert rows["blank images (kept)"][0] == "1"
    assert rows["test images also in train"][0] == "1"


def test_cli_on_clean_synthetic_data_reports_zero_problems():
    """Clean synthetic data: the counts of synthetic=20 and an explicit "No problems found.", no problems table."""
    # Execute
    result = _fer_sim("inspect", "--dataset", "synthetic=20")

    # Assert
    assert (result.returncode, result.stderr) == (0, "")
    rows = _table_rows(result.stdout)
    assert rows["total"] == ["20", "4"]
    assert sum(int(rows[name][0]) for name in EMOTIONS) == 20
    assert "SYNTHETIC data" in result.stdout
    assert result.stdout.rstrip().endswith("No problems found.")
    assert "problem" not in {line.split()[0] for line in result.stdout.splitlines() if line.startswith("┃")}


def _bad_csv(root: Path) -> Path:
    path = root / "fer.csv"
    path.write_text("emotion,pixels,Usage\n3," + " ".join(["1"] * 2304) + ",Training\n3,1 2 3,Training\n")
    return path


def _bad_rafdb(root: Path) -> Path:
    (root / "Image" / "aligned").mkdir(parents=True)
    (root / "EmoLabel").mkdir()
    (root / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 9\n")
    return root


@pytest.mark.parametrize(("kind", "make", "expected"), [
    ("fer2013", lambda root: root / "missing", "{path}: no such file or folder"),
    ("fer2013", _bad_csv, "{path}:3: pixel row has 3 values"),
    ("rafdb", _bad_rafdb, "{path}/EmoLabel/list_patition_label.txt:1: label '9' is out of range 1..7"),
    ("faces", lambda root: root, "{path}: no emotion folders"),
])
def test_cli_bad_input_is_one_line_naming_the_file(tmp_path, kind, make, expected):
    """A user's data mistake exits 1 with one stderr line naming the file (and row), never a traceback."""
    # Prepare
    path = make(tmp_path)

    # Execute
    result = _fer_sim("inspect", "--dataset", f"{kind}={path}", "--json")

    # Assert
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fer-sim: error: " + expected.format(path=path))
    assert "Traceback" not in result.stderr


def test_cli_unknown_kind_lists_known_kinds():
    """An unknown kind is a one-line error listing the kinds that exist."""
    result = _fer_sim("inspect", "--dataset", "affectnet=/data")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "known kinds: fer2013, rafdb, folder, faces, synthetic" in result.stderr


# --- real FER2013 -------------------------------------------------------------------------------------------------

# From ../shared/data/fer2013/README.md.
_README_COUNTS = {
    "train": {"angry": 3995, "disgust": 436, "fear": 4097, "happy": 7215, "sad": 4830, "surprise": 3171,
              "neutral": 4965},
    "test": {"angry": 467, "disgust": 56, "fear": 496, "happy": 895, "sad": 653, "surprise": 415, "neutral": 607},
}


def _byte_duplicates(root: Path) -> tuple[dict, dict]:
    """An independent pass: per split, groups of byte-identical files with their emotion folders."""
    groups: dict[str, dict[str, list[str]]] = {"train": defaultdict(list), "test": defaultdict(list)}
    for split, by_hash in groups.items():
        for dirpath, _, filenames in os.walk(root / split):
            for name in filenames:
                digest = hashlib.sha1(Path(dirpath, name).read_bytes()).hexdigest()
                by_hash[digest].append(Path(dirpath).name)
    within = {}
    for split, by_hash in groups.items():
        repeated = [emotions for emotions in by_hash.values() if len(emotions) > 1]
        within[split] = (len(repeated), sum(len(e) - 1 for e in repeated), sum(len(set(e)) > 1 for e in repeated))
    common = groups["train"].keys() & groups["test"].keys()
    shared = {"groups": len(common), "images": {s: sum(len(groups[s][d]) for d in common) for s in groups}}
    return within, shared


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not FER2013.is_dir(), reason="../shared/data/fer2013 is not present")
def test_real_fer2013_counts_and_known_problems():
    """The README's per-class counts, and the blanks, duplicates and train/test overlap an independent pass finds."""
    # Execute
    result = _fer_sim("inspect", "--dataset", "fer2013=../shared/data/fer2013", "--json")
    report = json.loads(result.stdout)
    within, shared = _byte_duplicates(FER2013)

    # Assert
    assert report["format"] == "fer2013-folder" and report["synthetic"] is False
    for split, per_class in _README_COUNTS.items():
        assert report["splits"][split] == {"total": sum(per_class.values()), "per_class": per_class}
    assert (report["splits"]["train"]["total"], report["splits"]["test"]["total"]) == (28709, 3589)
    assert report["native_sizes"] == {"48x48": 32298}
    problems = report["problems"]
    # Byte-identical JPEGs are exactly the pixel-identical images here (measured), so the file hashes must agree.
    for split, (groups, extra, conflicting) in within.items():
        found = problems["duplicates"]["by_split"][split]
        assert (found["groups"], found["extra_copies"], found["conflicting_groups"]) == (groups, extra, conflicting)
    assert within == {"train": (1035, 1236, 39), "test": (26, 26, 1)}
    pair = problems["shared_across_splits"]["by_pair"]["train/test"]
    assert {"groups": pair["groups"], "images": pair["images"]} == shared
    assert shared == {"groups": 270, "images": {"train": 351, "test": 280}}
    # 11 all-black train images, 1 all-black test image, 1 flat-grey train image (measured with a full decode).
    blank = problems["blank"]
    assert (blank["all_black"], blank["flat"], blank["by_split"]) == (12, 1, {"train": 12, "test": 1})
    for source in blank["examples"]:
        pixels = np.asarray(Image.open(FER2013 / source).convert("L"))
        assert int(pixels.max()) - int(pixels.min()) <= BLANK_RANGE
    for name in ("unreadable", "non_image", "missing", "no_face", "unknown_folders"):
        assert problems[name]["count"] == 0


# --- committed FER2013-layout JPEG fixture -------------------------------------------------------------------------

def test_fer2013_folder_loader_decodes_the_committed_jpegs():
    """Every fixture JPEG is loaded as OpenCV decodes it, labelled by its emotion folder, in its split."""
    # Execute
    dataset = load_dataset(f"fer2013={MINI}")

    # Assert
    assert (dataset.kind, dataset.format, dataset.synthetic) == ("fer2013", "fer2013-folder", False)
    for split in ("train", "test"):
        loaded = dataset.splits[split]
        files = sorted(p.relative_to(MINI).as_posix() for p in (MINI / split).rglob("*.jpg"))
        assert sorted(loaded.sources) == files
        for source, image, label in zip(loaded.sources, loaded.images, loaded.labels):
            np.testing.assert_array_equal(image, cv2.imread(str(MINI / source), cv2.IMREAD_GRAYSCALE))
            assert EMOTIONS[label] == source.split("/")[1]


def test_fer2013_fixture_audit_finds_every_planted_problem():
    """Duplicates (one group with conflicting labels per split), the train/test overlap and the blanks planted in
    the fixture are found, and agree with an independent pass over the files' bytes."""
    # Prepare
    within, shared = _byte_duplicates(MINI)

    # Execute
    report = inspect_dataset(f"fer2013={MINI}")

    # Assert: the independent pass, and what make_fer2013_mini.py planted
    assert within == {"train": (2, 3, 1), "test": (1, 1, 1)}
    assert shared == {"groups": 2, "images": {"train": 2, "test": 3}}
    problems = report["problems"]
    for split, (groups, extra, conflicting) in within.items():
        found = problems["duplicates"]["by_split"][split]
        assert (found["groups"], found["extra_copies"], found["conflicting_groups"]) == (groups, extra, conflicting)
    assert problems["duplicates"]["by_split"]["train"]["conflicting_examples"] == [
        ["train/fear/Training_90003.jpg", "train/sad/Training_00017.jpg"]]
    pair = problems["shared_across_splits"]["by_pair"]["train/test"]
    assert {"groups": pair["groups"], "images": pair["images"]} == shared
    assert pair["examples"] == [["train/angry/Training_00001.jpg", "test/angry/PublicTest_90004.jpg"],
                                ["train/surprise/Training_00021.jpg", "test/surprise/PublicTest_90006.jpg"]]
    blank = problems["blank"]
    assert (blank["all_black"], blank["flat"], blank["by_split"]) == (1, 1, {"train": 1, "test": 1})
    assert blank["examples"] == ["train/neutral/Training_00028.jpg", "test/surprise/PublicTest_00040.jpg"]
    for name in ("unreadable", "non_image", "missing", "no_face", "unknown_folders"):
        assert problems[name]["count"] == 0


def test_cli_prints_the_fixtures_counts_and_problems():
    """`fer-sim inspect` prints the fixture's per-class counts and each planted problem's image count."""
    # Execute
    result = _fer_sim("inspect", "--dataset", f"fer2013={MINI}")

    # Assert
    assert result.returncode == 0, result.stderr
    rows = _table_rows(result.stdout)
    files = {split: {name: len(list((MINI / split / name).glob("*.jpg"))) for name in EMOTIONS}
             for split in ("train", "test")}
    for name in EMOTIONS:
        assert rows[name] == [str(files["train"][name]), str(files["test"][name])]
    assert rows["total"] == [str(sum(files["train"].values())), str(sum(files["test"].values()))]
    assert rows["blank images (kept)"][0] == "2"
    assert rows["duplicates in train (kept)"][0] == "3"
    assert rows["duplicates in test (kept)"][0] == "1"
    assert rows["test images also in train"][0] == "3"
