"""Run a team over task rows: concurrent episodes, rewards beside the calls, resumable.

Each episode is written as `running` before its first call and updated to `done`, `degraded` (an
agent failed, the team answered anyway) or `failed` (the graph crashed, or the agent giving the team
answer failed) when it ends, so a crash or Ctrl-C leaves a consistent store and `resume=True` skips
exactly the finished task rows. Resuming marks the episodes a killed run left `running` as
`interrupted`, and refuses task rows whose question changed under the same id.

An episode's calls are written with its end, in the transaction that records its rewards and status
(`EpisodeRecorder`), or every `LIVE_FLUSH_S` seconds of a longer episode, so a trace viewer follows it; a
graph with a checkpointer writes each call as it returns, since an episode continued from its checkpoint
needs the calls made before the interruption.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpo_agents.config import ConfigError, TeamConfig
from mlpo_agents.graphs import build_topology
from mlpo_agents.graphs.state import TeamContext
from mlpo_agents.models import ModelClient
from mlpo_agents.rewards import RewardResult, answer_prompt
from mlpo_agents.rubric import Rubric, Scorer, rubric_for, team_completion, turn_completion
from mlpo_agents.rubric import score_answer as score_answer  # moved to `rubric`; still importable from here
from mlpo_agents.tasks.base import FREE_FORM, Task
from mlpo_agents.trace import FINISHED, Episode, Event, Failure, Reward, TraceStore, new_id

LIVE_FLUSH_S = 2.0
"""An episode running longer writes the calls it holds at its next call (`EpisodeRecorder`)."""


@dataclass
class EpisodeResult:
    """What one episode produced."""

    episode_id: str
    task_id: str
    answer: str | None
    reward: float
    """The rubric's weighted sum of the team answer's rewards: with the default rubric, its strict
    correctness (0.0, with no reward recorded, for a free-form question)."""
    status: str
    state: dict[str, Any] = field(default_factory=dict)
    lenient_reward: float | None = None
    """Correctness under the lenient rule (None when the topology gives no lenient answer)."""
    rewards: dict[str, float] = field(default_factory=dict)
    """The team answer's rewards by name (the rubric's episode-level entries; empty when nothing was scored)."""


@dataclass
class RunSummary:
    """Totals of a run, as the CLI prints them."""

    episodes: int = 0
    skipped: int = 0
    correct: float = 0.0
    """Episodes answered correctly under the strict rule (what trains and is the headline)."""
    correct_lenient: float = 0.0
    lenient_scored: int = 0
    """Episodes with a lenient answer (the denominator of `lenient_accuracy`)."""
    degraded: int = 0
    failed: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    results: list[EpisodeResult] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Mean episode reward over finished episodes (strict rule)."""
        return self.correct / self.episodes if self.episodes else 0.0

    @property
    def lenient_accuracy(self) -> float | None:
        """Accuracy under the lenient rule (last number as a fallback), a separately labelled figure."""
        return self.correct_lenient / self.lenient_scored if self.lenient_scored else None


class EpisodeRecorder:
    """Where one episode's calls and call failures go (the client records to it, `ModelClient.recording_to`):
    held, and written with the episode's end in one transaction with its rewards and status, instead of one
    transaction a call (measured: 0.07-0.09 ms a call less of our code, `benchmarks/bench_overhead.py`). An
    episode running longer than `LIVE_FLUSH_S` writes what it holds at its next call. `hold=False` writes
    every event as it comes (a checkpointed graph). A process killed mid-episode loses the held calls of its
    unfinished episodes, which `--resume` runs again anyway; every way an episode ends in Python writes them."""

    def __init__(self, store: TraceStore, *, hold: bool = True) -> None:
        self.store = store
        self.hold = hold
        self.pending: list[Event] = []
        self.since = time.monotonic()

    def append(self, events: Sequence[Event] | Event) -> None:
        """Hold `events` (or write them, as `hold` and the time since the last write say)."""
        self.pending.extend(events if isinstance(events, Sequence) else [events])
        if not self.hold or time.monotonic() - self.since >= LIVE_FLUSH_S:
            self.write()

    def write(self, *events: Event) -> None:
        """Write what is held and `events`, in one transaction."""
        batch, self.pending = [*self.pending, *events], []
        self.since = time.monotonic()
        if batch:
            self.store.append(batch)


def task_fingerprint(task: Task) -> str:
    """A hash of what a task row asks and how it is scored: `--resume` refuses an id whose row changed."""
    text = f"{task.kind}\0{task.question}\0{task.answer}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def reward_event(episode_id: str, name: str, result: RewardResult, call_id: str | None = None) -> Reward:
    """A reward event that keeps why: the reason, the answer judged, and whether the checker failed."""
    meta: dict[str, Any] = {"reason": result.reason} if result.reason else {}
    if result.extracted is not None:
        meta["extracted"] = result.extracted[:200]
    if result.failed:
        meta["failed"] = True
    return Reward(episode_id, name, result.value, call_id=call_id, meta=meta)


def score_episode(
    task: Task, state: dict[str, Any], episode_id: str, score_roles: Sequence[str],
    rubric: Rubric | None = None, scorer: Scorer | None = None,
) -> list[Reward]:
    """Reward events of a finished episode under `rubric` (default: the task's, `Rubric.for_task`): its
    episode-level entries for the team answer, then its call-level entries per turn of `score_roles`.

    The default rubric records the team answer's `correct` (strict) and `correct_lenient` (where the
    topology gives a lenient answer), and per scored turn `correct`, `format` (one `<answer>` block) and
    `answered` (the turn gives an answer under the strict rule, right or wrong). `scorer` (one per
    episode, e.g. the one a topology graded with) scores each distinct output once.
    """
    scorer = scorer or rubric_for(task, rubric).scorer(task)
    team = scorer.score(team_completion(task, state, score_roles, episode_id), "episode")
    events = [reward_event(episode_id, name, result) for name, result in team.items()]
    for turn in state.get("turns", []):
        if turn["role"] in score_roles:
            scores = scorer.score(turn_completion(turn, state, episode_id), "call")
            events += [reward_event(episode_id, name, r, call_id=turn["call_id"]) for name, r in scores.items()]
    return events


async def run_episode(
    graph: Any, team: TeamConfig, client: ModelClient, store: TraceStore, task: Task, task_name: str,
    score_roles: Sequence[str], stream: Callable[[str, dict[str, Any]], None] | None = None,
    episode_id: str | None = None, rubric: Rubric | None = None,
) -> EpisodeResult:
    """Run the team on one task row and record the episode, its calls, rewards and failures.

    With `episode_id` of an unfinished episode and a graph compiled with a checkpointer, the episode
    continues from its last checkpoint instead of starting over. `rubric` scores it (default: the one
    `rubric.use_rubric` set, else the task's, `Rubric.for_task`; a free-form question: nothing).
    """
    episode = Episode(episode_id or new_id(), task_name, task.id, team.name, team.topology,
                      meta={"params": team.params, "task_sha": task_fingerprint(task)})
    store.append(episode)
    recorder = EpisodeRecorder(store, hold=getattr(graph, "checkpointer", None) is None)
    client = client.recording_to(recorder)  # the episode's calls go where the episode is, with its end
    free = task.kind == FREE_FORM
    scorer = rubric_for(task, rubric).scorer(task)
    ctx = TeamContext(client=client, task=None if free else task, scorer=scorer if scorer.rubric.funcs else None)
    if not free:
        ctx.instruction = answer_prompt(task)
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
        recorder.write()  # the calls made so far stay recorded
        raise  # misuse (a role the team does not map): stop the run with the fix, not N failed episodes
    except asyncio.CancelledError:
        # Cancelled mid-episode (a client that disconnected, a server shutting down): close the record.
        episode.status, episode.finished_at = "interrupted", time.time()
        recorder.write(Failure(episode.episode_id, "episode", "", "", -1, "Cancelled",
                               "the episode was cancelled before it finished"), episode)
        raise
    except Exception as e:  # noqa: BLE001 - an episode crash is recorded; the run goes on
        episode.status, episode.finished_at = "failed", time.time()
        recorder.write(Failure(episode.episode_id, "graph", "", "", -1, type(e).__name__, str(e)[:500]), episode)
        return EpisodeResult(episode.episode_id, task.id, None, 0.0, "failed")
    if state.get("answer") is None and state.get("failures"):
        # The agent that answers for the team failed: there is nothing to score, not a wrong answer.
        who = ", ".join(sorted({f"{f['agent']} (round {f['round']})" for f in state["failures"]}))
        episode.status, episode.finished_at = "failed", time.time()
        recorder.write(Failure(episode.episode_id, "episode", "", "", -1, "NoTeamAnswer",
                               f"the team gave no answer after these agents failed: {who}"[:500]), episode)
        return EpisodeResult(episode.episode_id, task.id, None, 0.0, "failed", state)
    answer = state.get("answer")
    # One thread hop per episode: math-verify and code sandboxes can block for a while.
    if not scorer.rubric.funcs:  # e.g. a free-form question: no gold answer (feedback rewards may come later)
        events: list[Reward] = []
    else:
        try:
            events = await asyncio.to_thread(score_episode, task, state, episode.episode_id, score_roles,
                                             scorer=scorer)
        except BaseException:
            recorder.write()  # a rubric that raised (or a cancel while scoring): the calls stay recorded
            raise
    rewards = {e.name: e.value for e in events if e.call_id is None}
    episode.status = "degraded" if state.get("failures") else "done"
    episode.final_answer, episode.finished_at = answer, time.time()
    recorder.write(*events, episode)
    return EpisodeResult(episode.episode_id, task.id, answer, scorer.rubric.total(rewards), episode.status, state,
                         rewards.get("correct_lenient"), rewards)


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
    rubric: Rubric | None = None,
) -> RunSummary:
    """Run `team` over `tasks` with at most `concurrency` episodes in flight.

    `checkpoints` is a SQLite file for LangGraph checkpoints: with it, `resume=True` continues
    interrupted multi-round episodes from their last finished step instead of restarting them.
    `rubric` scores every episode (default: each task's own, `Rubric.for_task`; see `run_episode`).
    Without `client`, a client is built for this run and closed after it.
    """
    if client is None:
        client = ModelClient(team, store)
        try:
            return await run_team(team, tasks, store, task_name=task_name, client=client, concurrency=concurrency,
                                  resume=resume, progress=progress, score_roles=score_roles, stream=stream,
                                  graph=graph, checkpoints=checkpoints, rubric=rubric)  # fmt: skip
        finally:
            client.close()
    if checkpoints is None:
        return await _run_team(team, tasks, store, task_name, client, concurrency, resume, progress,
                               score_roles, stream, graph or build_topology(team.topology, **team.params), rubric)
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(checkpoints)) as saver:
        graph = build_topology(team.topology, checkpointer=saver, **team.params)
        return await _run_team(team, tasks, store, task_name, client, concurrency, resume, progress,
                               score_roles, stream, graph, rubric)


async def _run_team(
    team: TeamConfig, tasks: Sequence[Task], store: TraceStore, task_name: str, client: ModelClient,
    concurrency: int, resume: bool, progress: bool, score_roles: Sequence[str] | None,
    stream: Callable[[str, dict[str, Any]], None] | None, graph: Any, rubric: Rubric | None = None,
) -> RunSummary:
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency}: must be >= 1")
    client = client.recording_to(store)
    roles = tuple(score_roles) if score_roles is not None else tuple(team.trainable_roles() or ["leader"])
    done_ids = store.finished_task_ids(task_name, team.name) if resume else set()
    unfinished = await _resumable(graph, store.unfinished_episodes(task_name, team.name)) if resume else {}
    if resume:
        _refuse_changed_tasks(store, task_name, team.name, tasks, set(unfinished.values()))
        store.mark_interrupted(task_name, team.name, keep=unfinished.values())
    todo = [t for t in tasks if t.id not in done_ids]
    summary = RunSummary(skipped=len(tasks) - len(todo))
    bar = _progress(len(todo), progress)
    gate = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    calls0 = client.stats.copy()

    async def one(task: Task) -> None:
        async with gate:
            result = await run_episode(graph, team, client, store, task, task_name, roles, stream,
                                       episode_id=unfinished.get(task.id), rubric=rubric)
        summary.results.append(result)
        summary.episodes += result.status != "failed"
        summary.correct += result.reward
        if result.lenient_reward is not None and result.status != "failed":
            summary.correct_lenient += result.lenient_reward
            summary.lenient_scored += 1
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
        store.checkpoint()  # the store file alone now holds the run (a copy without its -wal is whole)
        for key in ("calls", "prompt_tokens", "completion_tokens"):
            setattr(summary, key, client.stats[key] - calls0[key])
    return summary


async def _resumable(graph: Any, unfinished: dict[str, str]) -> dict[str, str]:
    """The unfinished episodes a checkpointed graph can continue: no checkpoint yet, or a step pending.

    An episode whose graph already ran to its end (it failed afterwards) starts over under a new id, so
    its old state does not leak into the new attempt. Without a checkpointer nothing is continued.
    """
    if graph.checkpointer is None:
        return {}
    kept = {}
    for task_id, episode_id in unfinished.items():
        snapshot = await graph.aget_state({"configurable": {"thread_id": episode_id}})
        if snapshot.next or not snapshot.values:
            kept[task_id] = episode_id
    return kept


def _refuse_changed_tasks(store: TraceStore, task_name: str, team: str, tasks: Sequence[Task],
                          continued: set[str]) -> None:
    """Stop a resume whose task rows no longer match what the store recorded under the same ids."""
    now = {t.id: task_fingerprint(t) for t in tasks}
    for ep in store.episodes(task=task_name, team=team):
        recorded = ep.meta.get("task_sha")
        if recorded is None or now.get(ep.task_id, recorded) == recorded:
            continue  # stores written before fingerprints were recorded cannot be checked
        if ep.status in FINISHED or ep.episode_id in continued:
            raise ConfigError(
                f"task id {ep.task_id!r} in {store.where} holds a different question than the task row given now: "
                "the task definition changed (different options?); use a new --traces file"
            )


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="episodes", unit="ep", dynamic_ncols=True)
