"""MATH (Hendrycks et al., 2021), full 5000-problem test set, and the MATH-500 subset (Lightman et al., 2023).

Named ``math_tasks`` so that ``mlpo_agents.tasks.math`` never shadows the standard ``math`` module.
The full set has no answer field: the gold answer is the last ``\\boxed{}`` of the solution.
"""

from __future__ import annotations

from pathlib import Path

from ..rewards import last_boxed
from .base import (
    Row,
    Task,
    TaskError,
    check_choice,
    data_file,
    hub_rows,
    read_jsonl,
    resolve_data_dir,
    sample,
)

HUB_MATH_CONFIGS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)  # fmt: skip


def _check(name: str, split: str | None, subset: str | None) -> str:
    split = split or "test"
    check_choice(split, ("test",), "split", name)
    if subset is not None:
        raise TaskError(f"{name} has no subsets, got subset={subset!r}; filter on Task.meta['subject'].")
    return split


def load_math(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """The full MATH test set (5000 problems) as math tasks."""
    split = _check("math", split, subset)
    root = resolve_data_dir(data_dir)
    if root:
        rows: list[Row] = read_jsonl(data_file(root, "math", "test.jsonl"))
    else:
        rows = []
        for config in HUB_MATH_CONFIGS:
            rows += hub_rows("EleutherAI/hendrycks_math", config, split)
        rows = [Row(r.data, r.where, i) for i, r in enumerate(rows)]
    tasks = []
    for row in rows:
        solution = row.get("solution")
        answer = last_boxed(solution)
        if answer is None:
            raise TaskError(f"{row.where}: field 'solution' has no \\boxed{{}} final answer.")
        tasks.append(
            Task(
                id=f"math/{split}/{row.index}",
                question=row.get("problem"),
                answer=answer,
                kind="math",
                meta={"subject": row.get("type"), "level": row.get("level"), "solution": solution},
            )
        )
    return sample(tasks, limit, seed)


def load_math500(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """MATH-500, the 500-problem test subset used by PRM800K, as math tasks."""
    split = _check("math500", split, subset)
    root = resolve_data_dir(data_dir)
    rows = (
        read_jsonl(data_file(root, "math", "math500_test.jsonl"))
        if root
        else hub_rows("HuggingFaceH4/MATH-500", None, split)
    )
    tasks = [
        Task(
            id=f"math500/{split}/{row.index}",
            question=row.get("problem"),
            answer=str(row.get("answer")),
            kind="math",
            meta={"subject": row.get("subject"), "level": row.get("level"), "solution": row.get("solution")},
        )
        for row in rows
    ]
    return sample(tasks, limit, seed)
