"""Run a team over task rows: concurrent episodes, rewards beside the calls, resumable.

Each episode is written as `running` before its first call and updated to `done`, `degraded` (an
agent failed, the team answered anyway) or `failed` when it ends, so a crash or Ctrl-C leaves a
consistent store and `resume=True` skips exactly the finished task rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpo_agents.config import ConfigError, TeamConfig
from mlpo_agents.graphs import build_topology
from mlpo_agents.graphs.state import TeamContext
from mlpo_agents.models import ModelClient
from mlpo_agents.rewards import answer_prompt, format_reward, score
from mlpo_agents.tasks.base import Task
from mlpo_agents.trace import Episode, Failure, Reward, TraceStore, new_id


@dataclass
class EpisodeResult:
    """What one episode produced."""

    episode_id: str
    task_id: str
    answer: str | None
    reward: float
    status: str
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    """Totals of a run, as the CLI prints them."""

    episodes: int = 0
    skipped: int = 0
    correct: float = 0.0
    degraded: int = 0
    failed: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    results: list[EpisodeResult] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Mean episode reward over finished episodes."""
        return self.correct / self.episodes if self.episodes else 0.0


def score_answer(task: Task, answer: str | None) -> float:
    """Correctness of an extracted final answer (no answer scores 0, recorded as such)."""
    return score(task, f"<answer>{answer}</answer>") if answer is not None else 0.0


async def run_episode(
    graph: Any, team: TeamConfig, client: ModelClient, store: TraceStore, task: Task, task_name: str,
    score_roles: Sequence[str], stream: Callable[[str, dict[str, Any]], None] | None = None,
    episode_id: str | None = None,
) -> EpisodeResult:
    """Run the team on one task row and record the episode, its calls, rewards and failures.

    With `episode_id` of an unfinished episode and a graph compiled with a checkpointer, the episode
    continues from its last checkpoint instead of starting over.
    """
    episode = Episode(episode_id or new_id(), task_name, task.id, team.name, team.topology,
                      meta={"params": team.params})
    store.append(episode)
    ctx = TeamContext(client=client, task=task, instruction=answer_prompt(task))
    config = {"configurable": {"episode_id": episode.episode_id, "thread_id": episode.episode_id}}
    inputs: dict[str, Any] | None = {"question": task.question, "round": 0, "turns": [], "failures": []}
    if episode_id is not None and graph.checkpointer is not None and (await graph.aget_state(config)).next:
        inputs = None  # continue the interrupted episode from its checkpoint
    try:
        if stream is None:
            state = await graph.ainvoke(inputs, config=config, context=ctx)
        else:
            state = dict(inputs or {})
            async for chunk in graph.astream(inputs, config=config, context=ctx, stream_mode=["updates", "values"]):
                mode, payload = chunk
                if mode == "updates":
                    for node, update in payload.items():
                        stream(episode.episode_id, {"node": node, **(update or {})})
                else:
                    state = payload
    except ConfigError:
        raise  # misuse (a role the team does not map): stop the run with the fix, not N failed episodes
    except Exception as e:  # noqa: BLE001 - an episode crash is recorded; the run goes on
        episode.status, episode.finished_at = "failed", time.time()
        store.append([Failure(episode.episode_id, "graph", "", "", -1, type(e).__name__, str(e)[:500]), episode])
        return EpisodeResult(episode.episode_id, task.id, None, 0.0, "failed")
    answer = state.get("answer")
    scored = [t for t in state.get("turns", []) if t["role"] in score_roles]
    # One thread hop per episode: math-verify and code sandboxes can block for a while.
    reward, values = await asyncio.to_thread(
        lambda: (score_answer(task, answer), [score(task, t["text"]) for t in scored])
    )
    events: list[Any] = [Reward(episode.episode_id, "correct", reward)]
    for turn, value in zip(scored, values, strict=True):
        events.append(Reward(episode.episode_id, "correct", value, call_id=turn["call_id"]))
        events.append(Reward(episode.episode_id, "format", format_reward(turn["text"]), call_id=turn["call_id"]))
    episode.status = "degraded" if state.get("failures") else "done"
    episode.final_answer, episode.finished_at = answer, time.time()
    store.append([*events, episode])
    return EpisodeResult(episode.episode_id, task.id, answer, reward, episode.status, state)


async def run_team(
    team: TeamConfig,
    tasks: Sequence[Task],
    store: TraceStore,
    *,
    task_name: str = "task",
    client: ModelClient | None = None,
    concurrency: int = 8,
    resume: bool = False,
    progress: bool = True,
    score_roles: Sequence[str] | None = None,
    stream: Callable[[str, dict[str, Any]], None] | None = None,
    graph: Any = None,
    checkpoints: str | Path | None = None,
) -> RunSummary:
    """Run `team` over `tasks` with at most `concurrency` episodes in flight.

    `checkpoints` is a SQLite file for LangGraph checkpoints: with it, `resume=True` continues
    interrupted multi-round episodes from their last finished step instead of restarting them.
    """
    if checkpoints is None:
        return await _run_team(team, tasks, store, task_name, client, concurrency, resume, progress,
                               score_roles, stream, graph or build_topology(team.topology, **team.params))
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(checkpoints)) as saver:
        graph = build_topology(team.topology, checkpointer=saver, **team.params)
        return await _run_team(team, tasks, store, task_name, client, concurrency, resume, progress,
                               score_roles, stream, graph)


async def _run_team(
    team: TeamConfig, tasks: Sequence[Task], store: TraceStore, task_name: str, client: ModelClient | None,
    concurrency: int, resume: bool, progress: bool, score_roles: Sequence[str] | None,
    stream: Callable[[str, dict[str, Any]], None] | None, graph: Any,
) -> RunSummary:
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency}: must be >= 1")
    client = client or ModelClient(team, store)
    roles = tuple(score_roles) if score_roles is not None else tuple(team.trainable_roles() or ["leader"])
    done_ids = store.finished_task_ids(task_name, team.name) if resume else set()
    unfinished = store.unfinished_episodes(task_name, team.name) if resume and graph.checkpointer else {}
    todo = [t for t in tasks if t.id not in done_ids]
    summary = RunSummary(skipped=len(tasks) - len(todo))
    bar = _progress(len(todo), progress)
    gate = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    calls0 = client.stats.copy()

    async def one(task: Task) -> None:
        async with gate:
            result = await run_episode(graph, team, client, store, task, task_name, roles, stream,
                                       episode_id=unfinished.get(task.id))
        summary.results.append(result)
        summary.episodes += result.status != "failed"
        summary.correct += result.reward
        summary.degraded += result.status == "degraded"
        summary.failed += result.status == "failed"
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{summary.accuracy:.3f}", degraded=summary.degraded, failed=summary.failed)

    try:
        await asyncio.gather(*(one(t) for t in todo))
    finally:
        if bar is not None:
            bar.close()
        summary.wall_s = time.perf_counter() - start
        for key in ("calls", "prompt_tokens", "completion_tokens"):
            setattr(summary, key, client.stats[key] - calls0[key])
    return summary


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="episodes", unit="ep", dynamic_ncols=True)
