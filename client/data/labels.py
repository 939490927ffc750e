"""The one label space every dataset is mapped into.

FER2013's order is the de-facto standard in the FER literature, so every other source (RAF-DB, a hospital's
folders) is mapped onto it rather than the other way round.
"""

from __future__ import annotations

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(EMOTIONS)

# Folder names seen in the wild for the same seven expressions; matched case-insensitively.
_SYNONYMS = {
    "angry": "angry", "anger": "angry",
    "disgust": "disgust", "disgusted": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "neutral": "neutral",
}

# RAF-DB basic: 1 surprise, 2 fear, 3 disgust, 4 happiness, 5 sadness, 6 anger, 7 neutral.
RAFDB_TO_LABEL: dict[int, int] = {1: 5, 2: 2, 3: 1, 4: 3, 5: 4, 6: 0, 7: 6}


def label_of(name: str) -> int | None:
    """Returns the label index for an emotion name or folder name, or None if it is not one of the seven."""
    canonical = _SYNONYMS.get(name.strip().lower())
    return None if canonical is None else EMOTIONS.index(canonical)
