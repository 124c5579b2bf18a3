"""Benchmark tasks: a registry of loaders that all return ``list[Task]``.

>>> tasks = load_task("gsm8k", data_dir="../shared/data", split="test", limit=8, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .arithmetic import load_arithmetic
from .base import Task, TaskError
from .bbh import load_bbh
from .csqa import load_csqa
from .gsm8k import load_gsm8k
from .humaneval import load_humaneval
from .math_tasks import load_math, load_math500
from .mbpp import load_mbpp
from .mmlu import load_mmlu

TASKS: dict[str, Callable[..., list[Task]]] = {
    "arithmetic": load_arithmetic,
    "gsm8k": load_gsm8k,
    "math": load_math,
    "math500": load_math500,
    "bbh": load_bbh,
    "mmlu": load_mmlu,
    "csqa": load_csqa,
    "humaneval": load_humaneval,
    "mbpp": load_mbpp,
}


def load_task(
    name: str,
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    **options: object,
) -> list[Task]:
    """Rows of task ``name``: local folder (``data_dir``, else $MLPO_DATA_DIR), else the hub."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid: {', '.join(TASKS)}.")
    return TASKS[name](data_dir=data_dir, split=split, subset=subset, limit=limit, seed=seed, **options)


__all__ = ["TASKS", "Task", "TaskError", "load_task"]
