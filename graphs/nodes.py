"""Building blocks for team topologies: agent nodes, fan-outs, round loops, answer extraction, voting.

The shipped topologies (leader_peers, gvr, debate) are built only from these; a user topology is a
few dozen lines of the same calls. Nodes follow LangGraph's `State -> partial State` convention and
reach the model client through the runtime context (`TeamContext`).

The nodes and edges here are coroutines although none of them waits on anything: LangGraph runs a sync
node or edge in a worker thread when the graph runs async, a hop that cost about 0.1-0.3 ms each,
three per leader_peers episode, more than the node's own work (benchmarks/bench_overhead.py).
"""

from __future__ import annotations

import hashlib
import inspect
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from langgraph.graph import END
from langgraph.runtime import Runtime
from langgraph.types import Send

from mlpo_agents.models import ModelCallError
from mlpo_agents.rewards import extract_answer, extract_code

from .state import AgentInput, FailedTurn, TeamContext, Turn

Messages = list[dict[str, Any]]
PromptFn = Callable[[dict[str, Any], str, TeamContext], Messages]
"""(state, agent id, context) -> chat messages for that agent."""


def user(text: str) -> Messages:
    """A one-message chat."""
    return [{"role": "user", "content": text}]


def call_seed(state: dict[str, Any], ctx: TeamContext, agent: str, round_: int, offset: int | str = 0) -> int | None:
    """The sampling seed of one call: the agent's `sampling.seed` (None: unseeded) mixed with the agent id,
    the question (the task id, else its text), the round and `offset`, so each agent, question and round
    draws its own stream, reproducibly (the engine adds the sample index for n > 1). One seed for every
    question would give every question the same random draws (outcomes correlated across a whole
    evaluation), and peers sharing their role's seed would write the same proposals. An agent node passes
    its `Send` payload's `branch` as `offset` (a fan-out's place in a tree, `gvr.children`)."""
    seed = ctx.client.team.role(agent).sampling.seed
    if seed is None:
        return None
    question = ctx.task.id if ctx.task is not None else state.get("question", "")
    return question_seed(seed, agent, question, round_, offset)


def question_seed(seed: int, agent: str, question: str, round_: int = 0, offset: int | str = 0) -> int:
    """`call_seed`'s rule: a 31-bit seed from (seed, agent, question, round, offset), the same in every process."""
    key = f"{seed}/{agent}/{question}/{round_}/{offset}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big") & 0x7FFFFFFF


def agent_node(
    role: str,
    prompt: PromptFn,
    *,
    agent: str | None = None,
    samples: int | None = None,
    parent: Callable[[dict[str, Any], str], str | None] | None = None,
    then: Callable[[dict[str, Any], list[Turn]], dict[str, Any]] | None = None,
) -> Callable[..., Any]:
    """A node where one agent (fixed, or named by the `Send` payload) answers a prompt.

    `samples` > 1 is the sampling fan-out: G completions of one prompt, one group id, all appended to
    `turns` (sample 0 first). `parent` names the call this output builds on (recorded for MALT trees).
    A call that fails after retries becomes a `failures` entry and the run goes on. `then(state, turns)`
    (turns: this call's, empty when it failed) adds more keys to the node's update: bookkeeping that
    would otherwise be a node of its own, and a LangGraph superstep of its own (~0.1-0.2 ms an episode).
    """

    async def node(state: dict[str, Any], runtime: Runtime[TeamContext]) -> dict[str, Any]:
        ctx = runtime.context
        who = state.get("agent") or agent or role
        round_ = state.get("round", 0)
        try:
            outs = await ctx.client.acomplete(
                prompt(state, who, ctx),
                role=role,
                agent=who,
                round=round_,
                n=samples,
                parent_call_id=parent(state, who) if parent else None,
                seed=call_seed(state, ctx, who, round_, state.get("branch", 0)),
            )
        except ModelCallError as e:
            failed = {"failures": [FailedTurn(agent=who, role=role, round=round_, error=str(e))]}
            return {**failed, **then(state, [])} if then else failed
        code = ctx.task is not None and ctx.task.kind == "code"
        turns = [make_turn(s, who, role, round_, code=code) for s in outs]
        return {"turns": turns, **then(state, turns)} if then else {"turns": turns}

    return node


def make_turn(sample: Any, agent: str, role: str, round_: int, *, code: bool = False) -> Turn:
    """A Turn from a ModelClient sample. Its answer is the strict answer (`rewards.extract_answer`), or with
    `code` (a code task) the program the task's reward runs (`rewards.extract_code`: the `<answer>` block,
    else the last closed fence), so a turn's answer and its call's reward read the same thing."""
    truncated = sample.finish_reason == "length"
    if code:
        answer = lenient = extract_code(sample.text)
    else:
        answer = extract_answer(sample.text, truncated=truncated)
        lenient = extract_answer(sample.text, lenient=True)
    return Turn(
        agent=agent, role=role, round=round_, text=sample.text, answer=answer,
        call_id=sample.call_id, group_id=sample.group_id, sample_index=sample.sample_index,
        answer_lenient=lenient, truncated=truncated,
    )


def fan_out(
    node: str, agents: Sequence[str] | Callable[[dict[str, Any]], Sequence[str]]
) -> Callable[..., Awaitable[list[Send]]]:
    """A conditional edge that runs `node` once per agent, in parallel, each with `state + {agent}`."""

    async def route(state: dict[str, Any]) -> list[Send]:
        names = agents(state) if callable(agents) else agents
        return [Send(node, AgentInput(**_shared(state), agent=a)) for a in names]  # type: ignore[typeddict-item]

    return route


def _shared(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in ("agent", "failures")}


def round_loop(rounds: int, again: str | Callable[[dict[str, Any]], Any], done: str = END) -> Callable[..., Any]:
    """A conditional edge: go to `again` (a node or a fan-out) while `state['round'] < rounds`, else `done`."""

    async def route(state: dict[str, Any]) -> Any:
        if state.get("round", 0) < rounds:
            if not callable(again):
                return again
            found = again(state)
            return await found if inspect.isawaitable(found) else found
        return done

    return route


async def next_round(state: dict[str, Any]) -> dict[str, Any]:
    """A node that advances the round counter."""
    return {"round": state.get("round", 0) + 1}


def turns_of(
    turns: Iterable[Turn], *, role: str | None = None, agent: str | None = None, round: int | None = None,
    first_sample_only: bool = True,
) -> list[Turn]:
    """Turns filtered by role / agent / round (sample 0 of each group unless asked for all)."""
    return [
        t for t in turns
        if (role is None or t["role"] == role)
        and (agent is None or t["agent"] == agent)
        and (round is None or t["round"] == round)
        and (not first_sample_only or t["sample_index"] == 0)
    ]


def latest(turns: Iterable[Turn], agent: str) -> Turn | None:
    """The last sample-0 turn of an agent."""
    found = turns_of(turns, agent=agent)
    return found[-1] if found else None


def normalize_answer(answer: str) -> str:
    """Light normalisation for voting: trim, drop a trailing period, unify case and inner spacing."""
    text = " ".join(answer.strip().rstrip(".").split())
    return text.lower()


def vote(answers: Iterable[str | None], normalize: Callable[[str], str] = normalize_answer) -> str | None:
    """Majority answer; ties go to the answer that appeared first; None when no answer parsed."""
    cleaned = [(normalize(a), a) for a in answers if a is not None and a.strip()]
    if not cleaned:
        return None
    counts = Counter(key for key, _ in cleaned)
    best = max(counts.values())
    for key, original in cleaned:
        if counts[key] == best:
            return original
    return None


def agent_ids(prefix: str, count: int) -> list[str]:
    """`peer-1 … peer-K`."""
    return [f"{prefix}-{i}" for i in range(1, count + 1)]


def require(condition: bool, message: str) -> None:
    """Raise a ValueError with a fix-it message when a topology parameter is out of range."""
    if not condition:
        raise ValueError(message)


def fan_out_each(
    node: str, payloads: Callable[[dict[str, Any]], Sequence[dict[str, Any]]], otherwise: str = END
) -> Callable[..., Any]:
    """A conditional edge that runs `node` once per payload (a dict with at least `agent`), in parallel.

    Each run sees `state + payload` (e.g. `{"agent": "verifier-2", "target": <call id>}`), so one
    agent can be run several times in a step, once per output it builds on. With nothing to run the
    edge goes to `otherwise` instead of silently ending the graph.
    """

    async def route(state: dict[str, Any]) -> list[Send] | str:
        sends = [Send(node, {**_shared(state), **p}) for p in payloads(state)]
        return sends or otherwise

    return route


async def join(state: dict[str, Any]) -> dict[str, Any]:
    """A no-op node where parallel branches meet, so the fan-out after it starts once, not once per branch."""
    return {}


def find_turn(turns: Iterable[Turn], call_id: str | None) -> Turn:
    """The turn (any sample) produced by call `call_id`; a missing one is a bug in the topology."""
    found = next((t for t in turns if t["call_id"] == call_id), None) if call_id else None
    if found is None:
        raise KeyError(f"no turn with call id {call_id!r} in the state")
    return found
