"""The technique registry, torchao style: a config type names its technique.

A technique is an in-place model transform with a config dataclass (``Int8DynamicConfig``,
``StructuredPruneConfig``, ...). Registering one ties three things together::

    register_technique(MyConfig, step="mystep", apply=my_apply, restore=my_restore)

- ``apply(model, config, *, filter_fn=None, **kwargs) -> record``: changes ``model`` in place and returns a
  JSON-able dict that says what it did (:func:`apply_technique` adds ``"step"`` and appends it to
  ``model.compression``, which bundles store in config.json);
- ``restore(model, record)``: on a freshly built model, rebuilds the structure the record describes (shrunk
  layers, int8 layers, ...) so that the compressed weights load strictly; ``None`` when the technique changes
  weights only (nothing to rebuild).

:func:`restore_structure` replays a bundle's records through the ``restore`` of each record's ``step``. A
step that is known but has no technique to apply from Python (``distill``: a training procedure, see
:mod:`tansuo.compress.distill`) is declared with :func:`register_step`.

Lookups that miss load the plugins (:mod:`tansuo.plugins`) once, so a technique defined in a plugin module
is found both when applied and when its bundles are loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from tansuo.errors import BundleError, CompressionError
from tansuo.plugins import load_plugins

Record = dict[str, Any]
Apply = Callable[..., Record]
Restore = Callable[[nn.Module, Record], None]
FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class Technique:
    """A registered technique: its config type, the ``step`` its records carry, and how to apply and
    restore it."""

    config_type: type
    step: str
    apply: Apply
    restore: Restore | None = None


_TECHNIQUES: dict[type, Technique] = {}
_STEPS: dict[str, Restore | None] = {}  # every step a record may carry -> its restore (None: nothing)


def register_step(step: str, restore: Restore | None = None) -> None:
    """Declare a record step that bundles may carry and how :func:`restore_structure` replays it (``None``:
    nothing to rebuild). Several techniques may share a step if they share its ``restore``.

    Raises:
        ValueError: The step is registered already with another ``restore``.
    """
    if not step or not isinstance(step, str):
        raise ValueError(f"a technique's step must be a non-empty string, got {step!r}")
    if step in _STEPS and _STEPS[step] is not restore:
        raise ValueError(
            f"compression step {step!r} is registered already with another restore function; techniques "
            "that share a step must share its restore (it replays every record of that step)"
        )
    _STEPS[step] = restore


def register_technique(
    config_type: type, *, step: str, apply: Apply, restore: Restore | None = None
) -> Technique:
    """Register the technique that ``config_type`` instances select; returns it.

    Raises:
        ValueError: ``config_type`` is registered already, or ``step`` is, with another ``restore``.
    """
    if not isinstance(config_type, type):
        raise ValueError(f"register_technique takes a config class, got {config_type!r}")
    if config_type in _TECHNIQUES:
        raise ValueError(
            f"{config_type.__name__} is registered already (step {_TECHNIQUES[config_type].step!r})"
        )
    register_step(step, restore)
    technique = Technique(config_type, step, apply, restore)
    _TECHNIQUES[config_type] = technique
    return technique


def technique(config_type: type, *, step: str, restore: Restore | None = None) -> Callable[[Apply], Apply]:
    """Decorator form of :func:`register_technique` on the ``apply`` function."""

    def decorate(apply: Apply) -> Apply:
        register_technique(config_type, step=step, apply=apply, restore=restore)
        return apply

    return decorate


def unregister_technique(config_type: type) -> None:
    """Remove a technique (and its step, when no other technique uses it); for tests and plugins."""
    removed = _TECHNIQUES.pop(config_type, None)
    if removed is not None and not any(t.step == removed.step for t in _TECHNIQUES.values()):
        _STEPS.pop(removed.step, None)


def _find(config_type: type) -> Technique | None:
    for cls in config_type.__mro__:
        if cls in _TECHNIQUES:
            return _TECHNIQUES[cls]
    return None


def get_technique(config: Any) -> Technique:
    """The technique for ``type(config)`` (or its nearest registered base class).

    Raises:
        CompressionError: No technique is registered for it (after loading the plugins).
    """
    found = _find(type(config))
    if found is None:
        load_plugins()
        found = _find(type(config))
    if found is None:
        known = ", ".join(sorted(c.__name__ for c in _TECHNIQUES))
        raise CompressionError(
            f"no compression technique is registered for {type(config).__name__}; registered configs: "
            f"{known} (register one with tansuo.compress.registry.register_technique)"
        )
    return found


def list_techniques() -> list[Technique]:
    """The registered techniques, by step then config name."""
    return sorted(_TECHNIQUES.values(), key=lambda t: (t.step, t.config_type.__name__))


def list_steps() -> list[str]:
    """Every step a bundle's compression records may carry."""
    return sorted(_STEPS)


def apply_technique(
    model: nn.Module,
    config: Any,
    *,
    filter_fn: FilterFn | None = None,
    step: str | None = None,
    **kwargs: Any,
) -> Record:
    """Apply the technique ``type(config)`` selects to ``model`` in place, append its record to
    ``model.compression`` and return that record (the same dict object).

    ``step``, when given, is the step the caller expects (``quantize_`` passes ``"quantize"``), so a config
    of another kind is refused rather than applied by the wrong entry point.
    """
    found = get_technique(config)
    if step is not None and found.step != step:
        raise CompressionError(
            f"{type(config).__name__} is a {found.step!r} technique, not a {step!r} one; apply it with "
            f"{found.step}_ (or apply_technique)"
        )
    record = found.apply(model, config, filter_fn=filter_fn, **kwargs)
    if not isinstance(record, dict):
        raise TypeError(f"the apply function of {type(config).__name__} must return its record (a dict)")
    record = {"step": found.step, **{k: v for k, v in record.items() if k != "step"}}
    model.compression = [*(getattr(model, "compression", None) or []), record]
    return record


def restore_structure(model: nn.Module, records: list[Record]) -> None:
    """Replay compression records (from a bundle's config.json) on a freshly built model, in order, through
    the ``restore`` of each record's step, and attach them as ``model.compression``.

    Raises:
        BundleError: A record's step is not registered (a newer tansuo, or a missing plugin, wrote it).
    """
    for record in records:
        step = record.get("step")
        if step not in _STEPS:
            load_plugins()
        if step not in _STEPS:
            raise BundleError(
                f"unknown compression step {step!r} in the bundle; a newer tansuo wrote it (or a plugin that "
                f"is not loaded: name it in TANSUO_PLUGINS). Known steps: {', '.join(list_steps())}"
            )
        restore = _STEPS[step]
        if restore is not None:
            restore(model, record)
    model.compression = list(records)
