"""`mlpo train` flags generated from the trainer config dataclasses, read from their source with `ast`.

Every field of `MLPOConfig`, `MAGRPOConfig` and `MALTConfig` (and of the `RunConfig` / `PolicyGradientConfig`
they subclass) whose type is a str, int, float or bool (optionally `| None`) is a flag, `--field-name`, with
the first sentence of the field's attribute docstring as its help; other fields (dicts, tuples) are set with
`--set field=value`. Booleans are `--flag` / `--no-flag`. A flag some algorithms do not take is marked
`[--algo ... only]`; a field whose docstring starts with "Not supported" exists only so that its flag is
refused with the reason, and does not count as taken.

The sources are parsed rather than imported so that `mlpo train --help` stays fast (the trainers import
torch); tests/test_docs_friction.py checks the result against `dataclasses.fields`.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCALARS = {"str": str, "int": int, "float": float, "bool": bool}
REFUSED = "Not supported"


@dataclass(frozen=True)
class FieldInfo:
    """One config field as its source declares it."""

    name: str
    annotation: str
    """The annotation as written, e.g. `float | None`."""
    doc: str
    """The attribute docstring, whitespace collapsed ('' when none)."""

    @property
    def kind(self) -> type | None:
        """The flag's value type (str, int, float, bool), None for fields set with `--set` only."""
        parts = [p.strip() for p in self.annotation.split("|") if p.strip() != "None"]
        return SCALARS.get(parts[0]) if len(parts) == 1 else None

    @property
    def refused(self) -> bool:
        """Kept only so that the flag fails with the reason."""
        return self.doc.startswith(REFUSED)


def _classes(module: str) -> tuple[dict[str, ast.ClassDef], dict[str, str]]:
    tree = ast.parse((HERE / f"{module}.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    aliases = {  # `Aggregation = str`
        t.id: n.value.id
        for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Name)
        for t in n.targets if isinstance(t, ast.Name)
    }  # fmt: skip
    return classes, aliases


@functools.cache
def config_fields(module: str, class_name: str) -> tuple[FieldInfo, ...]:
    """The fields of dataclass `class_name` of `trainers/<module>.py`, inherited ones first (as
    `dataclasses.fields` orders them); base classes are looked up there and in `trainers/common.py`."""
    classes, aliases = _classes("common")
    own_classes, own_aliases = _classes(module)
    classes, aliases = {**classes, **own_classes}, {**aliases, **own_aliases}

    def fields_of(name: str) -> dict[str, FieldInfo]:
        node = classes[name]
        found: dict[str, FieldInfo] = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                found.update(fields_of(base.id))
        body = node.body
        for i, item in enumerate(body):
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            annotation = ast.unparse(item.annotation)
            if "ClassVar" in annotation:
                continue
            annotation = " | ".join(aliases.get(p.strip(), p.strip()) for p in annotation.split("|"))
            after = body[i + 1] if i + 1 < len(body) else None
            doc = ""
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                doc = " ".join(after.value.value.split())
            found[item.target.id] = FieldInfo(item.target.id, annotation, doc)  # an override keeps its place
        return found

    return tuple(fields_of(class_name).values())


def _first_sentence(doc: str) -> str:
    match = re.match(r"(.+?\.)(\s|$)", doc)
    return (match.group(1) if match else doc).rstrip(".")


@functools.cache
def train_flags(algos: tuple[tuple[str, str, str], ...]) -> tuple[dict[str, tuple[type, str]], dict[str, tuple[str, ...]]]:
    """(flags, flag algos) for `algos` = ((algo, module, config class), ...): flag -> (type, help) in the order
    of the configs' fields, and flag -> the algorithms that take it, for the flags not every one takes."""
    kinds: dict[str, type] = {}
    docs: dict[str, dict[str, str]] = {}
    takers: dict[str, list[str]] = {}
    for algo, module, class_name in algos:
        for f in config_fields(module, class_name):
            if f.kind is None:
                continue
            if kinds.setdefault(f.name, f.kind) is not f.kind:
                raise TypeError(f"config field {f.name!r} is a {kinds[f.name].__name__} in one trainer and a "
                                f"{f.kind.__name__} in {class_name}: give it one type or another name")
            takers.setdefault(f.name, [])
            if not f.refused:
                takers[f.name].append(algo)
                if f.doc:
                    docs.setdefault(f.name, {})[algo] = _first_sentence(f.doc)
    flags: dict[str, tuple[type, str]] = {}
    for name, kind in kinds.items():
        by_text: dict[str, list[str]] = {}
        for algo, doc in docs.get(name, {}).items():
            by_text.setdefault(doc, []).append(algo)
        if len(by_text) <= 1:
            text = next(iter(by_text), name.replace("_", " "))
        else:
            text = "; ".join(f"{', '.join(algos_)}: {doc}" for doc, algos_ in by_text.items())
        flags[name] = (kind, text)
    every = [algo for algo, _, _ in algos]
    only = {name: tuple(algos_) for name, algos_ in takers.items() if algos_ != every}
    return flags, only
