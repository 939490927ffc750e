"""FER architectures and their registry. Imports torch only.

    >>> from models import create_model, list_models
    >>> model = create_model("dmsnet_iot", dp=True)   # GroupNorm build for DP-SGD
    >>> model(torch.zeros(8, 1, 48, 48)).shape        # (8, 7) logits

Every model takes (B, in_chans, 48, 48) standardized grayscale faces and returns (B, num_classes) logits, and has
`forward_features` / `forward_head`.
"""

from models import cnn_am as _cnn_am  # noqa: F401  (registers cnn_am)
from models import dmsnet as _dmsnet  # noqa: F401  (registers dmsnet_*)
from models import fer_vgg as _fer_vgg  # noqa: F401  (registers fer_vgg)
from models._registry import (
    ModelInfo,
    create_model,
    list_models,
    load_state_dict_file,
    model_info,
    model_options,
    model_recipe,
    register_model,
    register_variant,
)
from models.complexity import complexity, count_macs, count_params
from models.finetune import DP_TRAIN_MODES, ParameterCounts, dp_trainable_names, freeze_for_dp
from models.recipe import TrainingRecipe

__all__ = [
    "DP_TRAIN_MODES",
    "ParameterCounts",
    "dp_trainable_names",
    "freeze_for_dp",
    "ModelInfo",
    "TrainingRecipe",
    "complexity",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "load_state_dict_file",
    "model_info",
    "model_options",
    "model_recipe",
    "register_model",
    "register_variant",
]
