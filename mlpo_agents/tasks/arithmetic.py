"""Synthetic integer arithmetic (``a op b [op c ...]``), seeded, for smoke tests and warm-up training.

Train and test never share an expression: each expression is assigned to a split by a hash of its
text (10% test), independently of the seed, so any train seed and any test seed stay disjoint. A task
id ends with a hash of the expression, so one id always names one question, whatever level, overrides
or seed produced it.

Levels, with the base rates measured in ../shared/MODELS.md (2-core CPU, untrained models; "lenient"
is the last number of the reply, "strict" a closed ``<answer>`` block; solo = one model, team =
leader + 3 peers, peer MV = majority vote of the 3 peers):

- ``one_digit``: 2 operands 0..9, ``+`` (MODELS.md level L0; 100 expressions, only 5 of them in the test
  split: use the train split for more). SmolLM2-135M: 13/20 answering
  directly; in the runner solo 27.5% lenient / 0% strict, team 17.5% / 0%, peer MV 45%.
  Qwen2.5-Coder-0.5B: 20/20.
- ``two_digit``: 2 operands 0..20, ``+`` (L1; 441 expressions, 45 in test). SmolLM2: solo 15% / 0%,
  team 10% / 0%, peer MV 25%.
- ``three_step``: 3 operands 0..20, ``+-*`` (L3). Qwen 0.5B: solo 80% / 36.7%, team 56.7% / 53.3%,
  peer MV 53.3%. SmolLM2 answered 0/20 ``(a+b)×c``-style problems directly.
- ``easy``: 2 operands 0..50, ``+-``. Not measured.
- ``medium`` (default): 3 operands 0..50, ``+-*`` (L4). Qwen 0.5B: solo 40% / 5%, team 35% / 30%,
  peer MV 40%.
- ``hard``: 4 operands 0..99, ``+-*``, one parenthesised pair. Not measured.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from .base import Task, TaskError, check_choice

SPLITS = ("train", "test")
DEFAULT_SIZE = {"train": 1000, "test": 200}
ENUMERABLE = 200_000
"""Level spaces up to this many expressions are counted exactly, so a too-large ``limit`` fails at once."""


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
    "one_digit": Difficulty(num_operands=2, max_value=9, ops="+", parentheses=False),
    "two_digit": Difficulty(num_operands=2, max_value=20, ops="+", parentheses=False),
    "three_step": Difficulty(num_operands=3, max_value=20, ops="+-*", parentheses=False),
    "easy": Difficulty(num_operands=2, max_value=50, ops="+-", parentheses=False),
    "medium": Difficulty(num_operands=3, max_value=50, ops="+-*", parentheses=False),
    "hard": Difficulty(num_operands=4, max_value=99, ops="+-*", parentheses=True),
}
OPTIONS = tuple(Difficulty.__dataclass_fields__)
"""Keyword overrides ``load_arithmetic`` accepts (``--task-option key=value`` on the command line)."""
OPTION_CHECKS = {
    "num_operands": (lambda v: type(v) is int and v >= 2, "an integer >= 2, e.g. num_operands=3"),
    "max_value": (lambda v: type(v) is int and v >= 1, "an integer >= 1, e.g. max_value=20"),
    "ops": (lambda v: isinstance(v, str) and v != "" and not set(v) - set("+-*"), "operators from '+-*', e.g. ops=+-"),
    "parentheses": (lambda v: type(v) is bool, "true or false"),
}


def split_of(expression: str) -> str:
    """The split an expression belongs to, fixed by a hash of its text."""
    return "test" if hashlib.sha256(expression.encode()).digest()[0] % 10 == 0 else "train"


def expression_id(expression: str) -> str:
    """A short hash naming the expression, the last part of its task id."""
    return hashlib.sha256(expression.encode()).hexdigest()[:12]


def render(values: list[str], ops: list[str], paren_at: int | None) -> str:
    """``values`` joined by ``ops``, with operands ``paren_at`` and ``paren_at + 1`` in parentheses."""
    values = list(values)
    if paren_at is not None:
        values[paren_at], values[paren_at + 1] = "(" + values[paren_at], values[paren_at + 1] + ")"
    return " ".join(v for pair in zip(values, list(ops) + [""], strict=True) for v in pair if v)


def make_expression(rng: random.Random, level: Difficulty) -> str:
    """One random expression such as ``"(12 - 7) * 3"``."""
    values = [str(rng.randint(0, level.max_value)) for _ in range(level.num_operands)]
    ops = [rng.choice(level.ops) for _ in range(level.num_operands - 1)]
    paren_at = rng.randrange(level.num_operands - 1) if level.parentheses else None
    return render(values, ops, paren_at)


def space_size(level: Difficulty) -> int:
    """How many distinct expressions the level can write (both splits)."""
    n = (level.max_value + 1) ** level.num_operands * len(set(level.ops)) ** (level.num_operands - 1)
    return n * (level.num_operands - 1 if level.parentheses else 1)


@functools.lru_cache(maxsize=32)
def count_in_split(level: Difficulty, split: str) -> int:
    """The exact number of distinct expressions of ``level`` in ``split`` (enumerates the level)."""
    numbers = [str(v) for v in range(level.max_value + 1)]
    parens: list[int | None] = list(range(level.num_operands - 1)) if level.parentheses else [None]
    return sum(
        split_of(render(list(values), list(ops), p)) == split
        for values in itertools.product(numbers, repeat=level.num_operands)
        for ops in itertools.product(sorted(set(level.ops)), repeat=level.num_operands - 1)
        for p in parens
    )


def load_arithmetic(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    **overrides: object,
) -> list[Task]:
    """``limit`` distinct problems (default 1000 train / 200 test, or all when fewer exist).

    ``subset`` is a level name (see the module docstring; default ``medium``). Keyword overrides
    (``num_operands``, ``max_value``, ``ops``, ``parentheses``) adjust the level. ``data_dir`` is
    accepted for a uniform signature and ignored: nothing is read from disk.
    """
    split = split or "test"
    check_choice(split, SPLITS, "split", "arithmetic")
    subset = subset or "medium"
    check_choice(subset, tuple(LEVELS), "subset", "arithmetic")
    unknown = set(overrides) - set(OPTIONS)
    if unknown:
        raise TaskError(f"unknown arithmetic options {sorted(unknown)}; valid: {', '.join(OPTIONS)}.")
    for key, value in overrides.items():
        if not OPTION_CHECKS[key][0](value):
            raise TaskError(
                f"arithmetic option {key}={value!r}: must be {OPTION_CHECKS[key][1]}; valid options: {', '.join(OPTIONS)}."
            )
    level = Difficulty(**{**LEVELS[subset].__dict__, **overrides})  # type: ignore[arg-type]
    if limit is not None and limit < 0:
        raise TaskError(f"limit must be >= 0, got {limit}.")
    available = count_in_split(level, split) if space_size(level) <= ENUMERABLE else None
    if limit is None:
        size = DEFAULT_SIZE[split] if available is None else min(DEFAULT_SIZE[split], available)
    else:
        size = limit
    if available is not None and size > available:
        raise TaskError(too_few(subset, split, level, available, size, overridden=bool(overrides)))
    rng = random.Random(f"arithmetic/{split}/{seed}")
    seen: set[str] = set()
    tasks: list[Task] = []
    attempts = 0
    while len(tasks) < size:
        attempts += 1
        if attempts > 100 * size + 1000:
            raise TaskError(too_few(subset, split, level, len(tasks), size, overridden=bool(overrides), exact=False))
        expression = make_expression(rng, level)
        if expression in seen or split_of(expression) != split:
            continue
        seen.add(expression)
        value = eval(expression, {"__builtins__": {}})  # our own digits, operators and parentheses only
        tasks.append(
            Task(
                id=f"arithmetic/{split}/{subset}/{expression_id(expression)}",
                question=f"Compute {expression}.",
                answer=str(value),
                kind="math",
                meta={"expression": expression, "difficulty": subset, "level": level.__dict__},
            )
        )
    return tasks


def too_few(
    subset: str, split: str, level: Difficulty, available: int, wanted: int, *, overridden: bool, exact: bool = True
) -> str:
    """The message for a split that cannot supply ``wanted`` distinct problems, with what to do instead."""
    names = list(LEVELS)
    later = [] if overridden else names[names.index(subset) + 1 :]
    wider = next((n for n in later if space_size(LEVELS[n]) > space_size(level)), None)
    other = "train" if split == "test" else "test"
    fixes = [f"ask for at most {available} (--limit {available})" if available else None]
    fixes.append(f"use --split {other}" if split == "test" else None)
    fixes.append(f"a larger level (--subset {wider})" if wider else "a wider level (e.g. a larger max_value)")
    how_many = f"has only {available}" if exact else f"gave only {available} after many draws"
    return (
        f"arithmetic {subset} ({level.num_operands} operands 0..{level.max_value}, ops {level.ops!r}): "
        f"the {split} split {how_many} distinct problem(s), {wanted} requested; "
        + ", or ".join(f for f in fixes if f)
        + "."
    )
