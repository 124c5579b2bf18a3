"""HumanEval (Chen et al., 2021): 164 Python functions to complete, checked by their unit tests."""

from __future__ import annotations

from pathlib import Path

from .base import Task, TaskError, data_file, hub_rows, read_jsonl, resolve_data_dir, sample


def load_humaneval(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """HumanEval problems as code tasks; the question is the signature plus docstring."""
    split = split or "test"
    if split != "test":  # the published test set only; task `code` splits it into train and test
        raise TaskError(f"unknown split {split!r} for task 'humaneval'; valid: test (the published test set). "
                        "For train and held-out test problems use task 'code' (MBPP + HumanEval).")
    if subset is not None:
        raise TaskError(f"humaneval has no subsets, got subset={subset!r}.")
    root = resolve_data_dir(data_dir)
    rows = (
        read_jsonl(data_file(root, "humaneval", "HumanEval.jsonl.gz"))
        if root
        else hub_rows("openai/openai_humaneval", None, "test")
    )
    tasks = [
        Task(
            id=f"humaneval/test/{row.index}",
            question=row.get("prompt"),
            answer="",
            kind="code",
            meta={
                "style": "humaneval",
                "source_id": row.get("task_id"),
                "prompt": row.get("prompt"),
                "entry_point": row.get("entry_point"),
                "tests": row.get("test"),
                "canonical_solution": row.get("canonical_solution"),
            },
        )
        for row in rows
    ]
    return sample(tasks, limit, seed)
