"""Synthetic integer arithmetic (``a op b [op c ...]``), seeded, for smoke tests and warm-up training.

Train and test never share an expression: each expression is assigned to a split by a hash of its
text (10% test), independently of the seed, so any train seed and any test seed stay disjoint.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from .base import Task, TaskError, check_choice

SPLITS = ("train", "test")
DEFAULT_SIZE = {"train": 1000, "test": 200}


@dataclass(frozen=True)
class Difficulty:
    """How hard the generated expressions are."""

    num_operands: int
    """Integers per expression (>= 2)."""
    max_value: int
    """Operands are drawn uniformly from 0..max_value."""
    ops: str
    """Operators to draw from, a subset of ``"+-*"``."""
    parentheses: bool
    """Whether to wrap one random adjacent pair of operands in parentheses."""


LEVELS = {
    "easy": Difficulty(num_operands=2, max_value=50, ops="+-", parentheses=False),
    "medium": Difficulty(num_operands=3, max_value=50, ops="+-*", parentheses=False),
    "hard": Difficulty(num_operands=4, max_value=99, ops="+-*", parentheses=True),
}


def split_of(expression: str) -> str:
    """The split an expression belongs to, fixed by a hash of its text."""
    return "test" if hashlib.sha256(expression.encode()).digest()[0] % 10 == 0 else "train"


def make_expression(rng: random.Random, level: Difficulty) -> str:
    """One random expression such as ``"(12 - 7) * 3"``."""
    values = [str(rng.randint(0, level.max_value)) for _ in range(level.num_operands)]
    ops = [rng.choice(level.ops) for _ in range(level.num_operands - 1)]
    if level.parentheses:
        i = rng.randrange(level.num_operands - 1)
        values[i], values[i + 1] = "(" + values[i], values[i + 1] + ")"
    return " ".join(v for pair in zip(values, ops + [""], strict=True) for v in pair if v)


def load_arithmetic(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    **overrides: object,
) -> list[Task]:
    """``limit`` (default 1000 train / 200 test) distinct problems; ``subset`` is easy/medium/hard.

    Keyword overrides (``num_operands``, ``max_value``, ``ops``, ``parentheses``) adjust the level.
    ``data_dir`` is accepted for a uniform signature and ignored: nothing is read from disk.
    """
    split = split or "test"
    check_choice(split, SPLITS, "split", "arithmetic")
    subset = subset or "medium"
    check_choice(subset, tuple(LEVELS), "subset", "arithmetic")
    unknown = set(overrides) - set(Difficulty.__dataclass_fields__)
    if unknown:
        raise TaskError(
            f"unknown arithmetic options {sorted(unknown)}; valid: {sorted(Difficulty.__dataclass_fields__)}."
        )
    level = Difficulty(**{**LEVELS[subset].__dict__, **overrides})  # type: ignore[arg-type]
    if level.num_operands < 2 or not level.ops or set(level.ops) - set("+-*") or level.max_value < 1:
        raise TaskError(
            f"invalid arithmetic difficulty {level}: need num_operands >= 2, ops from '+-*', max_value >= 1."
        )
    size = DEFAULT_SIZE[split] if limit is None else limit
    rng = random.Random(f"arithmetic/{split}/{seed}")
    seen: set[str] = set()
    tasks: list[Task] = []
    attempts = 0
    while len(tasks) < size:
        attempts += 1
        if attempts > 100 * size + 1000:
            raise TaskError(
                f"could only make {len(tasks)} distinct {split} problems at {level}; ask for fewer or widen it."
            )
        expression = make_expression(rng, level)
        if expression in seen or split_of(expression) != split:
            continue
        seen.add(expression)
        value = eval(expression, {"__builtins__": {}})  # our own digits, operators and parentheses only
        tasks.append(
            Task(
                id=f"arithmetic/{split}/{subset}/{seed}-{len(tasks)}",
                question=f"Compute {expression}.",
                answer=str(value),
                kind="math",
                meta={"expression": expression, "difficulty": subset},
            )
        )
    return tasks
