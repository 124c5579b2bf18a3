"""MALT: train a generator → verifier → refiner team with SFT + DPO on a value-labelled search tree.

Motwani et al. 2024, "MALT: Improving Reasoning with Multi-Agent LLM Training", arXiv 2412.01928.
For each train question the gvr team expands the full tree (`tree=True`, n samples per role): n
answers, n critiques of each answer, n refinements of each critique (n=3 → 27 leaves). Each
refinement is graded against the ground truth (the runner's `correct` reward, `score_roles=("refiner",)`).
Credit flows up by value iteration: a refinement's value is its reward, a critique's the mean of its
refinements', an answer's the mean of its critiques'; an output is positive when its value > 0.5.
Each role then gets SFT on its positives; the verifier and refiner then DPO on (positive, negative)
pairs sharing a parent, while the generator is trained with SFT only (paper Alg. 1 line 22, §4.3); each
role in its own LoRA adapter on the shared base model. The
trained team is served by routing each role to its adapter and evaluated with M chains and a
majority vote. Read top to bottom: `MALTConfig` → `sft` / `dpo` (TRL through `trl_glue`) → the team's tree
expansion and `evaluate` → `MALTPhases` (step n: one SFT or DPO phase of one adapter) → `train` (setup, then
`run.run_training`); credit assignment and datasets (pure) are `malt_data`.

Fidelity (paper: Motwani et al. 2024, Algorithm 1, §4.3 and the appendix; pinned by
tests/test_fidelity_malt.py and tests/test_malt.py):
- Tree: n = 3 samples per role (27 leaves per question), generated at temperature 0.3. Ours: the same
  (`branching=3`, `tree_temperature=0.3`).
- Values and labels: a leaf's value is its 0/1 correctness, a critique's the mean of its refinements',
  an answer's the mean of its critiques'; positive when value > 0.5. Ours: the same (`propagate="mean"`,
  `threshold=0.5`).
- Training: the generator with SFT on its positives only (Alg. 1 line 22; the appendix reports SFT + DPO
  lowering MATH 52.25 -> 51.25); the verifier and refiner with SFT then DPO on sibling (positive,
  negative) pairs, DPO beta 0.2; LoRA adapters. Ours: the same (`dpo_roles=("verifier", "refiner")`,
  `dpo_beta=0.2`, one LoRA adapter per role); `dpo_roles` including "generator" adds DPO for it.
- Inference: several G -> V -> R chains and a majority vote (`eval_chains`).
- Deviations, each a choice:
  - Token-exact training: SFT rows and DPO pairs use the recorded prompt / completion token ids (DPO
    through `TokenDPOTrainer`, which skips TRL's re-tokenization); the paper's pipeline works on text.
  - Our prompts (`graphs/gvr.py`), not the paper's; answers are graded with `rewards.score`.
  - `propagate="binarized"` (a parent's value is the mean of its children's 0/1 labels) is offered as
    an option because the paper's description can be read either way; the default is the plain mean.
  - DPO uses every (positive, negative) sibling pair (`max_pairs_per_parent` caps it) and the post-SFT
    adapter as the reference; SFT and DPO run once each per role, no iterated rounds.
  - Outputs whose subtree holds no graded leaf (a failed call) get no value and no label (counted as
    `unvalued`), instead of counting as wrong.
  - Resume granularity: tree expansion resumes per question (finished episodes in the trace store);
    SFT / DPO resume per (role, phase), and inside a phase from TRL checkpoints when `save_every` > 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpo_agents.adapters import hot_load, role_spec
from mlpo_agents.adapters import save as save_adapter
from mlpo_agents.eval_cells import cell_from_store
from mlpo_agents.trace import ModelCall, Reward

from .common import RunConfig, load_adapter_weights, load_split, lora_copy, run_episodes
from .loop import TrainLogger
from .malt_data import (
    PARENT_ROLE,
    ROLES,
    Node,
    PreferencePair,
    RoleData,
    SFTExample,
    assign_values,
    build_datasets,
    build_tree,
    merged,
    sibling_sets,
    walk,
)
from .malt_eval import role_outcomes, team_outcomes
from .run import EVAL_STEP, Run, RunState, TrainResult, run_training, seeded_team, step_seed
from .trl_glue import dpo_rows, fit, sft_rows

if TYPE_CHECKING:
    from mlpo_agents.config import TeamConfig
    from mlpo_agents.models import ModelClient
    from mlpo_agents.tasks.base import Task
    from mlpo_agents.trace import TraceStore


__all__ = [
    "PARENT_ROLE", "ROLES", "MALTConfig", "MALTState", "Node", "PreferencePair", "RoleData", "SFTExample",
    "TrainResult", "assign_values", "build_datasets", "build_tree", "dpo", "evaluate", "merged", "sft",
    "sibling_sets", "train", "walk",
]  # fmt: skip


@dataclass
class MALTConfig(RunConfig):
    """Everything `mlpo train --algo malt` can set (shared fields: `RunConfig`); validated on construction."""

    team: str = "gvr"
    """Team YAML path or built-in name (topology gvr); every role must be served by `local/<spec>`."""
    questions: int = 32
    """Train questions to expand into trees."""
    branching: int = 3
    """n: samples per role at every tree node (n^3 leaves per question)."""
    threshold: float = 0.5
    """An output is positive when its value is strictly greater than this."""
    propagate: str = "mean"
    """Value of a parent: `mean` of the children's values, or `binarized` (mean of their 0/1 labels)."""
    max_pairs_per_parent: int | None = None
    """Cap on DPO pairs drawn from one sibling set (None: every positive × negative pair)."""
    adapter_per_role: bool = True
    """One LoRA adapter per role on the shared base; False trains one adapter on all roles' data."""
    roles: tuple[str, ...] = ROLES
    """Roles to train (others keep the base model)."""
    sft_epochs: float = 1.0
    """Epochs of SFT on each role's positives (0 skips SFT)."""
    sft_lr: float = 1e-4
    """SFT learning rate."""
    dpo_epochs: float = 1.0
    """Epochs of DPO on each role's pairs (0 skips DPO)."""
    dpo_lr: float = 5e-5
    """DPO learning rate."""
    dpo_beta: float = 0.2
    """DPO inverse temperature beta (paper: 0.2)."""
    dpo_roles: tuple[str, ...] = ("verifier", "refiner")
    """Roles trained with DPO after SFT; the paper trains the generator with SFT only (Alg. 1 line 22, §4.3)."""
    tree_temperature: float | None = 0.3
    """Sampling temperature of every role while expanding the trees (paper: 0.3; None: the team's own)."""
    batch_size: int = 4
    """Rows (SFT) or pairs (DPO) per optimizer step."""
    micro_batch_size: int | None = None
    """Rows or pairs per forward/backward (gradient accumulation up to `batch_size`, which it must divide): the
    same updates with less memory (a DPO forward of a 150k-token vocabulary holds rows x tokens x vocab
    logits); None = `batch_size`."""
    max_len: int = 1024
    """Examples longer than this (prompt + completion tokens) are left out."""
    eval_chains: int = 3
    """M: generator → verifier → refiner chains per question at evaluation, majority vote."""
    eval_temperature: float | None = None
    """Sampling temperature of every role at evaluation (None: the team's own)."""
    concurrency: int = 4
    """Episodes in flight during tree expansion and evaluation."""
    out: str = "runs/malt"
    """Run folder: traces, adapters, metrics, state."""
    save_every: int = 0
    """Also checkpoint inside an SFT / DPO phase every N optimizer steps (TRL checkpoints; 0: phase ends only)."""
    resume: bool = False
    """Continue in `out`: skip expanded questions, finished (role, phase) units and finished evaluations."""

    def __post_init__(self) -> None:
        self.roles = tuple(self.roles)
        self.dpo_roles = tuple(self.dpo_roles)
        problems = []
        if set(self.dpo_roles) - set(ROLES):
            problems.append(f"dpo_roles={self.dpo_roles}: choose from {ROLES}")
        if self.tree_temperature is not None and self.tree_temperature < 0:
            problems.append(f"tree_temperature={self.tree_temperature}: must be >= 0 or None")
        if self.questions < 1 or self.branching < 1:
            problems.append("questions and branching must be >= 1")
        if not 0.0 <= self.threshold < 1.0:
            problems.append(f"threshold={self.threshold}: must be in [0, 1)")
        if self.propagate not in ("mean", "binarized"):
            problems.append(f"propagate={self.propagate!r}: use mean or binarized")
        if self.max_pairs_per_parent is not None and self.max_pairs_per_parent < 1:
            problems.append("max_pairs_per_parent must be >= 1 or None")
        if not self.roles or set(self.roles) - set(ROLES):
            problems.append(f"roles={self.roles}: choose from {ROLES}")
        if self.sft_epochs < 0 or self.dpo_epochs < 0 or min(self.sft_lr, self.dpo_lr, self.dpo_beta) <= 0:
            problems.append("sft_epochs and dpo_epochs must be >= 0; sft_lr, dpo_lr and dpo_beta > 0")
        if self.batch_size < 1 or self.max_len < 2 or self.concurrency < 1 or self.eval_chains < 1:
            problems.append("batch_size, concurrency and eval_chains must be >= 1; max_len >= 2")
        if self.eval_questions < 0 or self.save_every < 0:
            problems.append("eval_questions and save_every must be >= 0")
        if self.micro_batch_size is not None and (
            self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size
        ):
            problems.append(f"micro_batch_size={self.micro_batch_size} must be >= 1 and divide batch_size={self.batch_size}")
        if problems:
            raise ValueError("invalid MALTConfig: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------- SFT and DPO


def sft(
    model: Any, tokenizer: Any, examples: list[SFTExample], config: MALTConfig, folder: Path, logger: TrainLogger,
    prefix: str, step: int,
) -> dict[str, Any]:  # fmt: skip
    """TRL SFTTrainer on the positives' recorded tokens; loss on completion tokens only."""
    rows = sft_rows(((e.prompt_ids, e.completion_ids) for e in examples), config.max_len)
    if not rows or config.sft_epochs == 0:
        return {f"{prefix}/examples": len(rows), f"{prefix}/skipped": 1}
    output = fit("sft", model, tokenizer, rows, folder, lr=config.sft_lr, epochs=config.sft_epochs,
                 **phase_options(config, logger, prefix, step))  # fmt: skip
    return {f"{prefix}/loss": float(output.training_loss), f"{prefix}/examples": len(rows),
            f"{prefix}/optimizer_steps": int(output.global_step)}  # fmt: skip


def dpo(
    model: Any, tokenizer: Any, pairs: list[PreferencePair], config: MALTConfig, folder: Path,
    logger: TrainLogger, prefix: str, step: int,
) -> dict[str, Any]:  # fmt: skip
    """DPO (TRL) on the recorded token ids of (chosen, rejected) siblings; reference = the adapter before DPO."""
    rows = dpo_rows(((p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs), config.max_len)
    if not rows or config.dpo_epochs == 0:
        return {f"{prefix}/pairs": len(rows), f"{prefix}/skipped": 1}
    output = fit("dpo", model, tokenizer, rows, folder, lr=config.dpo_lr, epochs=config.dpo_epochs,
                 beta=config.dpo_beta, **phase_options(config, logger, prefix, step))  # fmt: skip
    return {f"{prefix}/loss": float(output.training_loss), f"{prefix}/pairs": len(rows),
            f"{prefix}/optimizer_steps": int(output.global_step)}  # fmt: skip


def phase_options(config: MALTConfig, logger: TrainLogger, prefix: str, step: int) -> dict[str, Any]:
    """The `trl_glue.fit` options every phase shares: batch, seed, TRL checkpoints, logs under `prefix` at `step`."""
    return dict(
        seed=config.seed,
        batch_size=config.batch_size,
        micro_batch_size=config.micro_batch_size,
        save_every=config.save_every,
        resume=config.resume,
        on_log=lambda row: logger.log(step, {f"{prefix}/{k}": v for k, v in row.items()}),
    )


# ------------------------------------------------------------------------------------------- team, rollouts, evaluation


def gvr_team(team: TeamConfig, seed: int, name: str, temperature: float | None = None, **params: Any) -> Any:
    """A copy of `team` with new params and name, every agent (`generator-k`, ...) sampling with its own seed
    (`run.seeded_team`), every role at `temperature` (None: the team's own)."""
    params = {**team.params, **params}
    chains = range(1, int(params.get("chains", 1)) + 1)
    agents = [f"{role}-{k}" for role, k in itertools.product(ROLES, chains)]
    seeded = seeded_team(team, seed, roles=agents, temperatures=dict.fromkeys(ROLES, temperature))
    return seeded.model_copy(update={"name": name, "params": params})


def run_gvr(config: MALTConfig, client: ModelClient, team: TeamConfig, tasks: list[Task], store: TraceStore, **options: Any) -> Any:
    """Run `team` on `tasks`; episodes this team (by name) already finished in `store` are skipped."""
    return run_episodes(client, team, tasks, store, task_name=config.task, concurrency=config.concurrency,
                        resume=True, progress=config.progress, **options)  # fmt: skip


def expand_trees(
    config: MALTConfig, team: TeamConfig, client: ModelClient, store: TraceStore
) -> tuple[list[ModelCall], list[Reward], dict[str, Any]]:
    """Run the n×n×n tree on each train question (finished ones are skipped) and return its calls and rewards."""
    n = config.branching
    tasks = load_split(config, "train", config.questions)
    tree_team = gvr_team(
        team,
        step_seed(config.seed, 0, "tree"),
        f"{team.name}-malt-tree-n{n}"
        + ("" if config.tree_temperature is None else f"-t{config.tree_temperature}"),
        temperature=config.tree_temperature,
        chains=1,
        tree=True,
        generator_samples=n,
        verifier_samples=n,
        refiner_samples=n,
    )
    summary = run_gvr(config, client, tree_team, tasks, store, score_roles=("refiner",))
    ids = {t.id for t in tasks}
    latest = {
        e.task_id: e.episode_id
        for e in store.episodes(task=config.task, team=tree_team.name)
        if e.task_id in ids and e.status in ("done", "degraded")
    }
    episodes = list(latest.values())
    calls = store.calls(episode_id=episodes, role=list(ROLES))
    rewards = store.rewards(episode_id=episodes, name="correct")
    stats = {
        "tree/questions": len(episodes),
        "tree/failed_episodes": summary.failed,
        "tree/calls": len(calls),
        "tree/leaves": sum(c.role == "refiner" for c in calls),
        "tree/resumed": summary.skipped,
    }
    return calls, rewards, stats


def evaluate(config: MALTConfig, team: TeamConfig, client: ModelClient, store: TraceStore, label: str) -> dict[str, Any]:
    """Held-out accuracy of the team as routed now: M chains per question, majority vote (Wilson 95% CI);
    `team_correct` maps each question to its strict 0/1 outcome (for paired tests), `lenient_accuracy`
    is the lenient figure, `roles` each role's own replies (`malt_eval`)."""
    tasks = load_split(config, "test", config.eval_questions)
    eval_team = gvr_team(
        team,
        step_seed(config.seed, EVAL_STEP),
        f"{team.name}-malt-eval-{label}",
        config.eval_temperature,
        chains=config.eval_chains,
        tree=False,
        generator_samples=None,
        verifier_samples=None,
        refiner_samples=None,
    )
    summary = run_gvr(config, client, eval_team, tasks, store, score_roles=())
    cell = cell_from_store(store, eval_team.name, config.task, [t.id for t in tasks], summary.wall_s)
    outcomes = team_outcomes(store, eval_team.name, config.task, tasks)
    keys = ("accuracy", "ci_low", "ci_high", "n", "failed", "wall_s", "completion_tokens_per_q")
    return {**{k: getattr(cell, k) for k in keys}, "lenient_accuracy": outcomes.lenient_accuracy,
            "team_correct": outcomes.correct, "roles": role_outcomes(store, eval_team.name, config.task, tasks)}  # fmt: skip


# ------------------------------------------------------------------------------------------- training


@dataclass
class MALTState(RunState):
    """What a MALT run carries from phase to phase and in its checkpoints (with `RunState.evaluation`)."""

    done: list[str] = field(default_factory=list)
    """Finished phases, `<adapter>/sft` and `<adapter>/dpo`, in order."""


def units_of(config: MALTConfig) -> dict[str, tuple[str, ...]]:
    """Adapter name -> the roles it serves (one per role, or one shared `team` adapter)."""
    return {role: (role,) for role in config.roles} if config.adapter_per_role else {"team": config.roles}


def route(client: ModelClient, adapters: dict[str, Path], units: dict[str, tuple[str, ...]], tag: str) -> None:
    """Hot-load each adapter into its roles' engine and route the roles to it (`adapters.hot_load`)."""
    for unit, roles in units.items():
        for role in roles:
            hot_load(client, role, adapters[unit], f"malt-{tag}-{unit}")


def tree_data(config: MALTConfig, team: TeamConfig, client: ModelClient, store: TraceStore, run: Run[MALTState]) -> dict[str, RoleData]:
    """Expand the trees (finished questions are skipped), assign values and build each role's data; logged."""
    say(config, f"[malt] expanding {config.questions} trees (n={config.branching}: {config.branching**3} leaves each)")
    calls, rewards, tree_stats = expand_trees(config, team, client, store)
    roots = assign_values(build_tree(calls, rewards), config.threshold, config.propagate)
    data = build_datasets(roots, config.max_pairs_per_parent)
    counts = {role: d.counts for role, d in data.items()}
    leaf_values = [n.value for n in walk(roots) if n.role == "refiner" and n.value is not None]
    tree_stats["tree/leaf_accuracy"] = sum(leaf_values) / len(leaf_values) if leaf_values else float("nan")
    data_stats = {f"data/{r}/{k}": v for r, c in counts.items() for k, v in c.items()}
    run.logger.log(run.first_step, {**tree_stats, **data_stats})
    say(config, f"[malt] tree: {json.dumps(tree_stats)}\n[malt] data per role: {json.dumps(counts)}")
    return data


class MALTPhases:
    """`step(n) -> metrics` of MALT: step n runs phase n of `phases`, each adapter's SFT then its DPO (the
    verifier and refiner by default; the generator's DPO phase trains on no pairs). Each phase saves its adapter:
    `<adapter>-sft`, then `<adapter>` (what is served), so a resumed run continues from the next phase."""

    def __init__(
        self, config: MALTConfig, team: TeamConfig, data: dict[str, RoleData], units: dict[str, tuple[str, ...]],
        run: Run[MALTState],
    ):  # fmt: skip
        self.config, self.team, self.data, self.units, self.run = config, team, data, units, run
        self.phases = [(unit, phase) for unit in units for phase in ("sft", "dpo")]
        self.models: dict[str, Any] = {}  # unit -> its model, from its SFT phase to its DPO phase

    def __call__(self, n: int) -> dict[str, Any]:
        from mlpo_agents import zoo

        config, (unit, phase) = self.config, self.phases[n - 1]
        state, roles = self.run.state, self.units[unit]
        if f"{unit}/{phase}" in state.done:
            say(config, f"[malt] {unit}: {phase} finished earlier, skipped")
            return {}
        spec = role_spec(self.team, roles[0])
        tokenizer, data = zoo.resolve(spec)[1], merged(self.data, roles)
        trl, adapters, logger = self.run.out / "trl", self.run.out / "adapters", self.run.logger
        if phase == "sft":
            model = self.models[unit] = self.fresh(unit, spec)
            say(config, f"[malt] {unit}: SFT on {len(data.sft)} positives" + ("" if data.sft else " (skipped)"))
            metrics = sft(model, tokenizer, data.sft, config, trl / f"{unit}-sft", logger, f"sft/{unit}", n)
            folder = adapters / f"{unit}-sft"
        else:
            model = self.models.pop(unit, None) or self.restored(unit, spec)
            pairs = [p for p in data.pairs if p.role in config.dpo_roles]  # the generator: SFT only
            say(config, f"[malt] {unit}: DPO on {len(pairs)} pairs" + ("" if pairs else " (skipped)"))
            metrics = dpo(model, tokenizer, pairs, config, trl / f"{unit}-dpo", logger, f"dpo/{unit}", n)
            folder = adapters / unit
        meta = {"malt_phase": phase, "roles": list(roles)}
        save_adapter(model, folder, zoo.base_model_id(spec), meta=meta)
        state.done.append(f"{unit}/{phase}")
        return metrics

    def fresh(self, unit: str, spec: str) -> Any:
        """A new LoRA copy for `unit`, seeded by its place among the adapters."""
        k = list(self.units).index(unit)
        random.seed(self.config.seed + k)
        return lora_copy(spec, self.config, seed=self.config.seed + k)

    def restored(self, unit: str, spec: str) -> Any:
        """`unit`'s model as its SFT phase left it (a resumed run: from the saved `<unit>-sft` adapter)."""
        model = self.fresh(unit, spec)
        folder = self.run.out / "adapters" / f"{unit}-sft"
        load_adapter_weights(model, folder)
        say(self.config, f"[malt] {unit}: SFT finished earlier, restored {folder}")
        return model


def say(config: MALTConfig, text: str) -> None:
    """A progress line (when `config.progress`)."""
    if config.progress:
        print(text)


def train(config: MALTConfig) -> TrainResult:
    """Expand trees, assign values, build per-role data, SFT then DPO each adapter, evaluate before and after."""
    from mlpo_agents.config import load_team
    from mlpo_agents.models import ModelClient
    from mlpo_agents.trace import TraceStore

    team = load_team(config.team)
    if team.topology != "gvr":
        raise ValueError(
            f"team {team.name!r} has topology {team.topology!r}; MALT trains a gvr team (e.g. --team gvr)"
        )
    units = units_of(config)
    specs = {unit: {role_spec(team, r) for r in roles} for unit, roles in units.items()}
    if any(len(s) > 1 for s in specs.values()):
        raise ValueError(
            f"one shared adapter needs one base model for its roles, got {specs}; use adapter_per_role"
        )
    run = Run(config, MALTState(), save_every=1)  # a state checkpoint after every phase
    run.resume({"run": run.out})
    store = TraceStore(config.traces or run.out / "traces.sqlite")
    client = ModelClient(team, store)
    data = tree_data(config, team, client, store, run)
    adapters = {unit: run.out / "adapters" / unit for unit in units}

    def evaluation(label: str) -> dict[str, Any]:
        if label == "after":
            tag = hashlib.sha1(str(run.out.resolve()).encode()).hexdigest()[:8]
            route(client, adapters, units, tag)
        say(config, f"[malt] evaluating the {'base' if label == 'before' else 'trained'} team: "
                    f"{config.eval_questions} test questions × {config.eval_chains} chains")  # fmt: skip
        return evaluate(config, team, client, store, label)

    phases = MALTPhases(config, team, data, units, run)
    result = run_training(run, phases, steps=len(phases.phases), evaluate=evaluation, eval_keys="eval/{label}/{k}")
    store.close()
    by_role = {role: adapters[unit] for unit, roles in units.items() for role in roles}
    counts = {role: d.counts for role, d in data.items()}
    return dataclasses.replace(result, adapters=by_role, details={"counts": counts})
