"""`mlpo ui`: a local, read-only web page for a trace store and the training runs beside it.

`mlpo ui --traces runs/traces.sqlite [--run-dir RUN ...]` serves, on 127.0.0.1:8765 by default:

- `/`: the page (`ui_page.html`, self-contained: no CDN, nothing fetched from the network);
- `/api/runs`: the store's episodes grouped by team and task, and the training run folders;
- `/api/episodes?status=&task=&team=&version=&q=&limit=`: episodes newest first, with their calls'
  tokens, latency and model versions and their episode-level rewards;
- `/api/episode/<id>`: one episode, its calls (messages, completion token ids, logprobs and, when the
  base model's tokenizer is on this machine, each token's text), rewards and failures;
- `/api/curves?run=NAME` (and `/api/curves/NAME.png`): a run folder's metrics.jsonl (and curves.png).

The page polls these every few seconds, so it follows a run while it writes. Stores are opened
read-only: SQLite through a `mode=ro` URI, PostgreSQL in read-only transactions; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sqlite3
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from mlpo_agents.trace import TABLES, Episode, TraceStore
from mlpo_agents.trace_check import TraceStoreError, check_columns, sqlite_problem

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 8765
POLL_SECONDS = 3
MAX_EPISODES = 500
"""Rows `/api/episodes` returns by default (the newest); `limit=N` asks for more."""


def _not_a_store(where: str, present: set[str]) -> TraceStoreError:
    found = f"it holds the tables {', '.join(sorted(present)[:5])}" if present else "it holds no tables"
    return TraceStoreError(f"{where} is not a trace store ({found}); pass the --traces path `mlpo run` wrote")


class ReadOnlySQLiteStore(TraceStore):
    """A `TraceStore` on an SQLite file opened with `mode=ro`: reads see a running writer's commits."""

    def _connect(self, path: str) -> Any:
        uri, ours = self.path.resolve().as_uri(), set(TABLES.values())
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
        try:
            try:
                present = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            except sqlite3.OperationalError as e:
                if "unable to open" not in str(e):
                    raise
                db.close()  # a folder SQLite cannot add the -shm file to: read the file as it is
                db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)
                present = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not ours <= present:
                raise _not_a_store(path, present)
            check_columns({t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in ours}, path, TABLES)
        except sqlite3.DatabaseError as e:
            db.close()
            raise TraceStoreError(sqlite_problem(self.path, e)) from None
        except TraceStoreError:
            db.close()
            raise
        return db

    def checkpoint(self) -> None:
        """Nothing to fold: a reader leaves the write-ahead log to the writer."""

    def _write(self, statements: list[tuple[str, list[Any]]]) -> None:
        raise TraceStoreError(f"{self.where} is open read-only")


def _postgres_store(url: str) -> TraceStore:
    from mlpo_agents.trace_pg import PostgresTraceStore

    class ReadOnlyPostgresStore(PostgresTraceStore):
        """A `PostgresTraceStore` whose session only runs read-only transactions; creates no tables."""

        def _connect(self, url: str) -> Any:
            try:
                import psycopg
            except ImportError:
                raise ValueError("Postgres trace stores need psycopg: pip install 'mlpo-agents[postgres]'") from None
            try:
                db = psycopg.connect(url, autocommit=True, options="-c default_transaction_read_only=on")
            except psycopg.OperationalError as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(f"cannot connect to the trace store at {url} ({first}); is the server up?") from None
            columns: dict[str, set[str]] = {}
            for table, column in db.execute("SELECT table_name, column_name FROM information_schema.columns "
                                            "WHERE table_schema = current_schema()").fetchall():
                columns.setdefault(table, set()).add(column)
            if not set(TABLES.values()) <= set(columns):
                db.close()
                raise _not_a_store(url, set(columns))
            try:
                self._check_columns(columns)
            except TraceStoreError:
                db.close()
                raise
            return db

        def _write(self, statements: list[tuple[str, list[Any]]]) -> None:
            raise TraceStoreError(f"{self.where} is open read-only")

    return ReadOnlyPostgresStore(url)


def open_read_only(url: str | Path) -> TraceStore:
    """Open a trace store (an SQLite path or a `postgresql://` URL) for reading only; one-line errors."""
    text = str(url)
    if text.startswith(("postgres://", "postgresql://")):
        return _postgres_store(text)
    if not Path(text).is_file():
        raise TraceStoreError(f"no trace store at {text}; run `mlpo run` first or pass --traces")
    return ReadOnlySQLiteStore(text)


# ---- tokens ------------------------------------------------------------------------------------------
class Tokenizers:
    """Each base model's tokenizer when it is on this machine (never downloaded); None otherwise."""

    def __init__(self) -> None:
        self._found: dict[str, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def folder(base_model: str) -> Path | None:
        """The local folder that holds `base_model`'s tokenizer.json, if any."""
        if base_model.startswith("path:"):
            candidates = [Path(base_model[5:])]
        else:
            cache = Path(os.environ.get("MLPO_CACHE_DIR") or Path.home() / ".cache" / "mlpo-agents")
            candidates = [cache / "models" / base_model]
            if base_model == "smollm2-135m" and os.environ.get("MLPO_SMOLLM2_PATH"):
                candidates.insert(0, Path(os.environ["MLPO_SMOLLM2_PATH"]).expanduser())
        return next((c for c in candidates if (c / "tokenizer.json").is_file()), None)

    def get(self, base_model: str) -> Any:
        with self._lock:
            if base_model not in self._found:
                self._found[base_model] = self._load(base_model)
            return self._found[base_model]

    def _load(self, base_model: str) -> Any:
        try:
            if base_model == "tiny-test":  # built in memory from fixed strings, no file
                from mlpo_agents.zoo import build_tiny_tokenizer

                return build_tiny_tokenizer().backend_tokenizer
            folder = self.folder(base_model)
            if folder is None:
                return None
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # a broken local tokenizer: show token ids, say why once
            print(f"mlpo ui: tokenizer of {base_model} not usable ({e}); showing token ids", file=sys.stderr)
            return None

    def texts(self, base_model: str, ids: Sequence[int]) -> list[str] | None:
        """Each token's text (special tokens kept), or None when the tokenizer is not on this machine."""
        tok = self.get(base_model)
        if tok is None:
            return None
        return [tok.decode([i], skip_special_tokens=False) for i in ids]


# ---- the data the page shows -------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity inside it made None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Viewer:
    """Reads a trace store and run folders into the JSON the page polls."""

    def __init__(self, store: TraceStore, run_dirs: Sequence[str | Path] = ()):
        self.store = store
        self.runs: dict[str, Path] = {}
        for folder in map(Path, run_dirs):
            name, n = folder.resolve().name or str(folder), 2
            while name in self.runs:
                name, n = f"{folder.resolve().name}-{n}", n + 1
            self.runs[name] = folder
        self.tokenizers = Tokenizers()

    def _call_stats(self) -> dict[str, dict[str, Any]]:
        stats: dict[str, dict[str, Any]] = {}
        rows = self.store._query("SELECT episode_id, version, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
                                 "SUM(latency_s) FROM calls GROUP BY episode_id, version")
        for eid, version, n, prompt, completion, latency in rows:
            s = stats.setdefault(eid, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "call_s": 0.0,
                                       "versions": []})
            s["calls"] += n
            s["prompt_tokens"] += prompt or 0
            s["completion_tokens"] += completion or 0
            s["call_s"] += latency or 0.0
            s["versions"] = sorted({*s["versions"], version}, key=_natural)
        return stats

    def _episode_rewards(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for eid, name, value in self.store._query("SELECT episode_id, name, value FROM rewards WHERE call_id IS NULL"):
            out.setdefault(eid, {})[name] = value
        return out

    def episodes(self, query: dict[str, str]) -> dict[str, Any]:
        """Episodes newest first with their call totals and rewards, filtered by `query`."""
        stats, rewards = self._call_stats(), self._episode_rewards()
        failures = dict(self.store._query("SELECT episode_id, COUNT(*) FROM failures GROUP BY episode_id"))
        rows = []
        needle = query.get("q", "").lower()
        for e in reversed(self.store.episodes()):
            s = stats.get(e.episode_id, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "call_s": 0.0,
                                         "versions": []})
            if any(query.get(k) and query[k] != getattr(e, k) for k in ("status", "task", "team")):
                continue
            if query.get("version") and query["version"] not in s["versions"]:
                continue
            if needle and needle not in " ".join(map(str, (e.episode_id, e.task_id, e.final_answer))).lower():
                continue
            wall = e.finished_at - e.started_at if e.finished_at else None
            rows.append({**{k: getattr(e, k) for k in ("episode_id", "task", "task_id", "team", "topology", "status",
                                                       "final_answer", "started_at", "finished_at")},
                         **s, "wall_s": wall, "rewards": rewards.get(e.episode_id, {}),
                         "failures": failures.get(e.episode_id, 0)})
        limit = int(query.get("limit") or MAX_EPISODES)
        return {"total": len(rows), "episodes": rows[:limit]}

    def runs_summary(self) -> dict[str, Any]:
        """The store's episodes by team and task (statuses, accuracy, versions) and the run folders."""
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        stats, rewards = self._call_stats(), self._episode_rewards()
        for e in self.store.episodes():
            g = groups.setdefault((e.team, e.task), {"team": e.team, "task": e.task, "episodes": 0, "status": {},
                                                    "correct": [], "versions": set(), "completion_tokens": 0})
            g["episodes"] += 1
            g["status"][e.status] = g["status"].get(e.status, 0) + 1
            correct = rewards.get(e.episode_id, {}).get("correct")
            if isinstance(correct, int | float) and math.isfinite(correct):  # a failed checker's NaN is left out
                g["correct"].append(correct)
            s = stats.get(e.episode_id, {})
            g["versions"].update(s.get("versions", []))
            g["completion_tokens"] += s.get("completion_tokens", 0)
        for g in groups.values():
            scored = g.pop("correct")
            g["accuracy"] = sum(scored) / len(scored) if scored else None
            g["versions"] = sorted(g["versions"], key=_natural)
        folders = []
        for name, folder in self.runs.items():
            metrics = _metrics(folder / "metrics.jsonl")
            last: dict[str, Any] = {}
            for row in metrics:  # each metric's latest value (eval rows and training rows hold different keys)
                last.update(row)
            folders.append({"name": name, "path": str(folder), "steps": len(metrics), "last": last or None,
                            "png": (folder / "curves.png").is_file()})
        return {"store": self.store.where, "groups": list(groups.values()), "run_dirs": folders,
                "poll_seconds": POLL_SECONDS}

    def episode(self, episode_id: str) -> dict[str, Any] | None:
        """One episode with its calls (token texts when the tokenizer is local), rewards and failures."""
        found = self.store._select(Episode, *self.store._where(episode_id=episode_id))
        if not found:
            return None
        calls = []
        for c in self.store.calls(episode_id=episode_id):
            row = asdict(c)
            row.pop("prompt_token_ids")  # the prompt is shown as messages; its length is prompt_tokens
            row["token_texts"] = self.tokenizers.texts(c.base_model, c.completion_token_ids)
            calls.append(row)
        return {"episode": asdict(found[0]), "calls": calls,
                "rewards": [asdict(r) for r in self.store.rewards(episode_id=episode_id)],
                "failures": [asdict(f) for f in self.store.failures(episode_id=episode_id)]}

    def curves(self, name: str) -> dict[str, Any] | None:
        """A run folder's metrics as series: metric -> [[step, value], ...] (numbers only)."""
        folder = self.runs.get(name)
        if folder is None:
            return None
        series: dict[str, list[list[float]]] = {}
        for i, row in enumerate(_metrics(folder / "metrics.jsonl")):
            step = row.get("step", i)
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, int | float) and not isinstance(value, bool):
                    if math.isfinite(value):
                        series.setdefault(key, []).append([step, value])
        return {"name": name, "path": str(folder), "series": series, "png": (folder / "curves.png").is_file()}


def _natural(text: str) -> list[Any]:
    """Sort key that puts step-2 before step-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line still being written (not yet valid JSON) is skipped."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ---- HTTP --------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    """GET only: the page, the JSON endpoints and curves.png. Errors are JSON `{"error": ...}`."""

    viewer: Viewer
    loopback_only = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(_finite(data), allow_nan=False).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if self.loopback_only and host not in LOOPBACK:  # another site's page, through DNS rebinding
            return self._json({"error": f"host {host!r} refused: open http://127.0.0.1"}, HTTPStatus.FORBIDDEN)
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path, v = unquote(url.path), self.viewer
        try:
            if path in ("/", "/index.html"):
                page = files("mlpo_agents").joinpath("ui_page.html").read_bytes()
                return self._send(200, page, "text/html; charset=utf-8")
            if path == "/api/runs":
                return self._json(v.runs_summary())
            if path == "/api/episodes":
                return self._json(v.episodes(query))
            if path.startswith("/api/episode/"):
                found = v.episode(path.removeprefix("/api/episode/"))
                return self._json(found) if found else self._json({"error": "no such episode"}, 404)
            if path.startswith("/api/curves/") and path.endswith(".png"):
                folder = v.runs.get(path.removeprefix("/api/curves/").removesuffix(".png"))
                if folder and (folder / "curves.png").is_file():
                    return self._send(200, (folder / "curves.png").read_bytes(), "image/png")
            elif path == "/api/curves":
                curves = v.curves(query.get("run", ""))
                return self._json(curves) if curves else self._json({"error": "no such run folder"}, 404)
            self._json({"error": f"not found: {path}"}, 404)
        except Exception as e:  # a store error (SQLite, psycopg): the page shows it, the server goes on
            self._json({"error": f"{type(e).__name__}: {e}"}, 500)


def make_server(viewer: Viewer, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """A threading HTTP server for `viewer` (not started: call `serve_forever`). Port 0 picks a free one."""
    handler = type("ViewerHandler", (Handler,), {"viewer": viewer, "loopback_only": host in LOOPBACK})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port or --host") from None
    server.daemon_threads = True
    return server


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mlpo ui` on the CLI's subparsers (see `PLUGGED_COMMANDS` in cli.py)."""
    p = subparsers.add_parser("ui", help="a local, read-only web page of a trace store and training runs")
    p.add_argument("--traces", default="runs/traces.sqlite", help="trace store: SQLite path or postgresql:// URL")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free port)")
    p.add_argument("--run-dir", action="append", default=None, metavar="RUNFOLDER",
                   help="a training run folder (metrics.jsonl, curves.png) to draw, repeatable; default: the "
                        "store's folder when it holds a metrics.jsonl")
    p.set_defaults(func=ui_main)
    return p


def ui_main(args: argparse.Namespace) -> int:
    """`mlpo ui`: serve the page until Ctrl-C."""
    run_dirs = list(args.run_dir or [])
    for folder in run_dirs:
        if not Path(folder).is_dir():
            raise ValueError(f"--run-dir {folder}: no such folder; pass a training run folder (it holds metrics.jsonl)")
    is_url = str(args.traces).startswith(("postgres://", "postgresql://"))
    if not run_dirs and not is_url and (Path(args.traces).parent / "metrics.jsonl").is_file():
        run_dirs.append(str(Path(args.traces).parent))
    store = open_read_only(args.traces)
    try:
        server = make_server(Viewer(store, run_dirs), args.host, args.port)
        port = server.server_address[1]
        if args.host not in LOOPBACK:
            print(f"warning: serving {args.traces} to the network on {args.host} without authentication",
                  file=sys.stderr)
        print(f"mlpo ui: {args.traces} (read-only) on http://{args.host}:{port}/  (Ctrl-C stops)", file=sys.stderr)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        store.close()
    return 0
