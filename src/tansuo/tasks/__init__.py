"""Tasks: the seam between data and the task-agnostic trainer, bundles and CLI (see ``base.py``).

Adding a task means writing one module with a class that follows :class:`~tansuo.tasks.base.Task`
(subclassing :class:`~tansuo.tasks.base.TaskBase` for the defaults), decorated with
:func:`~tansuo.tasks.base.register_task`. The built-in ones are imported here; a module outside the package
is named in ``TANSUO_PLUGINS`` (see :mod:`tansuo.plugins`).
"""

from __future__ import annotations

from tansuo.tasks import (  # noqa: F401  (registers the tasks)
    classify,
    detect,
    image,
    lm,
    mlm,
    recommend,
    segment,
    translate,
)
from tansuo.tasks.base import (
    EXAMPLES,
    GENERATE,
    ONNX,
    TASKS,
    Batch,
    Task,
    TaskBase,
    get_task,
    register_task,
)
from tansuo.tasks.classify import ClassifyTask
from tansuo.tasks.image import ImageTask
from tansuo.tasks.lm import LMTask
from tansuo.tasks.mlm import MLMTask

__all__ = [
    "EXAMPLES",
    "GENERATE",
    "ONNX",
    "TASKS",
    "Batch",
    "ClassifyTask",
    "ImageTask",
    "LMTask",
    "MLMTask",
    "Task",
    "TaskBase",
    "get_task",
    "register_task",
]
