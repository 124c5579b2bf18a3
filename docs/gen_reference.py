"""Reference sections generated from the code, so they cannot drift from it.

Used as an MkDocs hook (`hooks:` in mkdocs.yml): every page line of the form
`<!-- reference: KIND TARGET -->` is replaced by the section it names when the site is built.

- `pydantic mlpo_agents.config:TeamConfig`: every field of a pydantic model (and of the models it nests),
  with type, default and docstring.
- `dataclass mlpo_agents.trainers.mlpo:MLPOConfig`: every field of a config dataclass, the same way;
  field docstrings are read from the source of the class and its bases.
- `docstring mlpo_agents.trainers.mlpo`: a module docstring as Markdown (lists kept).
- `cli`: every `mlpo` subcommand and option, from `mlpo_agents.cli.build_parser()`.
- `trace-schema`: every table and column of the trace store, from `mlpo_agents.trace_schema` and `trace_sqlite`.

`python docs/gen_reference.py PAGE.md` prints a page with its sections expanded.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
import typing
from typing import Any

MARKER = re.compile(r"^<!-- reference: (\S+)(?: (\S+))? -->$", re.M)


def expand(markdown: str) -> str:
    """`markdown` with every reference marker replaced by its generated section."""
    return MARKER.sub(lambda m: render(m.group(1), m.group(2)), markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs hook: expand the reference markers of every page."""
    return expand(markdown)


def render(kind: str, target: str | None) -> str:
    """The Markdown of one reference section."""
    if kind == "pydantic":
        return pydantic_reference(_load(target))
    if kind == "dataclass":
        return dataclass_reference(_load(target))
    if kind == "docstring":
        name = _need(target)
        return module_docstring(_load(name) if ":" in name else importlib.import_module(name))
    if kind == "cli":
        return cli_reference()
    if kind == "trace-schema":
        return trace_schema()
    raise ValueError(f"unknown reference kind {kind!r}; use pydantic, dataclass, docstring, cli or trace-schema")


def _need(target: str | None) -> str:
    if not target:
        raise ValueError("this reference kind needs a target, e.g. `module:Class`")
    return target


def _load(target: str | None) -> Any:
    module, _, name = _need(target).partition(":")
    return getattr(importlib.import_module(module), name)


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(hint: Any) -> str:
    if isinstance(hint, str):
        return hint
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def _code(value: Any) -> str:
    return f"`{_cell(repr(value))}`"


# ------------------------------------------------------------------------------------------- config models


def pydantic_reference(model: Any) -> str:
    """Tables of a pydantic model's fields, then of each nested model (field docstrings as descriptions)."""
    out, seen, queue = [], set(), [model]
    while queue:
        cls = queue.pop(0)
        if cls in seen:
            continue
        seen.add(cls)
        out.append(f"### `{cls.__name__}`\n\n{inspect.getdoc(cls) or ''}\n")
        out.append("| field | type | default | description |\n|---|---|---|---|")
        for name, field in cls.model_fields.items():
            if field.is_required():
                default = "**required**"
            elif field.default_factory is not None:
                default = _code(field.default_factory())
            else:
                default = _code(field.default)
            out.append(f"| `{name}` | `{_cell(_type(field.annotation))}` | {default} | {_cell(field.description or '')} |")
            for arg in [field.annotation, *typing.get_args(field.annotation)]:
                if isinstance(arg, type) and hasattr(arg, "model_fields") and arg not in seen:
                    queue.append(arg)
        out.append("")
    return "\n".join(out)


def field_docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under a field) of a class and its bases, read from source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def dataclass_reference(cls: type) -> str:
    """A table of a config dataclass's fields: name, type, default, docstring (own and inherited)."""
    docs = field_docstrings(cls)
    hints = typing.get_type_hints(cls)
    rows = [f"`{cls.__name__}` ({cls.__module__}): {inspect.getdoc(cls) or ''}\n",
            "| field | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = _code(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _code(f.default_factory())
        else:
            default = "**required**"
        rows.append(f"| `{f.name}` | `{_cell(_type(hints.get(f.name, f.type)))}` | {default} | {_cell(docs.get(f.name, ''))} |")
    return "\n".join(rows) + "\n"


def module_docstring(obj: Any) -> str:
    """A docstring as Markdown: paragraphs as written, "- " and "1." lists kept as lists (nested by indent)."""
    out: list[str] = []
    for line in (inspect.getdoc(obj) or "").splitlines():
        stripped = line.lstrip()
        item = re.match(r"(- |\d+\. )", stripped)
        if item and out and out[-1].strip() and not re.match(r"\s*(- |\d+\. )", out[-1]) and not out[-1][:1].isspace():
            out.append("")  # Markdown starts a list only after a blank line
        indent = len(line) - len(stripped)
        # Python-Markdown nests list items by 4 spaces; docstrings nest by 2.
        out.append(" " * (4 * (indent // 2)) + stripped if item else line)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------- CLI


def cli_reference() -> str:
    """Every `mlpo` subcommand: its usage and a table of its options."""
    from mlpo_agents.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = [f"`mlpo` without a subcommand runs `mlpo run`. {parser.description.splitlines()[0]}\n"]
    for name, command in sub.choices.items():
        command.prog = f"mlpo {name}"
        usage = " ".join(command.format_usage().split()).removeprefix("usage: ")
        out.append(f"## `mlpo {name}`\n\n{helps.get(name) or ''}\n")
        if command.description and command.description != helps.get(name):
            out.append(f"{command.description}\n")
        out.append(f"```text\n{textwrap.fill(usage, 100, subsequent_indent='    ', break_on_hyphens=False)}\n```\n")
        out.append("| option | value | default | description |\n|---|---|---|---|")
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}` (positional)"
            if action.choices:
                value = " \\| ".join(f"`{c}`" for c in action.choices)
            elif action.nargs == 0:
                value = "(switch)"
            else:
                value = f"`{action.metavar or action.dest.upper()}`"
            default = "" if action.default in (None, False, argparse.SUPPRESS) else _code(action.default)
            out.append(f"| {flags} | {value} | {default} | {_cell(action.help or '')} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- trace schema


def trace_schema() -> str:
    """Every table and column of the trace store, with its SQL type and the event field's docstring."""
    from mlpo_agents import trace_schema, trace_sqlite

    field_docs = {cls: field_docstrings(cls) for cls in trace_schema.TABLES}
    out = []
    for table, columns in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*?)\);", trace_sqlite._SCHEMA, flags=re.S):
        cls = next(c for c, t in trace_schema.TABLES.items() if t == table)
        hints = typing.get_type_hints(cls)
        out.append(f"### `{table}`\n\nOne row per `{cls.__name__}` event: {inspect.getdoc(cls)}\n")
        out.append("| column | SQL type | Python value | notes |\n|---|---|---|---|")
        for column in columns.split(","):
            name, sql_type, *rest = column.split()
            if name in trace_schema.INT_ARRAYS:
                note = "packed int32, native byte order (little-endian here): 4 bytes per token id"
            elif name in trace_schema.FLOAT_ARRAYS:
                note = "packed float32, native byte order: 4 bytes per completion token"
            elif name in trace_schema.JSON_FIELDS:
                note = "JSON text"
            else:
                note = ""
            python = _type(hints[name]) if name in hints else "int (row id, not an event field)"
            doc = field_docs[cls].get(name, "")
            extra = " ".join(rest).lower()
            notes = "; ".join(x for x in (note, doc, extra) if x)
            out.append(f"| `{name}` | {sql_type} | `{_cell(python)}` | {_cell(notes)} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    for page in sys.argv[1:]:
        with open(page) as f:
            print(expand(f.read()))
