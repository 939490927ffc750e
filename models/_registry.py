"""The model registry: names → factory functions, plus what the papers say about each model.

timm-style: each architecture file decorates one factory per variant with `@register_model(info=...)`; callers only
ever use `create_model(name, ...)`, so a new variant needs no change anywhere else.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.layers import batch_norm, group_norm
from models.recipe import TrainingRecipe

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_INFOS: dict[str, ModelInfo] = {}
# Arguments `create_model` itself supplies; everything else a factory accepts is a model option (cfg).
_FRAMEWORK_ARGS = ("num_classes", "in_chans", "norm_layer")


@dataclass(frozen=True)
class ModelInfo:
    """What a model is and what its paper reports, for `fer-sim models` and for reports.

    Attributes:
        paper: the source paper (title, venue).
        summary: one line on the architecture as built here.
        input_size: (channels, height, width) of the input the architecture was designed for.
        paper_params: parameter count the paper reports, if any.
        paper_flops: FLOPs the paper reports, if any, as the paper labels them (FER papers count multiply-adds).
        paper_fps: frames per second the paper reports, if any.
        deviation: one line on where this implementation differs from the paper's figures or text, and why.
        dp_engine: the per-sample-gradient engine DP-SGD training uses for this model (an Opacus
            `grad_sample_mode`, or "bk" for privacy.bookkeeping): the fastest one that
            `benchmarks/bench_models.py` measured for it (results in docs/benchmarks.md).
        default_cfg: the options (cfg) the default build uses.
        recipe: how the model trains by default (optimiser, schedule, augmentation, ...; models/recipe.py).
    """

    paper: str
    summary: str
    input_size: tuple[int, int, int]
    paper_params: float | None = None
    paper_flops: float | None = None
    paper_fps: float | None = None
    deviation: str = ""
    dp_engine: str = "hooks"
    default_cfg: dict[str, Any] = field(default_factory=dict)
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)


def register_model(fn: Callable[..., nn.Module] | None = None, /, *, info: ModelInfo | None = None):
    """Registers a factory under its function name; use as `@register_model` or `@register_model(info=...)`.

    The factory must take keyword-only `num_classes`, `in_chans` and `norm_layer`, and its other keyword
    arguments are the model's options. Registering a name twice raises ValueError, so two files cannot silently
    shadow each other.
    """

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        if name in _FACTORIES:
            raise ValueError(f"model {name!r} is already registered")
        params = inspect.signature(factory).parameters
        missing = [arg for arg in _FRAMEWORK_ARGS if arg not in params]
        if missing:
            raise TypeError(f"factory {name!r} must accept keyword arguments {missing}")
        _FACTORIES[name] = factory
        base = info or ModelInfo(paper="", summary=factory.__doc__ or "", input_size=(1, 48, 48))
        cfg = {
            key: p.default for key, p in params.items() if key not in _FRAMEWORK_ARGS and p.default is not p.empty
        }
        _INFOS[name] = replace(base, default_cfg=cfg)
        return factory

    return decorator(fn) if fn is not None else decorator


def register_variant(name: str, *, base: Callable[..., nn.Module], info: ModelInfo,
                     **fixed: Any) -> Callable[..., nn.Module]:
    """Registers `name` as the registered factory `base` with the options `fixed` (timm's `model_args`).

    The variant has `base`'s layers and parameter names, so weights move between the two, and its own name, so a
    federation, which builds a model's default options, can train it (`--model NAME`, `--init-model NAME@DATA`).
    Its options are `base`'s minus the fixed ones, with `base`'s defaults.
    """
    params = inspect.signature(base).parameters
    unknown = sorted(set(fixed) - set(params))
    if unknown or set(fixed) & set(_FRAMEWORK_ARGS):
        raise TypeError(f"variant {name!r}: {base.__name__} has no option {', '.join(map(repr, unknown))}"
                        if unknown else f"variant {name!r} cannot fix {', '.join(_FRAMEWORK_ARGS)}")

    def factory(**kwargs: Any) -> nn.Module:
        return base(**fixed, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{base.__name__} with {', '.join(f'{k}={v!r}' for k, v in fixed.items())}."
    factory.__signature__ = inspect.Signature([p for key, p in params.items() if key not in fixed])
    return register_model(factory, info=info)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_FACTORIES)


def _factory(name: str) -> Callable[..., nn.Module]:
    try:
        return _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def model_options(name: str) -> dict[str, Any]:
    """The options (cfg keys) `name` accepts, with their defaults."""
    return dict(_INFOS[_factory(name).__name__].default_cfg)


def model_recipe(name: str) -> TrainingRecipe:
    """The training recipe `name` was measured with (what RunSettings's "recipe" defaults resolve to)."""
    return _INFOS[_factory(name).__name__].recipe


def model_info(name: str) -> dict[str, Any]:
    """What `name` is: input size it was built for, paper reference, the paper's params/FLOPs/FPS where known."""
    info = asdict(_INFOS[_factory(name).__name__])
    info["name"] = name
    return info


def create_model(name: str, *, num_classes: int = 7, in_chans: int = 1, dp: bool = False, **cfg: Any) -> nn.Module:
    """Builds a registered model.

    Args:
        name: a name from `list_models()`.
        num_classes: number of output logits.
        in_chans: input channels (1 for the standardized grayscale faces this project uses).
        dp: build for DP-SGD: GroupNorm instead of BatchNorm, since BatchNorm mixes the samples of a batch and
            Opacus rejects it. A `norm_layer` in cfg overrides either choice.
        **cfg: the model's options (see `model_info(name)["default_cfg"]`), e.g. `width=0.25` for a small build.

    Raises:
        ValueError: unknown name (the message lists the known ones), or an option value the model cannot use.
        TypeError: an option the model does not have (the message names it and lists the valid ones).
    """
    factory = _factory(name)
    options = model_options(name)
    unknown = sorted(set(cfg) - set(options) - {"norm_layer"})
    if unknown:
        raise TypeError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; options: {', '.join(options)}")
    if num_classes < 1 or in_chans < 1:
        raise ValueError(f"num_classes and in_chans must be >= 1, got {num_classes} and {in_chans}")
    cfg.setdefault("norm_layer", group_norm if dp else batch_norm)
    return factory(num_classes=num_classes, in_chans=in_chans, **cfg)


def load_state_dict_file(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Loads a state_dict saved with `torch.save` from a local file the user already has into `model`.

    Only tensors are unpickled (`weights_only=True`), so a file from an untrusted source cannot run code. A
    checkpoint that wraps the weights under "state_dict" or "model", and the key prefixes DataParallel
    ("module.") and Opacus's GradSampleModule ("_module.") add, are accepted as they are, because those are the
    forms in which users actually have weights.

    Args:
        model: the model to fill (its structure must match the file's).
        path: the .pt/.pth file.
        strict: require every key to match; False loads the overlap (e.g. backbone weights into a full model),
            but still rejects a file that matches nothing and any tensor whose shape differs.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no state_dict, or its keys/shapes do not fit `model` (the message names them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state_dict file at {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a weights file" to the user
        raise ValueError(f"{path} is not a torch state_dict file ({type(err).__name__}: {err})") from None
    if isinstance(loaded, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    state = {_strip_wrapper_prefix(key): value for key, value in loaded.items()}
    expected = model.state_dict()
    mismatched = [
        f"{key} {tuple(value.shape)} vs {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    ]
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_few(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {_few(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if not strict and len(unexpected) == len(state):
        problems.append(f"no key matches the model (file keys: {_few(unexpected)})")
    if problems:
        raise ValueError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict)


def _strip_wrapper_prefix(key: str) -> str:
    for prefix in ("module.", "_module."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
