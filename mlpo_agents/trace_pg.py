"""The trace store on PostgreSQL, for many writers (several rollout processes, a trainer reading).

Same events, same API and same encoding as the SQLite `TraceStore`; only the connection and the SQL
dialect differ. Needs `pip install 'mlpo-agents[postgres]'` (psycopg 3).

    store = open_store("postgresql://user@127.0.0.1:5432/traces")
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlpo_agents.trace_schema import TABLES
from mlpo_agents.trace_sqlite import TraceStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
  seq BIGSERIAL, episode_id TEXT PRIMARY KEY, task TEXT, task_id TEXT, team TEXT, topology TEXT,
  status TEXT, final_answer TEXT, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION, meta TEXT);
CREATE TABLE IF NOT EXISTS calls (
  seq BIGSERIAL, call_id TEXT PRIMARY KEY, episode_id TEXT, node TEXT, role TEXT, agent TEXT,
  round INTEGER, group_id TEXT, sample_index INTEGER, messages TEXT, text TEXT, prompt_token_ids BYTEA,
  completion_token_ids BYTEA, logprobs BYTEA, finish_reason TEXT, model TEXT, base_model TEXT,
  version TEXT, sampling TEXT, latency_s DOUBLE PRECISION, prompt_tokens INTEGER,
  completion_tokens INTEGER, parent_call_id TEXT, created_at DOUBLE PRECISION, meta TEXT);
CREATE INDEX IF NOT EXISTS calls_episode ON calls(episode_id);
CREATE TABLE IF NOT EXISTS rewards (
  seq BIGSERIAL PRIMARY KEY, episode_id TEXT, call_id TEXT, name TEXT, value DOUBLE PRECISION,
  created_at DOUBLE PRECISION, meta TEXT);
CREATE INDEX IF NOT EXISTS rewards_episode ON rewards(episode_id);
CREATE TABLE IF NOT EXISTS failures (
  seq BIGSERIAL PRIMARY KEY, episode_id TEXT, node TEXT, role TEXT, agent TEXT, round INTEGER,
  error_type TEXT, message TEXT, created_at DOUBLE PRECISION);
"""


class PostgresTraceStore(TraceStore):
    """TraceStore on a PostgreSQL database (one transaction per `append` batch, rows ordered by `seq`)."""

    placeholder = "%s"
    order_column = "seq"

    def __init__(self, url: str):
        self.path = Path(url)
        self.url = url
        self.where = url
        self._lock = threading.Lock()
        self._db = self._connect(url)
        self._insert_sql = {cls: self._insert_statement(cls) for cls in TABLES}

    def _connect(self, url: str) -> Any:
        try:
            import psycopg
        except ImportError:
            raise ValueError("Postgres trace stores need psycopg: pip install 'mlpo-agents[postgres]'") from None
        try:
            db = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot connect to the trace store at {url} ({first}); is the server up?") from None
        rows = db.execute("SELECT table_name, column_name FROM information_schema.columns "
                          "WHERE table_schema = current_schema()").fetchall()
        columns: dict[str, set[str]] = {}
        for table, column in rows:
            columns.setdefault(table, set()).add(column)
        try:
            self._check_columns(columns)  # before creating anything: a refused database is left as it was
        except BaseException:
            db.close()
            raise
        with db.transaction():
            db.execute(_SCHEMA)
        return db

    def checkpoint(self) -> None:
        """Nothing to fold: a PostgreSQL server keeps its own files whole."""

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            rows = self._db.execute(sql.replace("?", self.placeholder), list(args)).fetchall()
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]

    def _write(self, statements: list[tuple[str, list[Any]]]) -> None:
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            for sql, row in statements:
                cur.execute(sql, row)
