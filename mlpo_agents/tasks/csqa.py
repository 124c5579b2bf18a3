"""CommonsenseQA (Talmor et al., 2019), dev split (the test labels are hidden); five-way choice (A-E)."""

from __future__ import annotations

from pathlib import Path

from .base import (
    Task,
    TaskError,
    check_choice,
    data_file,
    format_options,
    hub_rows,
    read_jsonl,
    resolve_data_dir,
    sample,
)

SPLITS = ("dev", "validation")  # "validation" is the hub's name for the same split


def load_csqa(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """CommonsenseQA dev questions as choice tasks."""
    split = split or "dev"
    check_choice(split, SPLITS, "split", "csqa")
    if subset is not None:
        raise TaskError(f"csqa has no subsets, got subset={subset!r}.")
    root = resolve_data_dir(data_dir)
    rows = (
        read_jsonl(data_file(root, "csqa", "dev.jsonl"))
        if root
        else hub_rows("tau/commonsense_qa", None, "validation")
    )
    tasks = []
    for row in rows:
        choices = row.get("choices")
        if not isinstance(choices, dict) or "label" not in choices or "text" not in choices:
            raise TaskError(f"{row.where}: field 'choices' must be {{'label': [...], 'text': [...]}}.")
        options = dict(zip(choices["label"], choices["text"], strict=True))
        tasks.append(
            Task(
                id=f"csqa/dev/{row.index}",
                question=format_options(row.get("question"), options),
                answer=row.get("answerKey"),
                kind="choice",
                meta={"options": options, "concept": row.get("question_concept"), "source_id": row.get("id")},
            )
        )
    return sample(tasks, limit, seed)
