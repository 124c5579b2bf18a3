"""Graph state and run context shared by every topology.

State is a `TypedDict` with reducers: agent outputs append to `turns`, failures to `failures`. The
per-run dependencies (the model client, the task row) live in the LangGraph runtime context, not in
the state, so the state stays small, serialisable and checkpointable.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, NotRequired, TypedDict

from langgraph.graph.state import CompiledStateGraph

if TYPE_CHECKING:
    from mlpo_agents.models import ModelClient
    from mlpo_agents.rubric import Scorer
    from mlpo_agents.tasks.base import Task


TeamGraph = CompiledStateGraph[Any, Any, Any, Any]
"""What every topology builder returns: a compiled LangGraph graph with a TeamContext runtime context."""


class Turn(TypedDict):
    """One agent output: what a later node reads and what the runner scores."""

    agent: str
    role: str
    round: int
    text: str
    answer: str | None
    """The final answer under the strict rule (`rewards.extract_answer`); None when the output gives none."""
    call_id: str
    group_id: str
    sample_index: int
    answer_lenient: NotRequired[str | None]
    """The answer a lenient harness would read (last number as a fallback): reported, never trained on."""
    truncated: NotRequired[bool]
    """The output was cut at the token limit (finish reason `length`)."""


class FailedTurn(TypedDict):
    """An agent call that failed after retries (the trace holds the Failure event too)."""

    agent: str
    role: str
    round: int
    error: str


class TeamState(TypedDict, total=False):
    """The state every shipped topology uses; user topologies may extend it."""

    question: str
    """The task text every agent is asked about."""
    round: int
    """The current round (0-based); round loops advance it."""
    turns: Annotated[list[Turn], operator.add]
    """Every agent output in the order the nodes finished."""
    failures: Annotated[list[FailedTurn], operator.add]
    """Agent calls that failed; a non-empty list marks the episode degraded."""
    answer: str | None
    """The team's final answer (strict rule: what is scored, trained on and reported as accuracy)."""
    answer_lenient: str | None
    """The team's answer under the lenient rule, where the topology sets it (leader_peers, debate):
    reported as a separate "lenient" figure only."""


class AgentInput(TypedDict, total=False):
    """What a fanned-out agent node receives through `Send`: the state plus which agent it is."""

    question: str
    round: int
    turns: list[Turn]
    agent: str


@dataclass
class TeamContext:
    """Run-scoped dependencies, passed as `graph.ainvoke(state, context=TeamContext(...))`."""

    client: ModelClient
    """The only way nodes reach models."""
    task: Task | None = None
    """The task row of this episode (None for free-form questions)."""
    instruction: str = "Think step by step, then put the final answer in <answer></answer>."
    """How agents are told to format the final answer (set from the task's answer format)."""
    scorer: Scorer | None = None
    """How this episode's outputs are scored (the runner sets it from the rubric; None: nothing is scored).
    A topology grading outputs mid-episode (`cooperate`) uses it, so the runner does not score them again."""
    extra: dict[str, Any] = field(default_factory=dict)
    """User data for custom topologies."""
