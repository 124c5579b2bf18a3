"""The run scaffold every trainer uses: seeding, typed run state, resume, the step loop and the result.

A trainer is its setup plus `step(n)`. Its `train` opens a `Run` (run folder, logger, typed state),
builds what it trains, calls `Run.resume` (which restores the newest checkpoint every trainee completed)
and hands its step function to `run_training`: evaluation before (step 0), an optional warm-up, steps
1..N — each published, logged and checkpointed — under a wall-clock budget that counts training steps
only, then evaluation after. What every trainer gets from here:

- `step_seed`, `seeded_team`: the one seeding rule. A rollout's seed is `step_seed(run seed, step, salt)`
  (evaluation: step `EVAL_STEP`); agent i of the seeded team samples with that seed + 7919 i, each call
  mixes in the agent, the question and the round (`graphs.nodes.call_seed`), and the engine adds the
  sample index, so every agent, step, question, round and sample has its own reproducible stream.
- `RunState`: the state a trainer carries from step to step (question cursor, pools, evaluation, ...), a
  dataclass per trainer, written as JSON into every checkpoint and read back on resume.
- `Trainee`: what the loop restores, publishes (save + hot-load) and checkpoints each step
  (`common.TrainableLora`).
- `TrainResult`: what every trainer's `train` returns.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .loop import Checkpointer, TrainLogger, progress, set_rng_state

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig


EVAL_STEP = -1
"""The `step_seed` step of evaluation rollouts (training steps are 1, 2, ...; warm-ups use 0)."""


# ------------------------------------------------------------------------------------------- seeding


def step_seed(seed: int, step: int, salt: str = "") -> int:
    """A sampling seed derived from the run seed, the step and what it samples for (`salt`): reproducible,
    different for every step and purpose."""
    return random.Random(f"{seed}/{step}/{salt}").getrandbits(31)


def seeded_team(
    team: TeamConfig, seed: int, *, roles: Sequence[str], temperatures: Mapping[str, float | None] | None = None
) -> Any:
    """A copy of `team` whose agents `roles` (agent ids such as `leader`, `peer-2`, `generator-1`) sample with
    their own fixed seed, seed + 7919 i for the i-th; every role or agent named in `temperatures` (by its own
    name or its role: `peer` covers `peer-2`) samples at that temperature (None: the team's own)."""
    copies = {name: rc.model_copy(deep=True) for name, rc in team.roles.items()}
    for i, agent in enumerate(roles):
        copies[agent] = team.role(agent).model_copy(deep=True)
        copies[agent].sampling.seed = (seed + 7919 * i) % (1 << 31)
    wanted = dict(temperatures or {})
    for name, rc in copies.items():
        temperature = wanted.get(name, wanted.get(name.rsplit("-", 1)[0]))
        if temperature is not None:
            rc.sampling.temperature = temperature
    return team.model_copy(update={"roles": copies})


# ------------------------------------------------------------------------------------------- state and result


@dataclass
class RunState:
    """What a run carries from step to step and across a resume; each trainer subclasses it with its fields.
    Saved as JSON (`to_json`) in every checkpoint; `load` reads one back."""

    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    """"before" / "after" -> that evaluation's figures."""

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (a deep copy)."""
        return dataclasses.asdict(self)

    def load(self, data: Mapping[str, Any]) -> None:
        """Take the fields saved in `data` (keys an older checkpoint holds beyond them are ignored)."""
        for f in dataclasses.fields(self):
            if f.name in data:
                setattr(self, f.name, data[f.name])


class Trainee(Protocol):
    """What the loop trains: a LoRA model and its optimizer, served under a version (`common.TrainableLora`)."""

    model: Any
    optimizer: Any
    base_model: str
    version: str
    adapters: Path
    """The folder of its published adapters, `step-N` each."""

    def restore(self, adapter: Path) -> None:
        """Load adapter weights into the trainable copy."""

    def publish(self, step: int, folder: Path | None = None) -> Path:
        """Save the adapter as step `step` (unless `folder` holds it) and serve it; returns the folder."""
        ...


@dataclass
class TrainResult:
    """What a trainer's `train` returns."""

    out: Path
    """The run folder: metrics, curves, checkpoints, adapters, traces."""
    adapters: dict[str, Path]
    """Trained role -> its final adapter folder (peft format)."""
    steps: int
    """The last step run (a `max_minutes` budget may stop before the configured steps)."""
    evaluation: dict[str, dict[str, Any]]
    """{"before": {...}, "after": {...}}: held-out evaluation figures (`eval_every` ones are only logged)."""
    history: list[dict[str, Any]]
    """Every logged row (`metrics.jsonl`)."""
    wall_s: float
    details: dict[str, Any] = field(default_factory=dict)
    """Trainer-specific figures (MALT: `counts`, the per-role data counts)."""

    @property
    def adapter(self) -> Path:
        """The one trained adapter (MLPO's leader); an error when the run trained several."""
        if len(self.adapters) != 1:
            raise ValueError(f"this run trained {len(self.adapters)} adapters; use .adapters")
        return next(iter(self.adapters.values()))

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """MALT: role -> outputs / positive / negative / unvalued / sft / pairs."""
        return self.details.get("counts", {})

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (what `mlpo train` prints)."""
        return {
            "out": str(self.out),
            "adapters": {name: str(path) for name, path in self.adapters.items()},
            "steps": self.steps,
            "evaluation": self.evaluation,
            "wall_s": round(self.wall_s, 1),
            **self.details,
        }


# ------------------------------------------------------------------------------------------- the run


State = TypeVar("State", bound=RunState)


class Run(Generic[State]):
    """A run folder being trained: config, typed state, logger, and the checkpoints of its trainees."""

    def __init__(self, config: Any, state: State, *, save_every: int):
        self.started = time.perf_counter()
        self.config, self.state, self.save_every = config, state, save_every
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logger = TrainLogger(self.out, dataclasses.asdict(config), resume=config.resume)
        self.trainees: dict[str, Trainee] = {}
        self.checkpointers: dict[str, Checkpointer] = {}
        self.first_step = 0

    def resume(self, folders: Mapping[str, Path], trainees: Mapping[str, Trainee] | None = None) -> int:
        """Keep checkpoints under `folders` (name -> folder; the trainee of that name, if any, is saved with the
        state) and, with `config.resume`, continue from the newest step every one of them completed: trainees
        restored and served, RNG and state restored, the log cut there. Returns that step (0: from the start)."""
        self.trainees = dict(trainees or {})
        self.checkpointers = {name: Checkpointer(folder, self.save_every) for name, folder in folders.items()}
        if not self.config.resume:
            return 0
        complete = [{int(p.name.split("-")[1]) for p in c.complete()} for c in self.checkpointers.values()]
        common = set.intersection(*complete) if complete else set()
        if not common:  # a crash may leave one trainee a step ahead: only steps all of them saved count
            roots = ", ".join(str(c.root) for c in self.checkpointers.values())
            print(f"no complete checkpoint in {roots}: starting from step 0")
            self.logger.truncate(-1)
            return 0
        step = max(common)
        for name, checkpointer in self.checkpointers.items():
            checkpoint = checkpointer.load(checkpointer.root / f"step-{step:06d}")
            trainee = self.trainees.get(name)
            if trainee is not None:
                trainee.restore(checkpoint.adapter)
                trainee.optimizer.load_state_dict(checkpoint.optimizer_state())
                trainee.publish(step, checkpoint.adapter)
        set_rng_state(checkpoint.rng())
        self.state.load(checkpoint.state)
        self.logger.truncate(step)
        self.first_step = step
        return step

    def checkpoint(self, step: int, *, last: bool) -> None:
        """Save step `step` where due (every `save_every` steps, and the last one): state, RNG, trainees."""
        for name, checkpointer in self.checkpointers.items():
            if checkpointer.due(step, last=last):
                trainee = self.trainees.get(name)
                checkpointer.save(
                    step,
                    model=trainee.model if trainee else None,
                    optimizer=trainee.optimizer if trainee else None,
                    base_model=trainee.base_model if trainee else None,
                    state=self.state.to_json(),
                )

    def publish(self, step: int, metrics: dict[str, Any]) -> None:
        """Save and serve every trainee's adapter of step `step`; its version goes into `metrics`."""
        for name, trainee in self.trainees.items():
            trainee.publish(step)
            metrics["version" if len(self.trainees) == 1 else f"{name}/version"] = trainee.version


def eval_metrics(evaluation: Mapping[str, Any], keys: str = "eval/{k}", label: str = "") -> dict[str, float]:
    """The scalar part of an evaluation as log metrics, named by `keys` (fields `k` and `label`)."""
    return {
        keys.format(k=k, label=label): float(v)
        for k, v in evaluation.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def run_training(
    run: Run[Any],
    step: Callable[[int], dict[str, Any]],
    *,
    steps: int,
    evaluate: Callable[[str], dict[str, Any]] | None = None,
    eval_every: int = 0,
    eval_keys: str = "eval/{k}",
    warmup: Callable[[], dict[str, Any]] | None = None,
    max_minutes: float | None = None,
) -> TrainResult:
    """Drive `run` from its first step to `steps`; returns the result.

    On a fresh run: `evaluate("before")` (when `config.eval_questions` > 0), then `warmup()` (e.g. SFT), both
    logged at step 0. Each step: `step(n)` returns its metrics, every trainee is published, `evaluate("stepN")`
    every `eval_every` steps, the row is logged and a checkpoint saved where due. `max_minutes` bounds the
    time spent in steps (evaluation and warm-up excluded): the step that exceeds it is the last one and is
    checkpointed. Then `evaluate("after")`. Evaluation metrics are named by `eval_keys` (`{k}`, `{label}`).
    """
    state, logger = run.state, run.logger
    evaluate = evaluate if run.config.eval_questions else None
    if run.first_step == 0 and evaluate is not None:
        state.evaluation["before"] = evaluate("before")
        logger.log(0, eval_metrics(state.evaluation["before"], eval_keys, "before"))
    if run.first_step == 0 and warmup is not None:
        logger.log(0, warmup())
    bar = progress(steps, run.first_step, run.config.progress)
    n, trained_s = run.first_step, 0.0
    for n in range(run.first_step + 1, steps + 1):
        started = time.perf_counter()
        metrics = step(n)
        run.publish(n, metrics)
        trained_s += time.perf_counter() - started
        if evaluate is not None and eval_every and n % eval_every == 0 and n < steps:
            metrics.update(eval_metrics(evaluate(f"step{n}"), eval_keys, f"step{n}"))
        logger.log(n, metrics)
        out_of_time = max_minutes is not None and trained_s > 60 * max_minutes
        started = time.perf_counter()
        run.checkpoint(n, last=n == steps or out_of_time)
        trained_s += time.perf_counter() - started
        if bar is not None:
            bar.update(1)
            shown = {"reward": ("reward/mean", ".2f"), "loss": ("loss", ".3f")}
            bar.set_postfix({name: format(metrics[k], f) for name, (k, f) in shown.items() if k in metrics})
        if out_of_time:
            print(f"stopping after step {n}: max_minutes={max_minutes} of training reached")
            break
    if bar is not None:
        bar.close()
    if evaluate is not None:
        state.evaluation["after"] = evaluate("after")
        logger.log(n, eval_metrics(state.evaluation["after"], eval_keys, "after"))
    logger.close()
    adapters = {name: trainee.adapters / f"step-{n}" for name, trainee in run.trainees.items()}
    return TrainResult(run.out, adapters, n, state.evaluation, logger.history, time.perf_counter() - run.started)
