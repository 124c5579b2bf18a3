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
majority vote. Read top to bottom: `MALTConfig` → credit assignment (pure) → datasets (pure) →
`sft` / `dpo` → `evaluate` → `train`.

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
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpo_agents.adapters import role_spec, serve_adapter
from mlpo_agents.eval_cells import cell_from_store
from mlpo_agents.trace import ModelCall, Reward

from .common import (
    RunConfig,
    load_adapter_weights,
    load_split,
    lora_copy,
    run_episodes,
)
from .loop import TrainLogger

ROLES = ("generator", "verifier", "refiner")
PARENT_ROLE = {"generator": None, "verifier": "generator", "refiner": "verifier"}


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
        if problems:
            raise ValueError("invalid MALTConfig: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------- credit assignment


@dataclass
class Node:
    """One output in a MALT tree: an answer, a critique or a refinement, with its value and label."""

    call: ModelCall
    children: list[Node] = field(default_factory=list)
    reward: float | None = None
    """The leaf's grade (refinements only; None when it was never graded)."""
    value: float | None = None
    """Set by `assign_values`; None when no graded leaf lies below."""
    positive: bool | None = None
    """value > threshold (None when unvalued)."""

    @property
    def role(self) -> str:
        """The role that wrote this output."""
        return self.call.role


def build_tree(
    calls: Sequence[ModelCall], rewards: Sequence[Reward], reward_name: str = "correct"
) -> list[Node]:
    """Generator answers as roots, their critiques below, the critiques' refinements below those.

    Links come from `ModelCall.parent_call_id`; leaves take the `reward_name` reward recorded for their call.
    Raises ValueError on calls that do not form gvr trees (unknown role, missing or wrong-role parent).
    """
    graded = {r.call_id: r.value for r in rewards if r.name == reward_name and r.call_id is not None}
    nodes = {c.call_id: Node(c, reward=graded.get(c.call_id) if c.role == "refiner" else None) for c in calls}
    roots = []
    for node in nodes.values():
        c = node.call
        if c.role not in PARENT_ROLE:
            raise ValueError(f"call {c.call_id} has role {c.role!r}; MALT trees hold only {ROLES}")
        if PARENT_ROLE[c.role] is None:
            roots.append(node)
            continue
        parent = nodes.get(c.parent_call_id or "")
        if parent is None or parent.role != PARENT_ROLE[c.role]:
            raise ValueError(
                f"{c.role} call {c.call_id} has parent {c.parent_call_id!r}, which is not a {PARENT_ROLE[c.role]} "
                "call of these traces; record trees with build_gvr(tree=True) and pass whole episodes"
            )
        parent.children.append(node)
    return roots


def assign_values(roots: Sequence[Node], threshold: float = 0.5, propagate: str = "mean") -> list[Node]:
    """Value iteration, leaves up: leaf value = reward; parent value = mean over valued children; label value > threshold."""

    def visit(node: Node) -> float | None:
        if node.role == "refiner":
            node.value = node.reward
        else:
            valued = [(v, child) for child in node.children if (v := visit(child)) is not None]
            if propagate == "binarized":
                labels = [1.0 if child.positive else 0.0 for _, child in valued]
                node.value = sum(labels) / len(labels) if labels else None
            else:
                node.value = sum(v for v, _ in valued) / len(valued) if valued else None
        node.positive = None if node.value is None else node.value > threshold
        return node.value

    for root in roots:
        visit(root)
    return list(roots)


def walk(roots: Sequence[Node]) -> Iterator[Node]:
    """Every node, depth first."""
    for root in roots:
        yield root
        yield from walk(root.children)


# ------------------------------------------------------------------------------------------- datasets


@dataclass
class SFTExample:
    """A positive output: its recorded prompt and completion token ids."""

    call_id: str
    role: str
    value: float
    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass
class PreferencePair:
    """Two siblings (same parent, same prompt): a positive (chosen) and a negative (rejected) output."""

    role: str
    parent: str
    """The parent call id (for the generator: `question:<episode id>`)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_value: float
    rejected_value: float
    chosen_call_id: str
    rejected_call_id: str


@dataclass
class RoleData:
    """One role's training data and how it was obtained."""

    sft: list[SFTExample] = field(default_factory=list)
    pairs: list[PreferencePair] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("outputs", "positive", "negative", "unvalued", "prompt_mismatch"), 0
        )
    )


def sibling_sets(roots: Sequence[Node]) -> Iterator[tuple[str, list[Node]]]:
    """(parent key, children) for every set of outputs sharing a parent; answers are grouped by question."""
    by_question: dict[str, list[Node]] = {}
    for root in roots:
        by_question.setdefault(f"question:{root.call.episode_id}", []).append(root)
    yield from by_question.items()
    for node in walk(roots):
        if node.children:
            yield node.call.call_id, node.children


def build_datasets(roots: Sequence[Node], max_pairs_per_parent: int | None = None) -> dict[str, RoleData]:
    """Per role: SFT examples from the positives and DPO pairs (positive, negative) of the same parent."""
    data = {role: RoleData() for role in ROLES}
    for node in walk(roots):
        d = data[node.role]
        d.counts["outputs"] += 1
        if node.value is None:
            d.counts["unvalued"] += 1
        elif node.positive:
            d.counts["positive"] += 1
            c = node.call
            d.sft.append(
                SFTExample(
                    c.call_id, c.role, node.value, list(c.prompt_token_ids), list(c.completion_token_ids)
                )
            )
        else:
            d.counts["negative"] += 1
    for parent, siblings in sibling_sets(roots):
        positives = [n for n in siblings if n.positive]
        negatives = [n for n in siblings if n.positive is False]
        pairs = [(p, n) for p, n in itertools.product(positives, negatives) if p.value != n.value]
        for chosen, rejected in pairs[:max_pairs_per_parent]:
            assert chosen.value is not None and rejected.value is not None  # labelled, hence valued
            d = data[chosen.role]
            if chosen.call.prompt_token_ids != rejected.call.prompt_token_ids:
                d.counts["prompt_mismatch"] += 1  # siblings always share a prompt; never pair across prompts
                continue
            d.pairs.append(
                PreferencePair(
                    chosen.role,
                    parent,
                    list(chosen.call.prompt_token_ids),
                    list(chosen.call.completion_token_ids),
                    list(rejected.call.completion_token_ids),
                    chosen.value,
                    rejected.value,
                    chosen.call.call_id,
                    rejected.call.call_id,
                )
            )
    for d in data.values():
        d.counts["sft"], d.counts["pairs"] = len(d.sft), len(d.pairs)
    return data


def merged(data: dict[str, RoleData], roles: Sequence[str]) -> RoleData:
    """The union of several roles' data (the shared-adapter mode)."""
    out = RoleData()
    for role in roles:
        out.sft += data[role].sft
        out.pairs += data[role].pairs
        for key, value in data[role].counts.items():
            out.counts[key] = out.counts.get(key, 0) + value
    return out


# ------------------------------------------------------------------------------------------- SFT and DPO


def _trainer_dpo() -> type:
    from trl import DPOTrainer

    class TokenDPOTrainer(DPOTrainer):
        """DPOTrainer on rows that already hold `prompt_ids`, `chosen_ids`, `rejected_ids`: no re-tokenization."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

    return TokenDPOTrainer


def _log_callback(logger: TrainLogger, prefix: str, offset: int) -> Any:
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        """Sends TRL's log rows to the run's TrainLogger under `<prefix>/...`, on a run-wide step axis."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            numbers = {f"{prefix}/{k}": v for k, v in (logs or {}).items() if isinstance(v, int | float)}
            if numbers:
                logger.log(offset + state.global_step, numbers)

    return Forward()


def _training_args(config: MALTConfig, folder: Path, epochs: float, lr: float) -> dict[str, Any]:
    saving = (
        {"save_strategy": "steps", "save_steps": config.save_every}
        if config.save_every
        else {"save_strategy": "no"}
    )
    return dict(
        output_dir=str(folder),
        num_train_epochs=epochs,
        learning_rate=lr,
        seed=config.seed,
        per_device_train_batch_size=config.batch_size,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=None,
        gradient_checkpointing=False,  # TRL's default (True) recomputes activations: slower, and it stays on
        **saving,
    )


def _resume_point(folder: Path, resume: bool) -> str | None:
    checkpoints = (
        sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if resume else []
    )
    return str(checkpoints[-1]) if checkpoints else None


def sft(
    model: Any,
    tokenizer: Any,
    examples: list[SFTExample],
    config: MALTConfig,
    folder: Path,
    logger: TrainLogger,
    prefix: str,
    offset: int,
) -> dict[str, Any]:
    """TRL SFTTrainer on the positives' recorded tokens; loss on completion tokens only."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [
        {
            "input_ids": e.prompt_ids + e.completion_ids,
            "labels": [-100] * len(e.prompt_ids) + e.completion_ids,
        }
        for e in examples
        if len(e.prompt_ids) + len(e.completion_ids) <= config.max_len
    ]
    if not rows or config.sft_epochs == 0:
        return {f"{prefix}/examples": len(rows), f"{prefix}/skipped": 1}
    args = SFTConfig(**_training_args(config, folder, config.sft_epochs, config.sft_lr))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[_log_callback(logger, prefix, offset)],
    )
    output = trainer.train(resume_from_checkpoint=_resume_point(folder, config.resume))
    model.eval()
    return {
        f"{prefix}/loss": float(output.training_loss),
        f"{prefix}/examples": len(rows),
        f"{prefix}/optimizer_steps": int(output.global_step),
    }


def dpo(
    model: Any,
    tokenizer: Any,
    pairs: list[PreferencePair],
    config: MALTConfig,
    folder: Path,
    logger: TrainLogger,
    prefix: str,
    offset: int,
) -> dict[str, Any]:
    """DPO (TRL) on the recorded token ids of (chosen, rejected) siblings; reference = the adapter before DPO."""
    from datasets import Dataset
    from trl import DPOConfig

    rows = [
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
        for p in pairs
        if len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= config.max_len
    ]
    if not rows or config.dpo_epochs == 0:
        return {f"{prefix}/pairs": len(rows), f"{prefix}/skipped": 1}
    args = DPOConfig(**_training_args(config, folder, config.dpo_epochs, config.dpo_lr), beta=config.dpo_beta)
    trainer = _trainer_dpo()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[_log_callback(logger, prefix, offset)],
    )
    output = trainer.train(resume_from_checkpoint=_resume_point(folder, config.resume))
    if "ref" in model.peft_config:  # TRL's frozen reference copy; the served adapter is "default" alone
        model.delete_adapter("ref")
    model.set_adapter("default")
    model.eval()
    return {
        f"{prefix}/loss": float(output.training_loss),
        f"{prefix}/pairs": len(rows),
        f"{prefix}/optimizer_steps": int(output.global_step),
    }


# ------------------------------------------------------------------------------------------- team, rollouts, evaluation


def seeded(team: Any, seed: int, name: str, temperature: float | None = None, **params: Any) -> Any:
    """A copy of `team` with new params and name, every agent (`generator-k`, ...) sampling with its own seed."""
    roles: dict[str, Any] = {}
    chains = int({**team.params, **params}.get("chains", 1))
    for i, (role, k) in enumerate(itertools.product(ROLES, range(1, chains + 1))):
        rc = team.role(role).model_copy(deep=True)
        rc.sampling.seed = (seed * 1_000_003 + 7919 * i) % (1 << 31)  # chains must not repeat each other
        if temperature is not None:
            rc.sampling.temperature = temperature
        roles[role] = roles.get(role) or rc
        roles[f"{role}-{k}"] = rc
    return team.model_copy(update={"roles": roles, "name": name, "params": {**team.params, **params}})


def expand_trees(
    config: MALTConfig, team: Any, client: Any, store: Any
) -> tuple[list[ModelCall], list[Reward], dict[str, Any]]:
    """Run the n×n×n tree on each train question (finished ones are skipped) and return its calls and rewards."""
    n = config.branching
    tasks = load_split(config, "train", config.questions)
    tree_team = seeded(
        team,
        config.seed,
        f"{team.name}-malt-tree-n{n}"
        + ("" if config.tree_temperature is None else f"-t{config.tree_temperature}"),
        temperature=config.tree_temperature,
        chains=1,
        tree=True,
        generator_samples=n,
        verifier_samples=n,
        refiner_samples=n,
    )
    summary = run_episodes(
        client,
        tree_team,
        tasks,
        store,
        task_name=config.task,
        concurrency=config.concurrency,
        resume=True,
        progress=config.progress,
        score_roles=("refiner",),
    )
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


def evaluate(config: MALTConfig, team: Any, client: Any, store: Any, label: str) -> dict[str, float]:
    """Held-out accuracy of the team as routed now: M chains per question, majority vote (Wilson 95% CI)."""
    tasks = load_split(config, "test", config.eval_questions)
    eval_team = seeded(
        team,
        config.seed + 1,
        f"{team.name}-malt-eval-{label}",
        config.eval_temperature,
        chains=config.eval_chains,
        tree=False,
        generator_samples=None,
        verifier_samples=None,
        refiner_samples=None,
    )
    summary = run_episodes(
        client,
        eval_team,
        tasks,
        store,
        task_name=config.task,
        concurrency=config.concurrency,
        resume=True,
        progress=config.progress,
        score_roles=(),
    )
    cell = cell_from_store(store, eval_team.name, config.task, [t.id for t in tasks], summary.wall_s)
    return {
        "accuracy": cell.accuracy,
        "ci_low": cell.ci_low,
        "ci_high": cell.ci_high,
        "n": cell.n,
        "failed": cell.failed,
        "wall_s": cell.wall_s,
    }


# ------------------------------------------------------------------------------------------- run state


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


@dataclass
class TrainResult:
    """What `train` returns."""

    out: Path
    adapters: dict[str, Path]
    """Role -> its trained adapter folder (peft format)."""
    counts: dict[str, dict[str, int]]
    """Role -> outputs / positive / negative / unvalued / sft / pairs."""
    evaluation: dict[str, dict[str, float]]
    """{"before": {...}, "after": {...}}: majority-vote team accuracy on held-out questions."""
    history: list[dict[str, Any]]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (what `mlpo train` prints)."""
        return {
            "out": str(self.out),
            "adapters": {r: str(p) for r, p in self.adapters.items()},
            "counts": self.counts,
            "evaluation": self.evaluation,
            "wall_s": round(self.wall_s, 1),
        }


def units_of(config: MALTConfig) -> dict[str, tuple[str, ...]]:
    """Adapter name -> the roles it serves (one per role, or one shared `team` adapter)."""
    return {role: (role,) for role in config.roles} if config.adapter_per_role else {"team": config.roles}


def route(
    client: Any, team: Any, adapters: dict[str, Path], units: dict[str, tuple[str, ...]], tag: str
) -> None:
    """Load each adapter into its role's engine and route the role to it."""
    from mlpo_agents import zoo
    from mlpo_agents.engine import get_engine

    for unit, roles in units.items():
        for role in roles:
            spec = role_spec(team, role)
            name = f"malt-{tag}-{unit}"
            serve_adapter(client, get_engine(spec), role, name, adapters[unit], spec, zoo.base_model_id(spec))


# ------------------------------------------------------------------------------------------- training


def train(config: MALTConfig) -> TrainResult:
    """Expand trees, assign values, build per-role data, SFT then DPO each adapter, evaluate before and after."""
    from mlpo_agents import zoo
    from mlpo_agents.config import load_team
    from mlpo_agents.models import ModelClient
    from mlpo_agents.trace import TraceStore

    from .lora import save_adapter

    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
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
    state_path = out / "malt_state.json"
    state: dict[str, Any] = {"step": 0, "done": [], "evaluation": {}, "metrics": {}}
    if config.resume and state_path.exists():
        state = json.loads(state_path.read_text())
    logger = TrainLogger(out, dataclasses.asdict(config), resume=config.resume)
    logger.truncate(state["step"])
    store = TraceStore(config.traces or out / "traces.sqlite")
    client = ModelClient(team, store)
    say = print if config.progress else (lambda *a, **k: None)
    tag = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:8]

    def finish(unit: str, metrics: dict[str, Any]) -> None:
        state["done"].append(unit)
        state["metrics"].update(metrics)
        _write_json(state_path, state)

    if config.eval_questions and "before" not in state["evaluation"]:
        say(
            f"[malt] evaluating the base team: {config.eval_questions} test questions × {config.eval_chains} chains"
        )
        state["evaluation"]["before"] = evaluate(config, team, client, store, "before")
        logger.log(0, {f"eval/before/{k}": v for k, v in state["evaluation"]["before"].items()})
        _write_json(state_path, state)

    say(
        f"[malt] expanding {config.questions} trees (n={config.branching}: {config.branching**3} leaves each)"
    )
    calls, rewards, tree_stats = expand_trees(config, team, client, store)
    client.team = team
    roots = assign_values(build_tree(calls, rewards), config.threshold, config.propagate)
    data = build_datasets(roots, config.max_pairs_per_parent)
    counts = {role: d.counts for role, d in data.items()}
    leaf_values = [n.value for n in walk(roots) if n.role == "refiner" and n.value is not None]
    tree_stats["tree/leaf_accuracy"] = sum(leaf_values) / len(leaf_values) if leaf_values else float("nan")
    logger.log(
        state["step"], {**tree_stats, **{f"data/{r}/{k}": v for r, c in counts.items() for k, v in c.items()}}
    )
    say(f"[malt] tree: {json.dumps(tree_stats)}\n[malt] data per role: {json.dumps(counts)}")

    adapters: dict[str, Path] = {}
    for k, (unit, roles) in enumerate(units.items()):
        spec = role_spec(team, roles[0])
        base_id = zoo.base_model_id(spec)
        unit_data = merged(data, roles)
        dpo_pairs = [p for p in unit_data.pairs if p.role in config.dpo_roles]  # the generator: SFT only
        adapters[unit] = out / "adapters" / unit
        if f"{unit}/dpo" in state["done"]:
            say(f"[malt] {unit}: finished earlier, skipped")
            continue
        tokenizer = zoo.resolve(spec)[1]
        random.seed(config.seed + k)
        model = lora_copy(spec, config, seed=config.seed + k)
        sft_folder = out / "adapters" / f"{unit}-sft"
        if f"{unit}/sft" in state["done"]:
            load_adapter_weights(model, sft_folder)
            say(f"[malt] {unit}: SFT finished earlier, restored {sft_folder}")
        else:
            say(
                f"[malt] {unit}: SFT on {len(unit_data.sft)} positives"
                + ("" if unit_data.sft else " (skipped)")
            )
            metrics = sft(
                model,
                tokenizer,
                unit_data.sft,
                config,
                out / "trl" / f"{unit}-sft",
                logger,
                f"sft/{unit}",
                state["step"],
            )
            save_adapter(
                model, sft_folder, base_model=base_id, meta={"malt_phase": "sft", "roles": list(roles)}
            )
            state["step"] += int(metrics.get(f"sft/{unit}/optimizer_steps", 0))
            logger.log(state["step"], metrics)
            finish(f"{unit}/sft", metrics)
        say(f"[malt] {unit}: DPO on {len(dpo_pairs)} pairs" + ("" if dpo_pairs else " (skipped)"))
        metrics = dpo(
            model,
            tokenizer,
            dpo_pairs,
            config,
            out / "trl" / f"{unit}-dpo",
            logger,
            f"dpo/{unit}",
            state["step"],
        )
        save_adapter(
            model, adapters[unit], base_model=base_id, meta={"malt_phase": "dpo", "roles": list(roles)}
        )
        state["step"] += int(metrics.get(f"dpo/{unit}/optimizer_steps", 0))
        logger.log(state["step"], metrics)
        finish(f"{unit}/dpo", metrics)
        del model

    route(client, team, adapters, units, tag)
    if config.eval_questions and "after" not in state["evaluation"]:
        say("[malt] evaluating the trained team")
        state["evaluation"]["after"] = evaluate(config, team, client, store, "after")
        logger.log(state["step"], {f"eval/after/{k}": v for k, v in state["evaluation"]["after"].items()})
        _write_json(state_path, state)
    state["counts"] = counts
    _write_json(state_path, state)
    logger.close()
    store.close()
    by_role = {role: adapters[unit] for unit, roles in units.items() for role in roles}
    return TrainResult(out, by_role, counts, state["evaluation"], logger.history, time.perf_counter() - start)
