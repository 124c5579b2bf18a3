"""BIG-Bench Hard (Suzgun et al., 2022): 27 tasks, scored by exact match after per-task normalisation.

Each task gets a matcher name in ``Task.meta["match"]`` that ``rewards.score`` applies:
``choice`` (``(A)`` targets; letter or option text), ``label`` (True/False, Yes/No, valid/invalid),
``number``, ``dyck`` (closing brackets, whitespace ignored) and ``words`` (sorted word sequence).
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import (
    Task,
    TaskError,
    check_choice,
    data_file,
    hub_rows,
    read_json_examples,
    resolve_data_dir,
    sample,
)

MATCHERS = {
    "boolean_expressions": "label",
    "causal_judgement": "label",
    "date_understanding": "choice",
    "disambiguation_qa": "choice",
    "dyck_languages": "dyck",
    "formal_fallacies": "label",
    "geometric_shapes": "choice",
    "hyperbaton": "choice",
    "logical_deduction_five_objects": "choice",
    "logical_deduction_seven_objects": "choice",
    "logical_deduction_three_objects": "choice",
    "movie_recommendation": "choice",
    "multistep_arithmetic_two": "number",
    "navigate": "label",
    "object_counting": "number",
    "penguins_in_a_table": "choice",
    "reasoning_about_colored_objects": "choice",
    "ruin_names": "choice",
    "salient_translation_error_detection": "choice",
    "snarks": "choice",
    "sports_understanding": "label",
    "temporal_sequences": "choice",
    "tracking_shuffled_objects_five_objects": "choice",
    "tracking_shuffled_objects_seven_objects": "choice",
    "tracking_shuffled_objects_three_objects": "choice",
    "web_of_lies": "label",
    "word_sorting": "words",
}
SUBSETS = tuple(MATCHERS)

_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s*(.*?)\s*$", re.MULTILINE)
_LETTER_TARGET = re.compile(r"^\(([A-Z])\)$")


def parse_options(text: str) -> dict[str, str]:
    """``{"A": "circle", ...}`` from ``(A) circle`` lines; empty when the question lists none."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(text)}


def load_bbh(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """One BBH task (``subset``) or all 27 (``subset`` None or ``"all"``) as exact-match tasks."""
    split = split or "test"
    check_choice(split, ("test",), "split", "bbh")
    if subset not in (None, "all"):
        check_choice(subset, SUBSETS + ("all",), "subset", "bbh")
    names = SUBSETS if subset in (None, "all") else (subset,)
    root = resolve_data_dir(data_dir)
    tasks = []
    for name in names:
        rows = (
            read_json_examples(data_file(root, "bbh", f"{name}.json"))
            if root
            else hub_rows("lukaemon/bbh", name, "test")
        )
        for row in rows:
            question, target = row.get("input"), row.get("target")
            if not isinstance(target, str) or not target.strip():
                raise TaskError(f"{row.where}: field 'target' is empty.")
            meta: dict = {"subset": name, "match": MATCHERS[name]}
            if MATCHERS[name] == "choice":
                meta["options"] = parse_options(question)
                letter = _LETTER_TARGET.match(target.strip())
                # A few upstream targets are option text split across options ("Monsters, Inc"): keep text.
                meta["gold_letter"] = letter.group(1) if letter else None
            tasks.append(
                Task(id=f"bbh/{name}/{row.index}", question=question, answer=target, kind="exact", meta=meta)
            )
    return sample(tasks, limit, seed)
