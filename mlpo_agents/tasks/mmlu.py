"""MMLU (Hendrycks et al., 2021), test split, 57 subjects; four-way multiple choice (A-D)."""

from __future__ import annotations

from pathlib import Path

from .base import (
    Task,
    check_choice,
    data_file,
    format_options,
    hub_rows,
    read_jsonl,
    resolve_data_dir,
    sample,
)

SUBJECTS = (
    "abstract algebra", "anatomy", "astronomy", "business ethics", "clinical knowledge", "college biology",
    "college chemistry", "college computer science", "college mathematics", "college medicine",
    "college physics", "computer security", "conceptual physics", "econometrics", "electrical engineering",
    "elementary mathematics", "formal logic", "global facts", "high school biology", "high school chemistry",
    "high school computer science", "high school european history", "high school geography",
    "high school government and politics", "high school macroeconomics", "high school mathematics",
    "high school microeconomics", "high school physics", "high school psychology", "high school statistics",
    "high school us history", "high school world history", "human aging", "human sexuality",
    "international law", "jurisprudence", "logical fallacies", "machine learning", "management", "marketing",
    "medical genetics", "miscellaneous", "moral disputes", "moral scenarios", "nutrition", "philosophy",
    "prehistory", "professional accounting", "professional law", "professional medicine",
    "professional psychology", "public relations", "security studies", "sociology", "us foreign policy",
    "virology", "world religions",
)  # fmt: skip
LETTERS = "ABCD"


def normalise_subject(subject: str) -> str:
    """``"high_school_biology"`` (hub spelling) and ``"High School Biology"`` -> ``"high school biology"``."""
    return " ".join(subject.replace("_", " ").lower().split())


def _from_hub(row: dict) -> dict:
    """cais/mmlu layout (question, subject, choices, answer index) -> the local file's layout."""
    out = {"question": row["question"], "topic": normalise_subject(row["subject"])}
    for letter, text in zip(LETTERS, row["choices"], strict=True):
        out[f"answer_{letter.lower()}"] = text
    out["correct_answer"] = LETTERS[row["answer"]]
    return out


def load_mmlu(
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """MMLU test questions of one subject (``subset``) or all subjects, as choice tasks."""
    split = split or "test"
    check_choice(split, ("test",), "split", "mmlu")
    subject = None if subset in (None, "all") else normalise_subject(subset)
    if subject is not None:
        check_choice(subject, SUBJECTS, "subject", "mmlu")
    root = resolve_data_dir(data_dir)
    if root:
        rows = read_jsonl(data_file(root, "mmlu", "test.jsonl"))
    else:
        config = subject.replace(" ", "_") if subject else "all"
        rows = hub_rows("cais/mmlu", config, split, convert=_from_hub)
    tasks = []
    for row in rows:
        topic = normalise_subject(row.get("topic"))
        if subject is not None and topic != subject:
            continue
        options = {letter: str(row.get(f"answer_{letter.lower()}")) for letter in LETTERS}
        answer = str(row.get("correct_answer")).strip()
        check_choice(answer, LETTERS, f"correct_answer at {row.where}:", "mmlu")
        tasks.append(
            Task(
                id=f"mmlu/{split}/{row.index}",
                question=format_options(row.get("question"), options),
                answer=answer,
                kind="choice",
                meta={"options": options, "subject": topic},
            )
        )
    return sample(tasks, limit, seed)
