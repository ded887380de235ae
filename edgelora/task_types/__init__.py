"""The task types: `model.task` picks one. A new task is one new module here plus a line in TASK_TYPES."""
from __future__ import annotations

from ..configtools import ConfigError
from .base import Scores, TaskType
from .causal_lm import CausalLM
from .classification import Classification

TASK_TYPES: dict[str, TaskType] = {t.name: t for t in (Classification(), CausalLM())}


def task_type(name: str) -> TaskType:
    if name not in TASK_TYPES:
        raise ConfigError(f"model.task: unknown task {name!r}; this edgelora knows {sorted(TASK_TYPES)}")
    return TASK_TYPES[name]


__all__ = ["TASK_TYPES", "Scores", "TaskType", "task_type"]
