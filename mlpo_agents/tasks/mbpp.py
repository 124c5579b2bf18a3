"""MBPP sanitized (Austin et al., 2021), test split: short Python functions checked by assert tests.

The question follows the paper's prompt: the description, then the tests the code must pass.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import Task, TaskError, data_file, hub_rows, read_jsonl, resolve_data_dir, sample

_CALLED = re.compile(r"assert\s+(?:not\s+)?[\s(]*(?:math\.isclose\(|set\()?\s*([A-Za-z_]\w*)\s*\(")


def entry_point(tests: list[str], code: str) -> str | None:
    """The function the tests call: the first name called in an assert that the solution defines."""
    defined = set(re.findall(r"^def\s+([A-Za-z_]\w*)", code, re.MULTILINE))
    for test in tests:
        for name in re.findall(r"([A-Za-z_]\w*)\s*\(", test):
            if name in defined:
                return name
    match = _CALLED.search(tests[0]) if tests else None
    return match.group(1) if match else None


def load_mbpp(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """MBPP sanitized test problems as code tasks; meta holds the assert tests and imports."""
    split = split or "test"
    if split != "test":  # the published test set only; task `code` splits it into train and test
        raise TaskError(f"unknown split {split!r} for task 'mbpp'; valid: test (the published test set). "
                        "For train and held-out test problems use task 'code' (MBPP + HumanEval).")
    if subset is not None:
        raise TaskError(f"mbpp has no subsets, got subset={subset!r}.")
    root = resolve_data_dir(data_dir)
    rows = (
        read_jsonl(data_file(root, "mbpp", "sanitized_test.jsonl"))
        if root
        else hub_rows("google-research-datasets/mbpp", "sanitized", "test")
    )
    tasks = []
    for row in rows:
        tests, code = list(row.get("test_list")), row.get("code")
        if not tests:
            raise TaskError(f"{row.where}: field 'test_list' is empty.")
        question = f"{row.get('prompt').strip()}\nYour code should pass these tests:\n\n" + "\n".join(tests)
        tasks.append(
            Task(
                id=f"mbpp/test/{row.index}",
                question=question,
                answer="",
                kind="code",
                meta={
                    "style": "mbpp",
                    "source_id": row.data.get("task_id"),
                    "entry_point": entry_point(tests, code),
                    "tests": tests,
                    "test_imports": list(row.get("test_imports")),
                    "canonical_solution": code,
                },
            )
        )
    return sample(tasks, limit, seed)
