"""GSM8K (Cobbe et al., 2021): grade-school word problems; gold = the number after ``####``."""

from __future__ import annotations

from pathlib import Path

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

SPLITS = ("train", "test")


def gold_number(solution: str, where: str) -> str:
    """The final answer of a GSM8K solution: text after the last ``####``, commas stripped."""
    if "####" not in solution:
        raise TaskError(f"{where}: field 'answer' has no '#### <number>' final answer.")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """GSM8K train or test (default test) as math tasks."""
    split = split or "test"
    check_choice(split, SPLITS, "split", "gsm8k")
    if subset is not None:
        raise TaskError(f"gsm8k has no subsets, got subset={subset!r}.")
    root = resolve_data_dir(data_dir)
    rows: list[Row] = (
        read_jsonl(data_file(root, "gsm8k", f"{split}.jsonl"))
        if root
        else hub_rows("openai/gsm8k", "main", split)
    )
    tasks = [
        Task(
            id=f"gsm8k/{split}/{row.index}",
            question=row.get("question"),
            answer=gold_number(row.get("answer"), row.where),
            kind="math",
            meta={"solution": row.get("answer")},
        )
        for row in rows
    ]
    return sample(tasks, limit, seed)
