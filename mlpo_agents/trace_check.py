"""Integrity checks a trace store passes before anything is written to it.

Opening a store must never damage what is already there, so an existing file is checked read-only first:
a corrupted SQLite file, another application's database, a store of an older version missing columns, a
read-only file or folder each raise `TraceStoreError` with a one-line message that names the problem and
the fix, and the file is left untouched. `TraceStore` (SQLite) and `PostgresTraceStore` call these checks;
the event types are in `mlpo_agents.trace_schema`, the stores in `trace_sqlite` and `trace_pg`.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import fields
from pathlib import Path


class TraceStoreError(ValueError):
    """A trace store that cannot be used as it is (corrupted, another app's file, read-only); says the fix."""


def check_sqlite(db: sqlite3.Connection, path: Path, where: str, tables: dict[type, str]) -> None:
    """Read-only checks of an existing file: intact, ours (or empty), writable. Raises TraceStoreError.

    `tables` maps event types to their tables (`trace_schema.TABLES`); `where` names the store in messages.
    """
    problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        found = " ".join("; ".join(problems).split())[:200]
        raise TraceStoreError(
            f"the trace store {path} is corrupted ({found}); "
            "restore it from a backup or pass a new --traces path"
        )
    present = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
               if not r[0].startswith("sqlite_")]
    ours = set(tables.values())
    if present and not ours & set(present):
        raise TraceStoreError(
            f"{path} is not a trace store (it holds the tables {', '.join(sorted(present)[:5])} of "
            "another application); pass a new --traces path"
        )
    check_columns(
        {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in ours & set(present)}, where, tables
    )
    # A write that is rolled back: fails on a file SQLite could only open read-only, changes nothing.
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.execute(f"PRAGMA user_version = {int(version)}")
    finally:
        db.execute("ROLLBACK")


def check_columns(columns: dict[str, set[str]], where: str, tables: dict[type, str]) -> None:
    """Refuse a store whose tables lack columns this version writes (`columns`: table -> its columns)."""
    for cls, table in tables.items():
        if table not in columns:
            continue
        missing = [f.name for f in fields(cls) if f.name not in columns[table]]
        if missing:
            raise TraceStoreError(
                f"{where} is not a trace store of this version: table {table} lacks the columns "
                f"{', '.join(missing)}; pass a new --traces path"
            )


def refuse_read_only(path: Path) -> None:
    """A file without write permission (even for root) or a folder SQLite cannot add its -wal file to."""
    if not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222:
        raise TraceStoreError(
            f"the trace store {path} is read-only; make it writable (chmod u+w {path}) or pass another --traces path"
        )
    if not os.access(path.parent, os.W_OK):
        raise TraceStoreError(
            f"the folder of the trace store {path} is read-only (SQLite writes {path.name}-wal beside it); "
            "make it writable or pass another --traces path"
        )


def sqlite_problem(path: Path, error: sqlite3.DatabaseError) -> str:
    """One line for an SQLite error met while opening `path`: what is wrong and what to do."""
    if "readonly" in str(error):
        return f"the trace store {path} is read-only ({error}); make it writable or pass another --traces path"
    if "locked" in str(error) or "busy" in str(error):
        return f"the trace store {path} is locked by another process ({error}); retry, or pass another --traces path"
    try:
        with open(path, "rb") as f:
            is_sqlite = f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return f"cannot open the trace store {path} ({error}); pass another --traces path"
    if is_sqlite:
        return f"the trace store {path} is corrupted ({error}); restore it from a backup or pass a new --traces path"
    return f"{path} is not a trace store (not an SQLite file: {error}); pass another --traces path"
