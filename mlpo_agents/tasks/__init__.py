"""Benchmark tasks: a registry of loaders that all return ``list[Task]``.

>>> tasks = load_task("gsm8k", data_dir="../shared/data", split="test", limit=8, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .arithmetic import OPTIONS as ARITHMETIC_OPTIONS
from .arithmetic import load_arithmetic
from .base import Task, TaskError
from .bbh import load_bbh
from .code import load_code
from .csqa import load_csqa
from .gsm8k import load_gsm8k
from .humaneval import load_humaneval
from .math_tasks import load_math, load_math500
from .mbpp import load_mbpp
from .mmlu import load_mmlu
from .word_problems import OPTIONS as WORD_PROBLEM_OPTIONS
from .word_problems import load_word_problems

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
    "code": load_code,
    "word_problems": load_word_problems,
}
OPTIONS: dict[str, tuple[str, ...]] = {"arithmetic": ARITHMETIC_OPTIONS, "word_problems": WORD_PROBLEM_OPTIONS}
"""Extra keyword options per task (``--task-option key=value``); tasks not listed take none."""


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
    unknown = sorted(set(options) - set(OPTIONS.get(name, ())))
    if unknown:
        valid = ", ".join(OPTIONS.get(name, ())) or "none"
        raise TaskError(f"task {name!r} has no option {', '.join(map(repr, unknown))}; valid options: {valid}.")
    tasks = TASKS[name](data_dir=data_dir, split=split, subset=subset, limit=limit, seed=seed, **options)
    for task in tasks:
        check_text(task)
    return tasks


def check_text(task: Task) -> None:
    """Raise TaskError when a text field cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800").

    Such text passes JSON decoding but fails later inside a tokenizer, after the run has started.
    """
    fields = {"question": task.question, "answer": task.answer}
    fields.update({f"meta.{k}": v for k, v in task.meta.items() if isinstance(v, str)})
    fields.update(
        {f"meta.{k}[{i}]": x for k, v in task.meta.items() if isinstance(v, list) for i, x in enumerate(v)
         if isinstance(x, str)}
    )
    for where, text in fields.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TaskError(
                f"task {task.id}: field {where!r} holds {text[e.start]!r} at character {e.start}, a lone "
                "surrogate that is not valid Unicode text; fix or remove that row in the data file."
            ) from None


__all__ = ["OPTIONS", "TASKS", "Task", "TaskError", "check_text", "load_task"]
