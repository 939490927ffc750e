"""`init-model`: start a federation (or its centralised baseline) from trained weights instead of a seeded random
model: a shipped reference (`fer_vgg@fer2013`, public pretraining on FER2013) or a run's model.pt.

Round 0 starts from these weights; public pretraining (server/public_pretrain.py, `public-fraction`) then trains
on top of them when both are set: the reference supplies general features, the public slice adapts them to the
study's faces, and both are public, so neither costs epsilon (privacy.json names them).

Checked once, where the run starts (`fer-sim run`, `fer-server start`), so a mistake is one line before any node is
contacted; read again by the ServerApp when it builds round 0's model (`server_app.initial_weights`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from client import wire
from client.config import ConfigError, RunSettings
from models import create_model
from models.card import ModelCard
from models.reference import is_reference_name


def with_init_model(settings: RunSettings, *, model_given: bool) -> RunSettings:
    """`settings` with `init-model` checked and made absolute (the ServerApp may run in another folder).

    Args:
        settings: the run's settings.
        model_given: whether the user named a model; if not, the init model's architecture becomes the run's.

    Raises:
        ConfigError: the model cannot be read, or does not fit the run (one line naming `init-model`).
    """
    if not settings.init_model:
        return settings
    spec = settings.init_model
    if not is_reference_name(spec) or Path(spec).exists():
        spec = str(Path(spec).resolve())
    settings = settings.replace(init_model=spec)
    state, card = _read(settings)  # read (and its sha256 checked) once for every check below
    if not model_given and card.name != settings.model:
        settings = settings.replace(model=card.name)
    _fit(settings, state, card)
    warning = _shared_data_warning(settings, trained_on=card.dataset)
    if warning:
        # Loud, once, where the run starts; report.md repeats it (privacy.json's public_data.warning).
        sys.stderr.write(f"WARNING: {warning}\n")
    return settings


def init_model_dataset(settings: RunSettings) -> str | None:
    """The dataset the init-model's card says it was trained on (a reference's "fer2013", a run's `dataset`)."""
    return _read(settings)[1].dataset


def public_start_warning(settings: RunSettings) -> str | None:
    """One line when the init-model was trained on a dataset the run's sites hold too, else None.

    Reference weights trained on FER2013's training split have seen every face of a FER2013 study's sites: as a
    start for such a study they are not public pretraining, and a private fine-tuning from them overstates what a
    private federation achieves (issue 13). Compared by dataset kind (fer2013, rafdb, ...); synthetic faces are
    left out (each seed draws other faces).
    """
    if not settings.init_model:
        return None
    return _shared_data_warning(settings, trained_on=init_model_dataset(settings))


def _shared_data_warning(settings: RunSettings, *, trained_on: str | None) -> str | None:
    """public_start_warning, given the dataset the init-model's card names."""
    shared = sorted((_kinds(trained_on or "") & _kinds(settings.dataset)) - {"synthetic"})
    if not shared:
        return None
    return (f"init-model {settings.init_model} was trained on {', '.join(shared)}, which this run's sites hold too: "
            "it has seen their faces, so it is not a fair public start (use it when sites hold other data)")


def _kinds(datasets: str) -> set[str]:
    """The dataset kinds of a `dataset` string ("fer2013=/d@6;rafdb=/r" -> {"fer2013", "rafdb"}; "fer2013" alone
    is a kind too, as a reference's card writes it)."""
    return {entry.strip().partition("=")[0].strip() for entry in datasets.split(";") if entry.strip()}


def init_model_weights(settings: RunSettings) -> list[np.ndarray]:
    """The weights `init-model` names, as the run's model (the GroupNorm build every federation trains) holds them.

    Raises:
        ConfigError: unreadable, another architecture or options, or weights that do not fit.
    """
    return _fit(settings, *_read(settings))


def _fit(settings: RunSettings, state: dict, card: ModelCard) -> list[np.ndarray]:
    """init_model_weights, given the model already read."""
    if card.name != settings.model:
        raise ConfigError(f"init-model {settings.init_model} is a {card.name}; this run trains {settings.model} "
                          f"(set model = {card.name!r}, or leave --model out)")
    options = {key: value for key, value in card.cfg.items() if key != "dp"}
    if options or not card.cfg.get("dp", True):
        build = "the BatchNorm build" if not card.cfg.get("dp", True) else f"options {options}"
        raise ConfigError(f"init-model {settings.init_model} was trained with {build}; a federation trains the "
                          f"default GroupNorm build of {card.name}")
    model = create_model(settings.model, dp=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"init-model {settings.init_model}: its weights do not fit {settings.model} "
                          f"({str(err).splitlines()[0]})") from None
    return wire.get_weights(model)


def _read(settings: RunSettings) -> tuple[dict, ModelCard]:
    from models.files import load_model

    try:
        return load_model(settings.init_model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"init-model: {str(err).splitlines()[0]}") from None
