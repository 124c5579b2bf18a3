"""The append-only SQLite `TraceStore`, and the base class of the other stores' dialects (`trace_pg`)."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from mlpo_agents.trace_check import (
    TraceStoreError,
    check_columns,
    check_sqlite,
    refuse_read_only,
    sqlite_problem,
)
from mlpo_agents.trace_schema import (
    JSON_FIELDS,
    TABLES,
    Episode,
    Event,
    Failure,
    ModelCall,
    Reward,
    decode_column,
    encode_row,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
  episode_id TEXT PRIMARY KEY, task TEXT, task_id TEXT, team TEXT, topology TEXT, status TEXT,
  final_answer TEXT, started_at REAL, finished_at REAL, meta TEXT);
CREATE TABLE IF NOT EXISTS calls (
  call_id TEXT PRIMARY KEY, episode_id TEXT, node TEXT, role TEXT, agent TEXT, round INTEGER,
  group_id TEXT, sample_index INTEGER, messages TEXT, text TEXT, prompt_token_ids BLOB,
  completion_token_ids BLOB, logprobs BLOB, finish_reason TEXT, model TEXT, base_model TEXT,
  version TEXT, sampling TEXT, latency_s REAL, prompt_tokens INTEGER, completion_tokens INTEGER,
  parent_call_id TEXT, created_at REAL, meta TEXT);
CREATE INDEX IF NOT EXISTS calls_episode ON calls(episode_id);
CREATE TABLE IF NOT EXISTS rewards (
  id INTEGER PRIMARY KEY AUTOINCREMENT, episode_id TEXT, call_id TEXT, name TEXT, value REAL,
  created_at REAL, meta TEXT);
CREATE INDEX IF NOT EXISTS rewards_episode ON rewards(episode_id);
CREATE TABLE IF NOT EXISTS failures (
  id INTEGER PRIMARY KEY AUTOINCREMENT, episode_id TEXT, node TEXT, role TEXT, agent TEXT,
  round INTEGER, error_type TEXT, message TEXT, created_at REAL);
"""


WAL_PAGES_PER_CHECKPOINT = 4000
"""Write-ahead log pages (4 KB each) between automatic folds into the store file (SQLite's default: 1000);
`checkpoint` (after every run, on close) still folds all of it."""


class TraceStore:
    """Append-only event log in one SQLite file (WAL, one transaction per `append` batch).

    Opening checks the file before anything is written to it: a corrupted file, another application's
    database, a store missing columns or a read-only file raises `TraceStoreError` and is left untouched
    (the checks are in `mlpo_agents.trace_check`).
    Subclasses change the connection and the SQL dialect only (`PostgresTraceStore`).
    """

    placeholder = "?"
    order_column = "rowid"

    def __init__(self, path: str | Path = "runs/traces.sqlite"):
        self.path = Path(path)
        self.where = str(path)
        """How error messages name this store."""
        if self.where != ":memory:" and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._connect(str(path))
        self._insert_sql = {cls: self._insert_statement(cls) for cls in TABLES}

    def _connect(self, path: str) -> Any:
        if path != ":memory:" and self.path.exists():
            refuse_read_only(self.path)
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as e:
            raise TraceStoreError(f"cannot open the trace store {path} ({e}); pass another --traces path") from None
        try:
            if path != ":memory:":
                check_sqlite(db, self.path, self.where, TABLES)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # Fewer, larger folds of the log into the file: each one syncs to disk inside the call that
            # triggers it, and at SQLite's default these stalls were 10-15% of the mean time our code adds to
            # an episode (scripted models). Durability is unchanged: a committed row is in the log.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES_PER_CHECKPOINT}")
            db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            db.close()
            raise TraceStoreError(sqlite_problem(self.path, e)) from None
        except TraceStoreError:
            db.close()
            raise
        return db

    def _check_columns(self, columns: dict[str, set[str]]) -> None:
        """Refuse a store whose tables lack columns this version writes (`columns`: table -> its columns)."""
        check_columns(columns, self.where, TABLES)

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the store file, so the `.sqlite` file alone holds every event."""
        with self._lock:
            # Never wait on other writers or readers: fold what can be folded now (everything, when alone).
            timeout = self._db.execute("PRAGMA busy_timeout").fetchone()[0]
            self._db.execute("PRAGMA busy_timeout = 0")
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.execute(f"PRAGMA busy_timeout = {int(timeout)}")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql.replace("?", self.placeholder), list(args)).fetchall()

    def _write(self, statements: list[tuple[str, list[Any]]]) -> None:
        """Run insert statements in one transaction."""
        with self._lock:
            if len(statements) == 1:  # one statement is its own transaction (autocommit): as atomic, as durable
                self._db.execute(*statements[0])
                return
            self._db.execute("BEGIN")
            try:
                for sql, row in statements:
                    self._db.execute(sql, row)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _insert_statement(self, cls: type) -> str:
        names = [f.name for f in fields(cls)]
        values = ", ".join([self.placeholder] * len(names))
        sql = f"INSERT INTO {TABLES[cls]} ({', '.join(names)}) VALUES ({values})"
        if cls is Episode:  # an episode row is written when it starts and updated when it ends
            updates = ", ".join(f"{n} = excluded.{n}" for n in names if n != "episode_id")
            sql += f" ON CONFLICT(episode_id) DO UPDATE SET {updates}"
        return sql

    # ---- writing -------------------------------------------------------------------------------
    def append(self, events: Sequence[Event] | Event) -> None:
        """Write a batch of events in one transaction. Episodes are upserted (status changes)."""
        batch = [events] if not isinstance(events, Sequence) else events
        self._write([(self._insert_sql[type(ev)], encode_row(ev)) for ev in batch])

    # ---- reading -------------------------------------------------------------------------------
    def _select(self, cls: type, where: str = "", args: Sequence[Any] = ()) -> list[Any]:
        names = [f.name for f in fields(cls)]
        rows = self._query(f"SELECT {', '.join(names)} FROM {TABLES[cls]} {where} ORDER BY {self.order_column}", args)
        return [cls(**{n: decode_column(n, v) for n, v in zip(names, row, strict=True)}) for row in rows]

    @staticmethod
    def _where(**filters: Any) -> tuple[str, list[Any]]:
        parts: list[str] = []
        args: list[Any] = []
        for key, value in filters.items():
            if value is None:
                continue
            if isinstance(value, list | tuple | set):
                parts.append(f"{key} IN ({', '.join('?' * len(value))})")
                args.extend(value)
            else:
                parts.append(f"{key} = ?")
                args.append(value)
        return ("WHERE " + " AND ".join(parts)) if parts else "", args

    def episodes(self, *, status: str | None = None, task: str | None = None, team: str | None = None) -> list[Episode]:
        """Episodes in insertion order, optionally filtered."""
        return self._select(Episode, *self._where(status=status, task=task, team=team))

    def calls(
        self,
        *,
        episode_id: str | Sequence[str] | None = None,
        role: str | Sequence[str] | None = None,
        group_id: str | None = None,
    ) -> list[ModelCall]:
        """Model calls in the order they were recorded."""
        return self._select(ModelCall, *self._where(episode_id=episode_id, role=role, group_id=group_id))

    def rewards(self, *, episode_id: str | Sequence[str] | None = None, name: str | None = None) -> list[Reward]:
        """Reward events in the order they were recorded."""
        return self._select(Reward, *self._where(episode_id=episode_id, name=name))

    def failures(self, *, episode_id: str | Sequence[str] | None = None) -> list[Failure]:
        """Failure events in the order they were recorded."""
        return self._select(Failure, *self._where(episode_id=episode_id))

    def finished_task_ids(self, task: str, team: str) -> set[str]:
        """Task ids with a finished episode (done or degraded) for this task and team: what --resume skips."""
        rows = self._query(
            "SELECT task_id FROM episodes WHERE task = ? AND team = ? AND status IN ('done', 'degraded')",
            (task, team),
        )
        return {r[0] for r in rows}

    def unfinished_episodes(self, task: str, team: str) -> dict[str, str]:
        """task_id -> id of its latest episode that never finished (running, failed or interrupted):
        what checkpoints resume."""
        rows = self._query(
            "SELECT task_id, episode_id FROM episodes WHERE task = ? AND team = ? "
            f"AND status IN ('running', 'failed', 'interrupted') ORDER BY {self.order_column}",
            (task, team),
        )
        return dict(rows)

    def mark_interrupted(self, task: str, team: str, keep: Iterable[str] = ()) -> int:
        """Mark this task and team's `running` episodes (left by a killed run) `interrupted`, except `keep`.

        Returns how many were marked. The resuming run calls this before it starts its own episodes.
        """
        kept = set(keep)
        ids = [r[0] for r in self._query("SELECT episode_id FROM episodes WHERE task = ? AND team = ? AND "
                                         "status = 'running'", (task, team)) if r[0] not in kept]
        update = f"UPDATE episodes SET status = 'interrupted' WHERE episode_id = {self.placeholder}"
        self._write([(update, [i]) for i in ids])
        return len(ids)

    def iter_events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every event as (kind, dict), kinds in table order: episodes, calls, rewards, failures."""
        for cls, table in TABLES.items():
            for ev in self._select(cls):
                yield table, asdict(ev)

    # ---- export --------------------------------------------------------------------------------
    def export_jsonl(self, path: str | Path) -> int:
        """Write every event as one JSON line `{"kind": ..., **fields}`; returns the number of lines."""
        n = 0
        with open(path, "w") as f:
            for kind, row in self.iter_events():
                f.write(json.dumps({"kind": kind, **row}) + "\n")
                n += 1
        return n

    def export_parquet(self, folder: str | Path) -> list[Path]:
        """Write one Parquet file per event kind into `folder` (episodes, calls, rewards, failures)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out_dir = Path(folder)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for cls, table in TABLES.items():
            rows = [asdict(ev) for ev in self._select(cls)]
            for row in rows:
                for key in JSON_FIELDS & row.keys():
                    row[key] = json.dumps(row[key])
            names = [f.name for f in fields(cls)]
            tbl = pa.Table.from_pylist(rows) if rows else pa.table({n: [] for n in names})
            path = out_dir / f"{table}.parquet"
            pq.write_table(tbl, path)
            written.append(path)
        return written

    def close(self) -> None:
        """Close the database connection."""
        if self.where != ":memory:":
            self.checkpoint()
        with self._lock:
            self._db.close()

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
