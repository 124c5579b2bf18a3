"""The Task row every topology and trainer consumes, plus the helpers the loaders share.

A loader reads a local folder (``data_dir`` argument, else ``$MLPO_DATA_DIR``) or, with neither set,
the Hugging Face hub through ``datasets``. Both paths yield rows with the layout of the files in
``../shared/data`` (see its README), so each task file converts one row layout into ``Task`` rows.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "MLPO_DATA_DIR"
HUB_HOST = "huggingface.co"


class TaskError(ValueError):
    """Misuse of a task loader or a malformed dataset row; the message says what to fix."""


@dataclass(frozen=True)
class Task:
    """One benchmark item, ready to be shown to a team and scored."""

    id: str
    """Stable id, unique within the task and split, e.g. ``"gsm8k/test/17"``."""
    question: str
    """The text the agents see, already formatted (options listed, function signature for code)."""
    answer: str
    """Gold answer: number/LaTeX, option letter, BBH target, or ``""`` for code."""
    kind: str
    """How to score: ``"math"`` | ``"choice"`` | ``"exact"`` | ``"code"``."""
    meta: dict = field(default_factory=dict, compare=False)
    """Task-specific extras: tests, entry point, options, subject, matcher, source solution."""

    __hash__ = None  # type: ignore[assignment]  # meta is a dict; use Task.id as a key instead


KINDS = ("math", "choice", "exact", "code")

FREE_FORM = "free"
"""`Task.kind` of a free-form question (the Team API, an app): no gold answer, so no correctness reward;
agents get the generic answer instruction and the graph's context has `task=None`."""


@dataclass(frozen=True)
class Row:
    """A raw dataset record with the place it came from, so errors can point at it."""

    data: dict[str, Any]
    """The record as read from the file or the hub."""
    where: str
    """Human-readable location: ``"<file>, line 12"`` or ``"hub openai/gsm8k[test], row 3"``."""
    index: int
    """0-based position within its source; becomes part of the Task id."""

    def get(self, name: str) -> Any:
        """The field ``name``; raises TaskError naming the file, line and field when it is missing."""
        if name not in self.data:
            raise TaskError(
                f"{self.where}: missing field {name!r} (fields present: {sorted(self.data)}). "
                "Fix or regenerate the data file."
            )
        return self.data[name]


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local data folder to read (argument, else $MLPO_DATA_DIR), or None to use the hub."""
    source = "the data_dir argument"
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        source = f"${DATA_DIR_ENV}"
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise TaskError(
            f"data folder {str(path)!r} (from {source}) does not exist or is not a folder "
            f"(resolved to {str(path.resolve())!r}). Point at the benchmark folder with "
            f"--data-dir ../shared/data or {DATA_DIR_ENV}=../shared/data."
        )
    return path


def data_file(root: Path, *parts: str) -> Path:
    """``root/parts`` checked to exist, with a message saying where it looked."""
    path = root.joinpath(*parts)
    if not path.is_file():
        raise TaskError(
            f"expected data file {str(path)!r} inside data folder {str(root)!r}, but it does not exist. "
            "Check that the folder has the layout described in ../shared/data/README.md."
        )
    return path


def read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSON-lines file (optionally gzip-compressed); blank lines are skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[Row] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not valid JSON ({e.msg}).") from e
            if not isinstance(data, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(data).__name__}.")
            rows.append(Row(data, where, len(rows)))
    return rows


def read_json_examples(path: Path, key: str = "examples") -> list[Row]:
    """Rows of a JSON file holding ``{key: [record, ...]}`` (the BIG-Bench Hard layout)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}).") from e
    if not isinstance(doc, dict) or key not in doc:
        raise TaskError(f"{path}: missing top-level field {key!r}.")
    rows = []
    for i, data in enumerate(doc[key]):
        where = f"{path}, {key}[{i}]"
        if not isinstance(data, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(data).__name__}.")
        rows.append(Row(data, where, i))
    return rows


def hub_rows(
    repo: str, config: str | None, split: str, convert: Callable[[dict], dict] | None = None
) -> list[Row]:
    """Rows of a hub dataset via ``datasets``; fails fast with a clear message when offline."""
    where_name = f"hub {repo}" + (f"/{config}" if config else "") + f"[{split}]"
    hint = f"or read a local copy with --data-dir ../shared/data or {DATA_DIR_ENV}=../shared/data."
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("", "0"):
        raise TaskError(
            f"cannot load {where_name}: the hub is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE; mlpo-agents sets "
            f"HF_HUB_OFFLINE=1 unless you set it yourself: HF_HUB_OFFLINE=0 allows the download); {hint}"
        )
    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
    except OSError as e:
        raise TaskError(f"cannot load {where_name}: {HUB_HOST} is unreachable ({e}); {hint}") from e
    import datasets  # slow import; only needed on the hub path

    ds = datasets.load_dataset(repo, config, split=split)
    rows = []
    for i, data in enumerate(ds):
        data = dict(data)
        rows.append(Row(convert(data) if convert else data, f"{where_name}, row {i}", i))
    return rows


def check_choice(value: str | None, allowed: Iterable[str], what: str, task: str) -> None:
    """Raise TaskError listing ``allowed`` when ``value`` is not one of them."""
    allowed = list(allowed)
    if value not in allowed:
        raise TaskError(f"unknown {what} {value!r} for task {task!r}; valid: {', '.join(allowed)}.")


def sample(tasks: list[Task], limit: int | None, seed: int) -> list[Task]:
    """``limit`` tasks drawn without replacement by ``seed`` (kept in dataset order), or all of them."""
    if limit is not None and limit < 0:
        raise TaskError(f"limit must be >= 0, got {limit}.")
    if limit is None or limit >= len(tasks):
        return list(tasks)
    picked = sorted(random.Random(seed).sample(range(len(tasks)), limit))
    return [tasks[i] for i in picked]


def format_options(question: str, options: dict[str, str]) -> str:
    """The question followed by lettered options, one per line (``A. text``)."""
    lines = [question.strip(), "", "Options:"]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines)
