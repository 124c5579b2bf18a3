"""A rubric: the named, weighted reward functions an episode is scored with.

In the spirit of the `verifiers` library's ``Rubric(funcs, weights)``: each entry is a function
``(task, completion) -> RewardResult | float | None`` with a name and a weight. The runner records
every entry's result as a `Reward` event of that name (value, and the reason in ``meta``), once for
the team's answer and once per call of the scored roles; the weights give the episode's `reward`
(`Rubric.total`), while trainers keep reading the named rewards.

`Rubric.for_task(task)` is what every run used before rubrics existed, with the same names and values:
``correct`` (strict rule; for code, the program run against the task's tests), ``correct_lenient``
(team answer only), ``format`` and ``answered`` (calls only). A user's own reward, e.g. an LLM judge,
is one more entry (`Rubric.add`); `Rubric.replace` swaps a built-in.

Within an episode each distinct output (its text and truncated flag) is scored once per entry: the
team's answer is scored as the output that gave it, so the leader's answer is not graded twice.
A function that raises is recorded as failed (reason ``"reward failed: ..."``, ``meta["failed"]``),
never as a silent 0; trainers leave such rows out.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .rewards import (
    REWARD_FAILED,
    RewardResult,
    TaskKindError,
    extract_answer,
    extract_code,
    format_reward,
    score_detail,
)
from .tasks.base import FREE_FORM, Task

Level = Literal["both", "episode", "call"]
"""Where an entry applies: the team's answer (`episode`), each scored call (`call`), or `both`."""
LEVELS = ("both", "episode", "call")


@dataclass(frozen=True)
class Completion:
    """One output to score: its text and truncated flag, with the context a reward may need."""

    text: str
    truncated: bool = False
    """The output was cut at the token limit (only closed answer forms count then)."""
    answer: str | None = None
    """Its answer under the strict rule; for the team's answer, `state["answer"]`."""
    call_id: str | None = None
    """The call that produced it (for the team's answer: the call that gave it, if one did)."""
    role: str | None = None
    agent: str | None = None
    episode_id: str | None = None
    """The episode (e.g. for an LLM judge to record its own calls under it)."""
    state: Mapping[str, Any] = field(default_factory=dict)
    """The episode's final state (`question`, `turns`, `answer`, ...)."""
    scores: Mapping[str, RewardResult] = field(default_factory=dict)
    """Results of this output computed so far by other entries (`answered` reads `correct`)."""


RewardFn = Callable[["Task", Completion], "RewardResult | float | None | Awaitable[RewardResult | float | None]"]
"""A reward function. None means "does not apply here" (nothing is recorded); an async one runs in its
own event loop in the scoring thread. Its result must depend only on the task and the output (text,
truncated): a result is reused for every place the same output is scored in the episode."""


@dataclass(frozen=True)
class RewardFunc:
    """One entry of a rubric."""

    name: str
    """The name its Reward events are recorded under."""
    fn: RewardFn
    weight: float = 1.0
    """Its weight in `Rubric.total` (0: recorded, not summed)."""
    level: Level = "both"


# ------------------------------------------------------------------------------------------- built-ins


def score_answer(task: Task, answer: str | None) -> RewardResult:
    """Strict correctness of an extracted final answer (no answer scores 0, recorded as such)."""
    if answer is None:
        return RewardResult(0.0, None, "no_answer")
    return score_detail(task, f"<answer>{answer}</answer>")


def correctness(task: Task, completion: Completion) -> RewardResult:
    """Strict correctness (`rewards.score_detail`): the answer under the strict rule against the gold answer."""
    return score_detail(task, completion.text, truncated=completion.truncated)


def code_tests(task: Task, completion: Completion) -> RewardResult:
    """The program of the output run against the task's tests in the sandbox (`rewards.score_detail`)."""
    if task.kind != "code":
        raise TaskKindError(f"code_tests scores code tasks; task {task.id} is {task.kind!r}")
    return score_detail(task, completion.text, truncated=completion.truncated)


def correctness_lenient(task: Task, completion: Completion) -> RewardResult | None:
    """Correctness of the team's lenient answer (`state["answer_lenient"]`); None where the topology gives none,
    and for code (a program has no lenient reading: it passes the tests or not)."""
    if "answer_lenient" not in completion.state or task.kind == "code":
        return None
    return score_answer(task, completion.state["answer_lenient"])


def lenient_call(task: Task, completion: Completion) -> RewardResult:
    """Correctness of the output's own answer under the lenient rule (last number as a fallback): a denser
    shaping signal than strict correctness that, unlike `answered`, never pays for a wrong answer."""
    return score_answer(task, extract_answer(completion.text, lenient=True, truncated=completion.truncated))


def with_call_lenient(rubric: Rubric) -> Rubric:
    """`rubric` plus a call-level `lenient` entry (weight 0: recorded for a trainer's `format_reward="lenient"`)."""
    return rubric.without("lenient").add(lenient_call, name="lenient", weight=0.0, level="call")


def format_check(task: Task, completion: Completion) -> RewardResult:
    """1.0 for exactly one well-formed, non-empty ``<answer>`` block (`rewards.format_reward`)."""
    return RewardResult(format_reward(completion.text), None, "")


def answered(task: Task, completion: Completion) -> RewardResult:
    """1.0 when the output gives an answer under the strict rule, right or wrong (0 when its check failed)."""
    result = completion.scores.get("correct") or correctness(task, completion)
    return RewardResult(0.0 if result.reason == "no_answer" or result.failed else 1.0, None, "")


# ------------------------------------------------------------------------------------------- rubric


class Rubric:
    """An ordered set of named reward functions with weights (immutable; `add` / `replace` return new ones)."""

    def __init__(
        self,
        funcs: Sequence[RewardFunc | RewardFn] = (),
        weights: Sequence[float] | None = None,
    ):
        entries = [f if isinstance(f, RewardFunc) else RewardFunc(_name_of(f), f) for f in funcs]
        if weights is not None:
            if len(weights) != len(entries):
                raise ValueError(f"{len(weights)} weights for {len(entries)} reward functions: give one per function")
            entries = [replace(e, weight=float(w)) for e, w in zip(entries, weights, strict=True)]
        names = [e.name for e in entries]
        for e in entries:
            if not e.name or not e.name.strip():
                raise ValueError("a reward function needs a name (RewardFunc(name, fn))")
            if names.count(e.name) > 1:
                raise ValueError(f"two reward functions are named {e.name!r}: names must be unique")
            if not callable(e.fn):
                raise TypeError(f"reward {e.name!r}: {e.fn!r} is not callable")
            if not math.isfinite(e.weight):
                raise ValueError(f"reward {e.name!r}: weight {e.weight!r} must be a finite number")
            if e.level not in LEVELS:
                raise ValueError(f"reward {e.name!r}: level {e.level!r}; use one of {', '.join(LEVELS)}")
        self.funcs: tuple[RewardFunc, ...] = tuple(entries)

    @classmethod
    def for_kind(cls, kind: str) -> Rubric:
        """The built-in rubric of a task kind (what the runner scored with before rubrics existed)."""
        if kind == FREE_FORM:
            return cls()  # no gold answer: nothing to score
        if kind not in ("math", "choice", "exact", "code"):
            raise TaskKindError(f"unknown task kind {kind!r}; expected math, choice, exact or code.")
        correct = code_tests if kind == "code" else correctness
        return cls([
            RewardFunc("correct", correct, 1.0),
            RewardFunc("correct_lenient", correctness_lenient, 0.0, "episode"),
            RewardFunc("format", format_check, 0.0, "call"),
            RewardFunc("answered", answered, 0.0, "call"),
        ])

    @classmethod
    def for_task(cls, task: Task) -> Rubric:
        """The task's default rubric: `for_kind(task.kind)`."""
        return cls.for_kind(task.kind)

    @property
    def names(self) -> tuple[str, ...]:
        """Entry names, in order."""
        return tuple(f.name for f in self.funcs)

    @property
    def weights(self) -> dict[str, float]:
        """Entry name -> weight."""
        return {f.name: f.weight for f in self.funcs}

    def add(self, fn: RewardFn, *, name: str | None = None, weight: float = 1.0, level: Level = "both") -> Rubric:
        """This rubric plus one entry (named after the function unless `name` is given)."""
        return Rubric([*self.funcs, RewardFunc(name or _name_of(fn), fn, weight, level)])

    def replace(self, name: str, fn: RewardFn) -> Rubric:
        """This rubric with entry `name` computed by `fn` (same weight and level)."""
        if name not in self.names:
            raise KeyError(f"no reward {name!r} in the rubric; it has {', '.join(self.names) or 'none'}")
        return Rubric([replace(f, fn=fn) if f.name == name else f for f in self.funcs])

    def without(self, *names: str) -> Rubric:
        """This rubric without the named entries."""
        return Rubric([f for f in self.funcs if f.name not in names])

    def total(self, results: Mapping[str, RewardResult | float]) -> float:
        """The weighted sum of `results` (entries without a result count 0)."""
        weights = self.weights
        return float(sum(
            weights[n] * (r.value if isinstance(r, RewardResult) else float(r))
            for n, r in results.items()
            if n in weights
        ))

    def scorer(self, task: Task) -> Scorer:
        """A scorer of one episode of `task`: each distinct output scored once per entry."""
        return Scorer(self, task)

    def score(self, task: Task, completion: Completion, level: Level = "both") -> dict[str, RewardResult]:
        """The results of the entries applying at `level` for one output (no cache across calls)."""
        return self.scorer(task).score(completion, level)

    def __repr__(self) -> str:
        return "Rubric(" + ", ".join(f"{f.name}×{f.weight:g}" for f in self.funcs) + ")"


class Scorer:
    """Scores the outputs of one episode with a rubric, each (text, truncated) once per entry."""

    def __init__(self, rubric: Rubric, task: Task):
        self.rubric = rubric
        self.task = task
        self._done: dict[tuple[str, bool], dict[str, RewardResult | None]] = {}
        self.calls = 0
        """How many reward functions ran (cache hits excluded)."""

    def score(self, completion: Completion, level: Level = "both") -> dict[str, RewardResult]:
        """name -> result of every entry applying at `level` (`both`: every entry) that gave one, in order."""
        done = self._done.setdefault((completion.text, completion.truncated), {})
        out: dict[str, RewardResult] = {}
        for entry in self.rubric.funcs:
            if level != "both" and entry.level not in (level, "both"):
                continue
            if entry.name not in done:
                known = {n: r for n, r in done.items() if r is not None}
                done[entry.name] = self._run(entry, replace(completion, scores=known))
            result = done[entry.name]
            if result is not None:
                out[entry.name] = result
        return out

    def total(self, completion: Completion, level: Level = "both") -> float:
        """The rubric's weighted sum for one output."""
        return self.rubric.total(self.score(completion, level))

    def _run(self, entry: RewardFunc, completion: Completion) -> RewardResult | None:
        self.calls += 1
        try:
            value = entry.fn(self.task, completion)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
        except TaskKindError:
            raise  # misuse: a reward that cannot score this kind of task
        except Exception as e:  # noqa: BLE001 - recorded with its reason, never a silent 0
            return RewardResult(0.0, None, f"{REWARD_FAILED} {type(e).__name__}: {e}"[:500])
        if value is None or isinstance(value, RewardResult):
            result = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            result = RewardResult(float(value), None, "")
        else:
            raise TypeError(f"reward {entry.name!r} returned {type(value).__name__}; return a RewardResult, "
                            "a float or None")
        if result is not None and not math.isfinite(result.value):
            return RewardResult(0.0, result.extracted, f"{REWARD_FAILED} non-finite value {result.value!r}")
        return result


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value


def _name_of(fn: Any) -> str:
    name = getattr(fn, "__name__", None)
    if not name or name == "<lambda>":
        raise ValueError(f"name the reward function {fn!r}: RewardFunc(name, fn) or rubric.add(fn, name=...)")
    return str(name)


# ------------------------------------------------------------------------------------------- episodes


def turn_completion(turn: Mapping[str, Any], state: Mapping[str, Any], episode_id: str | None = None) -> Completion:
    """The output of one agent turn, to score."""
    return Completion(turn["text"], bool(turn.get("truncated", False)), turn.get("answer"), turn.get("call_id"),
                      turn.get("role"), turn.get("agent"), episode_id, state)


def team_completion(task: Task, state: Mapping[str, Any], roles: Sequence[str] = (),
                    episode_id: str | None = None) -> Completion:
    """The output the team's answer (`state["answer"]`) is scored as.

    The latest turn (of `roles` first) whose output gives that answer exactly as the answer alone would
    (same strict answer; for code, the same program), so the team's answer and that call share one
    score; else the answer in an ``<answer>`` block. No answer: the empty text.
    """
    answer = state.get("answer")
    if answer is None:
        return Completion("", False, None, episode_id=episode_id, state=state)
    alone = f"<answer>{answer}</answer>"
    turns = list(reversed(state.get("turns", [])))
    for turn in [t for t in turns if t["role"] in roles] + [t for t in turns if t["role"] not in roles]:
        if _same_answer(task, turn["text"], bool(turn.get("truncated", False)), alone):
            return replace(turn_completion(turn, state, episode_id), answer=answer)
    return Completion(alone, False, answer, episode_id=episode_id, state=state)


def _same_answer(task: Task, text: str, truncated: bool, alone: str) -> bool:
    """The built-in checkers judge `text` and `alone` alike: they read the same answer (or program) from both."""
    if task.kind == "code":
        return extract_code(text) == extract_code(alone)
    return extract_answer(text, truncated=truncated) == extract_answer(alone)


_SCOPED: ContextVar[Rubric | None] = ContextVar("mlpo_rubric", default=None)


@contextmanager
def use_rubric(rubric: Rubric) -> Iterator[Rubric]:
    """Score with `rubric` every episode run inside the block that is not given one (e.g. a trainer's rollouts)."""
    token = _SCOPED.set(rubric)
    try:
        yield rubric
    finally:
        _SCOPED.reset(token)


def rubric_for(task: Task, rubric: Rubric | None = None) -> Rubric:
    """The rubric an episode of `task` is scored with: `rubric`, else the one `use_rubric` set (not for a
    free-form question), else the task's default."""
    if rubric is not None:
        return rubric
    scoped = _SCOPED.get()
    return scoped if scoped is not None and task.kind != FREE_FORM else Rubric.for_task(task)
