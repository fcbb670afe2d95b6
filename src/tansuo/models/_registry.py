"""The model registry: preset functions by name, after timm's ``register_model`` / ``create_model``.

A preset is a function ``name(**overrides) -> ModelClass`` whose return annotation names a model class with
class attributes that declare what the family is and can do:

- ``family``: a short string (``"bert"``); a bundle can initialise a model of the same family;
- ``config_class``: its config dataclass. Every field may be overridden by keyword, so
  ``create_model(name, **dataclasses.asdict(model.config))`` rebuilds any model's architecture;
- ``prunable``: what structured pruning may remove (``frozenset({"heads", "ffn"})``, or empty);
- ``onnx_inputs``: the names of the inputs of its ONNX export (``("input_ids", "attention_mask")`` for a
  text encoder, ``("pixels",)`` for an image model), or ``()`` when it does not export.

A name the registry does not know loads the plugins (:mod:`tansuo.plugins`) once before it is refused.

The small ``check_*`` helpers are shared by the config dataclasses' ``__post_init__``.
"""

import dataclasses
import difflib
import fnmatch
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tansuo.errors import RecipeError
from tansuo.plugins import load_plugins

_MODELS: dict[str, Callable[..., nn.Module]] = {}


@dataclass(frozen=True)
class ModelEntry:
    """A registered preset: its name, the function that builds it, and the model class's declarations."""

    name: str
    fn: Callable[..., nn.Module]
    model_class: type
    family: str
    config_class: type
    prunable: frozenset[str]
    onnx_inputs: tuple[str, ...]

    @property
    def fields(self) -> list[str]:
        """The config fields a recipe may override."""
        return [f.name for f in dataclasses.fields(self.config_class)]


def _model_class(fn: Callable[..., nn.Module]) -> type:
    cls = typing.get_type_hints(fn).get("return")
    if not (
        isinstance(cls, type)
        and isinstance(getattr(cls, "family", None), str)
        and dataclasses.is_dataclass(getattr(cls, "config_class", None))
        and isinstance(getattr(cls, "prunable", None), frozenset)
        and isinstance(getattr(cls, "onnx_inputs", None), tuple)
    ):
        raise TypeError(
            f"preset {fn.__name__} must be annotated to return a model class with class attributes "
            "`family` (str), `config_class` (a dataclass), `prunable` (a frozenset of what structured "
            "pruning may remove, e.g. frozenset({'heads', 'ffn'}), or frozenset()) and `onnx_inputs` (a "
            "tuple of ONNX input names, or () when the family does not export)"
        )
    return cls


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a preset under its function name. Use as a decorator.

    Args:
        fn: ``name(**overrides) -> ModelClass``, annotated with its return type.

    Returns:
        ``fn`` unchanged.

    Raises:
        ValueError: If another function already holds the name.
    """
    _model_class(fn)
    name = fn.__name__
    previous = _MODELS.get(name)
    if (
        previous is not None
        and previous.__qualname__ + previous.__module__ != fn.__qualname__ + fn.__module__
    ):
        raise ValueError(f"model name {name!r} is already registered by {previous.__module__}")
    _MODELS[name] = fn
    return fn


def _lookup(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        load_plugins()
    if name in _MODELS:
        return _MODELS[name]
    by_closeness = sorted(_MODELS, key=lambda other: -difflib.SequenceMatcher(None, name, other).ratio())
    hint = f" Did you mean {by_closeness[0]!r}?" if by_closeness else ""
    raise ValueError(f"unknown model {name!r}.{hint} Available models: {', '.join(by_closeness)}")


def get_model_entry(name: str) -> ModelEntry:
    """The registered preset ``name`` with its family's declarations.

    Raises:
        ValueError: For an unknown name (the message suggests the closest and lists the others).
    """
    fn = _lookup(name)
    cls = _model_class(fn)
    return ModelEntry(name, fn, cls, cls.family, cls.config_class, cls.prunable, cls.onnx_inputs)


def check_overrides(name: str, overrides: dict[str, Any], where: str = "model.overrides") -> None:
    """Refuses overrides that are not fields of the model's config or have the wrong type, naming the
    field, what was given and the closest field; run before any data is prepared.

    Raises:
        RecipeError: An unknown model, an unknown field or a value of the wrong type.
    """
    try:
        entry = get_model_entry(name)
    except ValueError as e:
        raise RecipeError(f"invalid recipe:\n  model.name: {e}") from None
    hints = typing.get_type_hints(entry.config_class)
    for key, value in overrides.items():
        if key not in hints:
            close = difflib.get_close_matches(key, entry.fields, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(
                f"invalid recipe:\n  {where}.{key}: not a field of {entry.config_class.__name__} (model "
                f"{name!r}).{hint} Fields: {', '.join(entry.fields)}"
            )
        expected = hints[key]
        if expected is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(expected, type):
            ok = isinstance(value, expected)
        else:  # a union or generic annotation: left to the config's own checks
            ok = True
        if not ok:
            raise RecipeError(
                f"invalid recipe:\n  {where}.{key}: must be {getattr(expected, '__name__', expected)}, "
                f"got {value!r} ({type(value).__name__})"
            )


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered models, sorted, optionally filtered by an fnmatch pattern like ``"vit_*"``."""
    return sorted(name for name in _MODELS if pattern is None or fnmatch.fnmatchcase(name, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered model, with any field of its family's config overridden.

    Args:
        name: A name from :func:`list_models`.
        **overrides: Config fields, e.g. ``vocab_size=65, dropout=0.1``.

    Returns:
        The model, with ``model.model_name = name``.

    Raises:
        ValueError: For an unknown name or override field, or an invalid config.
    """
    fn = _lookup(name)
    config_class = _model_class(fn).config_class
    allowed = [field.name for field in dataclasses.fields(config_class)]
    for key in overrides:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{key!r} is not a field of {config_class.__name__} (model {name!r}).{hint} "
                f"Allowed fields: {', '.join(allowed)}"
            )
    model = fn(**overrides)
    model.model_name = name
    return model


def model_info(name: str) -> dict[str, Any]:
    """Family, parameter count and default config of a registered model, built on the meta device (no memory).

    Returns:
        ``{"name", "family", "num_params", "config"}``, the config as a plain dict.
    """
    fn = _lookup(name)
    with torch.device("meta"):
        model = fn()
    return {
        "name": name,
        "family": _model_class(fn).family,
        "num_params": model.num_params(),
        "config": dataclasses.asdict(model.config),
    }


# ---- helpers for the configs' __post_init__ ----------------------------------------------------------------


def check_types(config: Any) -> None:
    """Checks that every field holds its annotated primitive type (int, float, bool or str)."""
    hints = typing.get_type_hints(type(config))  # resolves string annotations (``from __future__``)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        expected = hints[field.name]
        if expected is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise ValueError(
                f"{field.name} must be {expected.__name__}, got {value!r} ({type(value).__name__})"
            )


def check_positive(config: Any, names: Iterable[str], minimum: int = 1) -> None:
    """Checks that each named field is at least ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")


def check_choice(config: Any, name: str, choices: Iterable[str]) -> None:
    """Checks that a string field is one of ``choices``."""
    choices = tuple(choices)
    if getattr(config, name) not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(map(repr, choices))}, got {getattr(config, name)!r}"
        )


def check_dropout(config: Any, name: str = "dropout") -> None:
    """Checks that a probability field is in [0, 1)."""
    value = getattr(config, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
