"""The Team API: ask a team a question from Python, stream its agents' turns, record feedback.

    from mlpo_agents import Team

    team = Team.load("tiny", traces="runs/app.sqlite")
    result = team.invoke("What is 2 + 3?")            # or: await team.ainvoke(...)
    print(result.answer, result.episode_id, [t.agent for t in result.turns])
    team.feedback(result.episode_id, 1.0, reason="right")

    async for event in team.astream("What is 2 + 3?"):  # AgentTurn / AgentFailure as they finish,
        print(event)                                     # then the TeamResult

Every call is one episode run by `runner.run_episode`, exactly as `mlpo run` runs a task row: the same
Episode, ModelCall, Reward and Failure events in the team's trace store. A free-form question has no gold
answer (`Task.kind == "free"`), so no correctness reward is recorded; give a `Task` to have it scored.
`rubric=` (on `Team.load`, or per call) scores with your own reward functions (`mlpo_agents.rubric`).
`samples=G` asks the leader for G answers to one prompt (one GRPO group, the OpenAI `n`): feedback on each
of them (`feedback(..., sample=i)`) is what offline MLPO trains on (`MLPOConfig(reward_name="feedback")`).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpo_agents.adapters import hot_load
from mlpo_agents.config import ConfigError, TeamConfig, load_team
from mlpo_agents.graphs import build_topology, check_topology
from mlpo_agents.models import ModelClient
from mlpo_agents.rubric import Rubric
from mlpo_agents.runner import FREE_FORM, RunSummary, run_episode, run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.trace import Episode, Reward, TraceStore, new_id, open_store

DEFAULT_TRACES = "runs/traces.sqlite"
FREE_TASK_NAME = "free"
"""The task name episodes of free-form questions are recorded under."""

Message = Mapping[str, Any]
ANSWERS_KEPT = 100_000
"""Episodes whose sample call ids a Team keeps in memory for feedback (older ones: read from the store)."""


class UnknownEpisodeError(LookupError):
    """Feedback for an episode id the team's trace store does not hold."""


@dataclass(frozen=True)
class AgentTurn:
    """One agent output, as it finished (the full token-exact record is the ModelCall `call_id`)."""

    node: str
    agent: str
    role: str
    round: int
    text: str
    answer: str | None
    """The answer this output gives under the strict rule (None when it gives none)."""
    call_id: str
    group_id: str
    sample_index: int
    truncated: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class AgentFailure:
    """An agent call that failed after retries (recorded as a Failure event; the episode went on)."""

    node: str
    agent: str
    role: str
    round: int
    error: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return dict(self.__dict__)


@dataclass
class TeamResult:
    """What one call of the team produced."""

    episode_id: str
    question: str
    answer: str | None
    """The team's final answer (strict rule); None when the team gave none."""
    status: str
    """`done`, `degraded` (an agent failed, the team answered anyway) or `failed` (no team answer)."""
    turns: list[AgentTurn] = field(default_factory=list)
    """Every agent output, in the order the nodes finished."""
    failures: list[AgentFailure] = field(default_factory=list)
    samples: list[AgentTurn] = field(default_factory=list)
    """The answering agent's last call, one turn per sample (`samples=G`): the reply's choices."""
    reward: float | None = None
    """The rubric's weighted reward of the answer (default rubric: its correctness for a `Task` with a
    gold answer); None when nothing was scored (a free-form question without a rubric)."""
    rewards: dict[str, float] = field(default_factory=dict)
    """The answer's rewards by name, as recorded (e.g. `correct`, `correct_lenient`, your own)."""

    @property
    def text(self) -> str | None:
        """The full text of the answering agent's last output (sample 0): the reply to show."""
        return self.samples[0].text if self.samples else None


class Team:
    """A team config, its model client, its trace store and its compiled graphs, ready to be asked."""

    def __init__(self, config: TeamConfig, store: TraceStore, client: ModelClient | None = None,
                 rubric: Rubric | None = None):
        check_topology(config)
        self.config = config
        self.store = store
        self._owns_client = client is None
        self.client = client or ModelClient(config, store)
        self.rubric = rubric
        """What episodes are scored with unless a call gives its own (None: each task's default rubric)."""
        self._graphs: dict[tuple[tuple[str, Any], ...], Any] = {}
        self._answers: dict[str, list[str]] = {}  # episode id -> call ids of its samples (this process)

    @classmethod
    def load(
        cls,
        team: str | Path | TeamConfig = "default",
        *,
        traces: str | Path | TraceStore = DEFAULT_TRACES,
        topology: str | None = None,
        rubric: Rubric | None = None,
        **params: Any,
    ) -> Team:
        """A team from a built-in name, a YAML path or a TeamConfig; `topology` / `params` override the team's.

        A new `topology` starts from its own default parameters (the team's belong to its old topology).
        `rubric` scores its episodes (default: each task's own, `Rubric.for_task`; a free-form question
        is then not scored).
        """
        config = team if isinstance(team, TeamConfig) else load_team(team)
        if topology and topology != config.topology:
            config = config.model_copy(update={"topology": topology, "params": {}})
        if params:
            config = config.with_overrides(**params)
        store = traces if isinstance(traces, TraceStore) else open_store(traces)
        return cls(config, store, rubric=rubric)

    @property
    def name(self) -> str:
        """The team's name (what episodes record; the `model` of the app)."""
        return self.config.name

    @property
    def answer_role(self) -> str:
        """The role whose last output is the team's reply: the trained role, else `leader`, else the last agent."""
        trainable = self.config.trainable_roles()
        return trainable[0] if trainable else "leader"

    def graph(self, samples: int | None = None) -> Any:
        """The compiled topology, with the leader drawing `samples` answers per call when > 1 (cached)."""
        params = dict(self.config.params)
        if samples is not None and samples > 1:
            params["leader_samples"] = samples
        key = tuple(sorted((k, repr(v)) for k, v in params.items()))
        if key not in self._graphs:
            try:
                self._graphs[key] = build_topology(self.config.topology, **params)
            except ValueError as e:
                if "leader_samples" in params and "leader_samples" not in self.config.params:
                    raise ConfigError(
                        f"team {self.name!r} (topology {self.config.topology!r}) cannot draw {samples} answers "
                        f"per question ({e}); ask for one sample, or use a topology with `leader_samples`"
                    ) from None
                raise ConfigError(f"team {self.name!r}: {e}") from None
        return self._graphs[key]

    # ---- asking ----------------------------------------------------------------------------------

    async def astream(
        self,
        question: str | Sequence[Message] | None = None,
        *,
        task: Task | None = None,
        samples: int | None = None,
        episode_id: str | None = None,
        task_name: str | None = None,
        rubric: Rubric | None = None,
    ) -> AsyncGenerator[AgentTurn | AgentFailure | TeamResult, None]:
        """Run one episode, yielding each agent's turn (and failure) as its node finishes, then the TeamResult.

        `question` is a string or chat messages (the last user message is the question, the earlier ones
        its context); `task` scores the answer against its gold answer; `rubric` (default: the team's)
        scores it with those reward functions, a free-form question too. Closing the stream early cancels
        the episode, which is then recorded `interrupted`.
        """
        row = self._task_row(question, task)
        if samples is not None and samples < 1:
            raise ValueError(f"samples={samples}: must be >= 1")
        graph = self.graph(samples)
        episode_id = episode_id or new_id()
        events: asyncio.Queue[AgentTurn | AgentFailure | None] = asyncio.Queue()

        def on_update(_: str, update: dict[str, Any]) -> None:
            node = update["node"]
            for t in update.get("turns") or []:
                events.put_nowait(AgentTurn(node, t["agent"], t["role"], t["round"], t["text"], t["answer"],
                                            t["call_id"], t["group_id"], t["sample_index"],
                                            bool(t.get("truncated", False))))
            for f in update.get("failures") or []:
                events.put_nowait(AgentFailure(node, f["agent"], f["role"], f["round"], f["error"]))

        async def episode() -> Any:
            try:
                return await run_episode(graph, self.config, self.client, self.store, row,
                                         task_name or (FREE_TASK_NAME if task is None else "task"),
                                         self.config.trainable_roles() or [self.answer_role],
                                         stream=on_update, episode_id=episode_id,
                                         rubric=rubric or self.rubric)
            finally:
                events.put_nowait(None)

        running = asyncio.create_task(episode())
        turns: list[AgentTurn] = []
        failures: list[AgentFailure] = []
        try:
            while (event := await events.get()) is not None:
                (turns if isinstance(event, AgentTurn) else failures).append(event)  # type: ignore[arg-type]
                yield event
            outcome = await running
        finally:
            if not running.done():
                running.cancel()  # the caller stopped listening: run_episode records the episode interrupted
                await asyncio.gather(running, return_exceptions=True)
        chosen = self._samples(turns)
        self._answers[outcome.episode_id] = [t.call_id for t in chosen]
        if len(self._answers) > ANSWERS_KEPT:  # older episodes are looked up in the store
            self._answers.pop(next(iter(self._answers)))
        scored = outcome.status != "failed" and bool(outcome.rewards)
        yield TeamResult(outcome.episode_id, row.question, outcome.answer, outcome.status, turns, failures,
                         chosen, outcome.reward if scored else None, dict(outcome.rewards))

    async def ainvoke(
        self,
        question: str | Sequence[Message] | None = None,
        *,
        task: Task | None = None,
        samples: int | None = None,
        episode_id: str | None = None,
        task_name: str | None = None,
        rubric: Rubric | None = None,
    ) -> TeamResult:
        """Run one episode and return its result (see `astream` for the arguments)."""
        async for event in self.astream(question, task=task, samples=samples, episode_id=episode_id,
                                        task_name=task_name, rubric=rubric):
            if isinstance(event, TeamResult):
                return event
        raise RuntimeError("the episode ended without a result")  # unreachable: astream ends with one

    def invoke(self, question: str | Sequence[Message] | None = None, **options: Any) -> TeamResult:
        """Blocking `ainvoke` (from code without a running event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ainvoke(question, **options))
        raise RuntimeError("Team.invoke was called inside a running event loop; use `await team.ainvoke(...)`")

    async def arun(self, tasks: Sequence[Task], **options: Any) -> RunSummary:
        """Run the team over task rows, scored and resumable (what `mlpo run` does); options as `run_team`."""
        options.setdefault("rubric", self.rubric)
        return await run_team(self.config, tasks, self.store, client=self.client, **options)

    # ---- feedback and versions -------------------------------------------------------------------

    def feedback(
        self, episode_id: str, reward: float, *, reason: str | None = None, name: str = "feedback",
        sample: int | None = None,
    ) -> Reward:
        """Record a reward for an episode (`sample=None`) or for one of its reply's samples (`sample=i`).

        Offline MLPO trains on per-sample rewards of episodes asked with `samples >= 2`.
        """
        value = float(reward)
        if not math.isfinite(value):
            raise ValueError(f"reward={reward!r}: give a finite number")
        if not name or not name.strip():
            raise ValueError("name: give the reward a name, e.g. 'feedback'")
        calls = self._sample_calls(episode_id)
        call_id = None
        if sample is not None:
            if not 0 <= sample < len(calls):
                raise ValueError(f"sample={sample}: episode {episode_id} has {len(calls)} sample(s) "
                                 f"(0..{len(calls) - 1})")
            call_id = calls[sample]
        meta: dict[str, Any] = {"source": "feedback"}
        if reason is not None:
            meta["reason"] = str(reason)[:2000]
        event = Reward(episode_id, name, value, call_id=call_id, meta=meta)
        self.store.append(event)
        return event

    def use_adapter(self, folder: str | Path, *, role: str | None = None, name: str | None = None) -> str:
        """Hot-load a trained LoRA adapter into the local engine serving `role` and route its calls to it.

        Returns the version name the role's calls now record (the folder's name unless given). An adapter
        trained on another base model is refused (`adapters.AdapterMismatchError`, naming both).
        """
        role = role or self.answer_role
        folder = Path(folder)
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"{folder}: not a LoRA adapter folder (no adapter_config.json); pass the folder "
                             "a trainer wrote, e.g. runs/mlpo/adapters/step-2")
        return hot_load(self.client, role, folder, name)

    def version_of(self, role: str | None = None) -> str:
        """The model version serving a role now (`base`, or the adapter's name)."""
        return self.client.version_of(role or self.answer_role)

    def close(self) -> None:
        """Close the trace store, and the model client when the team built it (`ModelClient.close`)."""
        self.store.close()
        if self._owns_client:
            self.client.close()

    # ---- helpers ---------------------------------------------------------------------------------

    def _task_row(self, question: str | Sequence[Message] | None, task: Task | None) -> Task:
        if task is not None:
            if question is not None and question_text(question) != task.question:
                raise ValueError("give either a question or a task (whose question is asked), not both")
            return task
        if question is None:
            raise ValueError("ask a question: team.invoke('What is 2 + 3?') (or pass task=Task(...))")
        text = question_text(question)
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        # The id names the question: episodes asking the same question share it.
        return Task(f"{FREE_TASK_NAME}/{digest}", text, "", FREE_FORM)

    def _samples(self, turns: list[AgentTurn]) -> list[AgentTurn]:
        mine = [t for t in turns if t.role == self.answer_role] or turns
        if not mine:
            return []
        last = mine[-1].group_id
        return sorted((t for t in mine if t.group_id == last), key=lambda t: t.sample_index)

    def _sample_calls(self, episode_id: str) -> list[str]:
        if episode_id in self._answers:
            return self._answers[episode_id]
        calls = self.store.calls(episode_id=episode_id)
        if calls:
            mine = [c for c in calls if c.role == self.answer_role] or calls
            last = mine[-1].group_id
            return [c.call_id for c in sorted((c for c in mine if c.group_id == last),
                                               key=lambda c: c.sample_index)]
        if any(e.episode_id == episode_id for e in self._episodes()):
            return []
        raise UnknownEpisodeError(f"no episode {episode_id!r} in {self.store.where}; give an episode id "
                                  "a reply of this team returned")

    def _episodes(self) -> list[Episode]:
        return self.store.episodes(team=self.name)


def question_text(question: str | Sequence[Message]) -> str:
    """The question a team is asked: a string as it is; chat messages as their last user message, with the
    earlier messages before it as the conversation so far."""
    if isinstance(question, str):
        text = question
    else:
        messages = [m for m in question if m.get("content")]
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if not users:
            raise ValueError("the messages hold no user message with content: the last user message is the question")
        last = users[-1]
        text = _content(messages[last])
        earlier = messages[:last]
        if earlier:
            history = "\n".join(f"{m.get('role', 'user')}: {_content(m)}" for m in earlier)
            text = f"Conversation so far:\n{history}\n\nQuestion: {text}"
    if not text.strip():
        raise ValueError("the question is empty")
    return text


def _content(message: Message) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    raise ValueError(f"message content must be a string or a list of text parts, not {type(content).__name__}")
