"""Tasks: the seam between data and the task-agnostic trainer, bundles and CLI (see ``base.py``).

Adding a task means writing one module with a class that follows :class:`~tansuo.tasks.base.Task` and
adding it to ``TASKS``. Planned: ``translate``, ``recommend``.
"""

from __future__ import annotations

from tansuo.tasks.base import Batch, Task
from tansuo.tasks.classify import ClassifyTask
from tansuo.tasks.image import ImageTask
from tansuo.tasks.lm import LMTask
from tansuo.tasks.mlm import MLMTask

TASKS: dict[str, type[Task]] = {
    LMTask.name: LMTask,
    ImageTask.name: ImageTask,
    ClassifyTask.name: ClassifyTask,
    MLMTask.name: MLMTask,
}

__all__ = ["TASKS", "Batch", "ClassifyTask", "ImageTask", "LMTask", "MLMTask", "Task"]
