"""Plugins: modules outside the package that register tasks, model families, techniques and endpoints.

A task, a model family or an endpoint defined in a user's own module joins tansuo when that module is
imported. Every registry lookup that misses calls :func:`load_plugins` once, which imports:

- the modules named in the ``TANSUO_PLUGINS`` environment variable (comma-separated, importable from
  ``sys.path``; subprocesses such as measurement inherit it), and
- the entry points of the group ``tansuo.plugins`` of installed distributions
  (``[project.entry-points."tansuo.plugins"] mytask = "mypackage.mytask"``).

A plugin that fails to import is an error that names it; it is never skipped silently.
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import entry_points

from tansuo.errors import TansuoError

log = logging.getLogger(__name__)

ENV = "TANSUO_PLUGINS"
GROUP = "tansuo.plugins"
_loaded: set[str] = set()


def plugin_names() -> list[str]:
    """The plugin modules named by ``TANSUO_PLUGINS`` and by the ``tansuo.plugins`` entry points."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    names += [ep.value.split(":")[0] for ep in entry_points(group=GROUP)]
    return names


def load_plugins() -> list[str]:
    """Import every plugin not imported yet; returns the names imported by this call."""
    new = []
    for name in plugin_names():
        if name in _loaded:
            continue
        _loaded.add(name)
        try:
            importlib.import_module(name)
        except ImportError as e:
            _loaded.discard(name)
            raise TansuoError(
                f"plugin {name!r} (from {ENV} or the {GROUP!r} entry points) does not import: {e}; "
                "fix the module name or put its folder on PYTHONPATH"
            ) from e
        log.debug("loaded plugin %s", name)
        new.append(name)
    return new
