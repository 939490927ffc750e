"""Small builds of every registered model, so tests that sweep the registry run in seconds."""

from __future__ import annotations

# Every registered model must have one (tests/test_models.py checks).
SMALL_CFG = {
    "cnn_am": {"width": 0.25},
    "cnn_am_deep": {"width": 0.25},
    "dmsnet_heavy": {"width": 0.125},
    "dmsnet_light": {"width": 0.125},
    "dmsnet_iot": {"width": 0.5},
    "fer_vgg": {"base": 8},
}
