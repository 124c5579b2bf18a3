"""The trace events and the tables that hold them: the schema every trace store shares.

`Episode`, `ModelCall`, `Reward` and `Failure` are the events; `TABLES` maps each to its table (one column
per dataclass field); `encode_column` and `decode_column` turn field values into column values and back
(token ids and logprobs as packed arrays, nested values as JSON), `encode_row` a whole event into its row.
No storage here: the SQLite store is in `mlpo_agents.trace_sqlite`, the Postgres one in
`mlpo_agents.trace_pg`, and `mlpo_agents.trace` is where users import all of it from.
"""

from __future__ import annotations

import json
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

EpisodeStatus = Literal["running", "done", "degraded", "failed", "interrupted"]
"""`interrupted`: the run that wrote it was killed and a later `--resume` restarted its task row."""

FINISHED: tuple[EpisodeStatus, ...] = ("done", "degraded")
"""Statuses of an episode that produced a team answer: what `--resume` skips and summaries score."""


def new_id() -> str:
    """A short random id for episodes, calls and groups."""
    return uuid.uuid4().hex[:16]


@dataclass
class Episode:
    """One run of a team on one task row."""

    episode_id: str
    task: str
    task_id: str
    team: str
    topology: str
    status: EpisodeStatus = "running"
    final_answer: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelCall:
    """One sampled completion, token-exact. A call with `n` samples is `n` events sharing a group id."""

    call_id: str
    episode_id: str
    node: str
    role: str
    agent: str
    round: int
    group_id: str
    sample_index: int
    messages: list[dict[str, Any]]
    text: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    model: str
    """The routed deployment, e.g. `local/smollm2-135m` or `hosted_vllm/leader`."""
    base_model: str
    """Identity of the base weights and tokenizer; trainers refuse calls from another base model."""
    version: str
    """Adapter name serving this call (`base` when none): the model version trainers see."""
    sampling: dict[str, Any] = field(default_factory=dict)
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    parent_call_id: str | None = None
    """The call whose output this call's prompt builds on (MALT trees, refinement chains)."""
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reward:
    """A scalar reward for an episode (call_id None) or for one call's output."""

    episode_id: str
    name: str
    value: float
    call_id: str | None = None
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure:
    """A recorded failure inside an episode (a peer that timed out, an answer that did not parse)."""

    episode_id: str
    node: str
    role: str
    agent: str
    round: int
    error_type: str
    message: str
    created_at: float = field(default_factory=time.time)


Event = Episode | ModelCall | Reward | Failure

JSON_FIELDS = {"messages", "sampling", "meta"}
INT_ARRAYS = {"prompt_token_ids", "completion_token_ids"}
FLOAT_ARRAYS = {"logprobs"}
TABLES: dict[type, str] = {Episode: "episodes", ModelCall: "calls", Reward: "rewards", Failure: "failures"}
"""Event type -> table; each table has one column per dataclass field (the schema both stores share)."""


def _pack_ints(value: Any) -> bytes:
    return array("i", value).tobytes()


def _pack_floats(value: Any) -> bytes:
    return array("f", value).tobytes()


def _column_encoder(name: str) -> Callable[[Any], Any] | None:
    """How a field's value becomes its column's (None: stored as it is)."""
    # Token ids as int32 and logprobs as float32 blobs: 4 bytes a token, no JSON parse on read.
    if name in INT_ARRAYS:
        return _pack_ints
    if name in FLOAT_ARRAYS:
        return _pack_floats
    if name in JSON_FIELDS:
        return json.dumps
    return None


_ROW_ENCODERS = {cls: tuple((f.name, _column_encoder(f.name)) for f in fields(cls)) for cls in TABLES}
"""Event type -> (field name, encoder) per column in table order, worked out once: a row is written per call."""


def encode_column(name: str, value: Any) -> Any:
    """A field value as its column holds it (both stores write these)."""
    encode = _column_encoder(name)
    return value if encode is None else encode(value)


def encode_row(event: Event) -> list[Any]:
    """An event's column values in its table's column order (`encode_column` of every field)."""
    values = vars(event)
    return [values[name] if encode is None else encode(values[name]) for name, encode in _ROW_ENCODERS[type(event)]]


def decode_column(name: str, value: Any) -> Any:
    """A column value read back as the event field it came from."""
    if name in INT_ARRAYS:
        out = array("i")
        out.frombytes(value or b"")
        return out.tolist()
    if name in FLOAT_ARRAYS:
        out_f = array("f")
        out_f.frombytes(value or b"")
        return out_f.tolist()
    if name in JSON_FIELDS:
        return json.loads(value) if value else ({} if name != "messages" else [])
    return value
