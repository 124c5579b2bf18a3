"""One-step word problems with small numbers ("Mia has 7 stickers and gives 3 away..."), seeded.

The learning-zone task for the embedded SmolLM2-135M: one addition or subtraction of two numbers in
1..``max_value`` (default 9), told as a short story. Measured on a 2-core CPU, untrained, greedy,
strict answer rule (``rewards.extract_answer``): SmolLM2 alone 35% (lenient 50%), SmolLM2 leader with
3 SmolLM2 peers at temperature 0.7 7.5% (lenient 22.5%): the untrained team is far below the solo
model, the gap MLPO trains the leader to close.

Train and test never share a question: a question is assigned to a split by a hash of its text (10%
test), independently of the seed. The arithmetic space is small (2 x 81 facts at ``max_value=9``), so a
held-out question is a new text over facts that training questions also use: the test measures
solving unseen problems as told, not unseen arithmetic. Task ids end with a hash of the question.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from .base import Task, TaskError, check_choice

SPLITS = ("train", "test")
DEFAULT_SIZE = {"train": 2000, "test": 200}
OPTIONS = ("max_value", "ops")

NAMES = (
    "Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Emma", "Leo", "Zoe", "Omar", "Nina", "Ravi", "Ella",
    "Jack", "Sara", "Luis", "Amy", "Noah", "Ivy", "Kai", "Rosa", "Finn", "Maya",
)
THINGS = (
    "apples", "books", "marbles", "pencils", "cookies", "stickers", "coins", "shells", "cards", "balloons",
    "stamps", "buttons", "toy cars", "flowers", "eggs", "crayons",
)
ADD = (
    "{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
    "{n} had {a} {t}. A friend gave {n} {b} more {t}. How many {t} does {n} have now?",
    "There are {a} {t} in a box. {n} puts {b} more {t} in the box. How many {t} are in the box?",
    "{n} found {a} {t} on Monday and {b} {t} on Tuesday. How many {t} did {n} find in all?",
    "{n} buys {a} {t} and then buys {b} more. How many {t} did {n} buy?",
    "A shelf holds {a} {t}. {n} adds {b} {t}. How many {t} are on the shelf now?",
)
SUBTRACT = (
    "{n} has {a} {t} and gives {b} away. How many {t} does {n} have left?",
    "{n} had {a} {t} and lost {b} of them. How many {t} does {n} have now?",
    "There are {a} {t} in a box. {n} takes {b} {t} out. How many {t} are left in the box?",
    "{n} baked {a} {t} and ate {b}. How many {t} are left?",
    "{n} had {a} {t} and used {b} of them. How many {t} are left?",
    "A shelf holds {a} {t}. {n} takes away {b}. How many {t} are on the shelf now?",
)


def split_of(question: str) -> str:
    """The split a question belongs to, fixed by a hash of its text."""
    return "test" if hashlib.sha256(question.encode()).digest()[0] % 10 == 0 else "train"


def make_problem(rng: random.Random, max_value: int, ops: str) -> tuple[str, int, str]:
    """One (question, answer, expression) such as ("Mia has 7 stickers and gives 3 away...", 4, "7 - 3")."""
    a, b = rng.randint(1, max_value), rng.randint(1, max_value)
    op = rng.choice(ops)
    if op == "-":
        a, b = max(a, b), min(a, b)
    template = rng.choice(ADD if op == "+" else SUBTRACT)
    question = template.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
    return question, a + b if op == "+" else a - b, f"{a} {op} {b}"


def load_word_problems(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    max_value: int = 9,
    ops: str = "+-",
) -> list[Task]:
    """``limit`` (default 2000 train / 200 test) distinct word problems of ``split``.

    ``max_value``: numbers are drawn from 1..max_value; ``ops``: a non-empty subset of ``"+-"``.
    ``data_dir`` and ``subset`` are accepted for a uniform signature and ignored.
    """
    split = split or "test"
    check_choice(split, SPLITS, "split", "word_problems")
    if subset not in (None, "default"):
        raise TaskError(f"word_problems has no subsets (got {subset!r}); use --task-option max_value=N instead.")
    if not isinstance(max_value, int) or max_value < 1 or not ops or set(ops) - set("+-"):
        raise TaskError(f"word_problems: max_value={max_value!r} must be an integer >= 1 and ops={ops!r} from '+-'.")
    size = DEFAULT_SIZE[split] if limit is None else limit
    if size < 1:
        raise TaskError(f"word_problems: limit={size} must be >= 1.")
    rng = random.Random(f"word_problems/{split}/{seed}/{max_value}/{ops}")
    seen: set[str] = set()
    tasks: list[Task] = []
    for _ in range(200 * size + 10_000):
        if len(tasks) == size:
            return tasks
        question, answer, expression = make_problem(rng, max_value, ops)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        digest = hashlib.sha256(question.encode()).hexdigest()[:12]
        tasks.append(
            Task(
                id=f"word_problems/{split}/{digest}",
                question=question,
                answer=str(answer),
                kind="math",
                meta={"expression": expression, "max_value": max_value, "ops": ops},
            )
        )
    raise TaskError(f"word_problems: could only make {len(tasks)} distinct {split} problems; ask for fewer.")
