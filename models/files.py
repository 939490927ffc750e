"""Reading a saved model: the weights file and the JSON card beside it (models/card.py).

Lives with the models, not with the run directory that writes it (server/rundir.py), because both sides of the
federation read model files: the coordinator (resume, evaluate) and each site (`fer-client predict`, `watch`,
`export`), and a site's code must not import the coordinator's.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from models.card import ModelCard
from models.reference import SAFETENSORS_FORMAT, resolve_model_file


def load_model(path: Path | str) -> tuple[dict, ModelCard]:
    """Reads a model saved by `server.rundir.RunDirectory.save_model`, or a shipped reference by name
    (`fer_vgg@fer2013`, models/reference.py): (state_dict, the card from the .json beside it).

    The weights load with `weights_only=True` (a run's .pt) or from safetensors (a reference): a model file is data,
    never code to unpickle.

    Raises:
        FileNotFoundError: the .pt file or its .json sidecar is missing.
        UnknownReferenceError: a MODEL@DATASET name that no shipped reference has (a ValueError).
        SchemaVersionError: the card was written under another schema version.
        ValueError: the card is not one (no model name, ...), or the file does not match the sha256 recorded beside
            it (truncated or replaced).
    """
    import torch

    model_path = resolve_model_file(path)
    meta_path = model_path.with_suffix(".json")
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {model_path} does not exist")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} (the model's name and config) is missing beside {model_path}")
    card = ModelCard.from_json(json.loads(meta_path.read_text()), source=str(meta_path))
    payload = model_path.read_bytes()
    if card.sha256 and hashlib.sha256(payload).hexdigest() != card.sha256:
        raise ValueError(f"{model_path} does not match the sha256 in {meta_path.name}")
    if card.format == SAFETENSORS_FORMAT:
        from safetensors.torch import load as load_safetensors

        return dict(load_safetensors(payload)), card
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return dict(state), card


def build_model(card: ModelCard):
    """The registered architecture `card` names, with the options it was trained with (no weights): the GroupNorm
    build unless its cfg says `dp: false`. Options the architecture does not have are ignored."""
    from models._registry import create_model, model_options

    options = model_options(card.name)
    extra = {key: value for key, value in card.cfg.items() if key in options}
    return create_model(card.name, dp=bool(card.cfg.get("dp", True)), **extra)
