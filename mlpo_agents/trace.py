"""Typed trace events and the append-only TraceStore (SQLite by default).

Every model call is one `ModelCall` event holding the exact token ids and per-token logprobs the engine
sampled. Rewards and failures are separate events that point at an episode (and optionally a call).
Events are written in batches, one transaction per batch, so a crash never leaves half a batch behind.
The SQLite file is whole on disk after every run and on close (the write-ahead log is folded into it).

Import everything from here. The events and their tables are in `trace_schema`, the SQLite store in
`trace_sqlite`, the Postgres store in `trace_pg` and the integrity checks in `trace_check`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from mlpo_agents.trace_check import TraceStoreError
from mlpo_agents.trace_pg import PostgresTraceStore
from mlpo_agents.trace_schema import (
    FINISHED,
    TABLES,
    Episode,
    EpisodeStatus,
    Event,
    Failure,
    ModelCall,
    Reward,
    new_id,
)
from mlpo_agents.trace_sqlite import TraceStore

__all__ = [
    "FINISHED",
    "TABLES",
    "Episode",
    "EpisodeStatus",
    "Event",
    "EventSink",
    "Failure",
    "ModelCall",
    "PostgresTraceStore",
    "Reward",
    "TraceStore",
    "TraceStoreError",
    "group_events",
    "new_id",
    "open_store",
]


class EventSink(Protocol):
    """Where a `ModelClient` records its events: a store, or an episode's `runner.EpisodeRecorder`."""

    def append(self, events: Sequence[Event] | Event) -> None: ...


def open_store(url: str | Path) -> TraceStore:
    """Open a trace store from a path (SQLite) or a `postgresql://` URL."""
    text = str(url)
    if text.startswith(("postgres://", "postgresql://")):
        return PostgresTraceStore(text)
    return TraceStore(text)


def group_events(calls: Iterable[ModelCall]) -> dict[str, list[ModelCall]]:
    """Calls by group id, samples in index order."""
    groups: dict[str, list[ModelCall]] = {}
    for c in calls:
        groups.setdefault(c.group_id, []).append(c)
    for g in groups.values():
        g.sort(key=lambda c: c.sample_index)
    return groups
