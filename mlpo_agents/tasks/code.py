"""MBPP sanitized test + HumanEval pooled, with a held-out split: train on code, evaluate on unseen problems.

MAGRPO's code setting (Liu et al. 2025, arXiv 2508.04652; the ``code_pair`` topology) trains on
HumanEval- and MBPP-style problems, but only their published test sets are available here. Task
``code`` pools those 421 problems and assigns each to ``train`` or ``test`` by a hash of its question
text (30% test), independently of the seed and of which other problems are loaded. Measured on
../shared/data: MBPP 183 train / 74 test, HumanEval 120 train / 44 test, pooled 303 train / 118 test.
``subset`` keeps one source (``mbpp`` or ``humaneval``) with the same assignment.

The rows are the ``mbpp`` and ``humaneval`` rows unchanged (question, tests, entry point, style), so
the code reward and ``code_pair`` read them the same way; ``meta["source_task"]`` is the row's id in
its own task (``mbpp/test/17``) and ``meta["split"]`` its split here. A task id is
``code/<source>/<hash of the question>``: one id names one problem, whatever split or sample it is in.

Tasks ``mbpp`` and ``humaneval`` are unchanged: their default (and only) split is still the published
test set, the numbers papers report. Training on ``code`` train uses problems from those published test
sets, so a model trained here must be compared on ``code`` test, never on ``mbpp`` or ``humaneval``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from .base import Task, TaskError, check_choice, sample
from .humaneval import load_humaneval
from .mbpp import load_mbpp

SPLITS = ("train", "test")
TEST_PERCENT = 30
"""Share of the problems in ``test``; 30% keeps more than 100 held-out problems when both sources are pooled."""
SOURCES: dict[str, Callable[..., list[Task]]] = {"mbpp": load_mbpp, "humaneval": load_humaneval}


def split_of(question: str) -> str:
    """The split a problem belongs to, fixed by a hash of its question text."""
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def problem_id(source: str, question: str) -> str:
    """The task id of a problem: its source and a short hash of its question text."""
    return f"code/{source}/{hashlib.sha256(question.encode()).hexdigest()[:12]}"


def load_code(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """The problems of ``split`` (default ``test``) from MBPP and HumanEval, or from the source ``subset``."""
    split = split or "test"
    check_choice(split, SPLITS, "split", "code")
    if subset is not None:
        check_choice(subset, SOURCES, "subset", "code")
    sources = [subset] if subset else list(SOURCES)
    tasks: list[Task] = []
    first_seen: dict[str, str] = {}
    for source in sources:
        for row in SOURCES[source](data_dir=data_dir):
            task_id = problem_id(source, row.question)
            if task_id in first_seen:
                raise TaskError(
                    f"code: {row.id} and {first_seen[task_id]} ask the same question, so they would share the "
                    f"id {task_id}; remove the duplicate row from the data file."
                )
            first_seen[task_id] = row.id
            if split_of(row.question) == split:
                meta = {**row.meta, "source_task": row.id, "split": split}
                tasks.append(Task(task_id, row.question, row.answer, row.kind, meta))
    return sample(tasks, limit, seed)
