"""GPU recipes: a trainer at the papers' scale (7-8B models) written down as one YAML file, checked on CPU.

A recipe (`recipes/<name>.yaml`) holds everything a GPU run needs: the hardware it assumes, the vLLM
servers (leader, peers), the team routed to them (a team file whose `api_base`s are `${ENV_VAR}`
placeholders), the trainer config (algorithm + fields of MLPOConfig / MAGRPOConfig / MALTConfig), the
accelerate launch (processes, DDP or FSDP, mixed precision) and the trace store (a `postgresql://` URL
from an environment variable, so many rollout workers can write to it). `check_recipe` validates it all
without loading a model or contacting a server, including that the layout fits the GPUs by the memory
estimates of `trainers/estimates.py`. `trainers/recipe_plan.py` prints the plan (`format_plan`: the
servers to start, the trainer config, the batch shapes of one optimizer step and a memory estimate per
GPU) for `mlpo recipe check NAME` and `mlpo train --recipe NAME --dry-run`; tests/test_recipes.py
dry-runs every shipped recipe so they cannot rot.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlpo_agents.config import TeamConfig

from .estimates import GIB, TrainMemory, param_count, role_budgets, server_memory, step_shapes, train_memory

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
"""The shipped recipes (`recipes/` at the top of the repository)."""
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
TRAINED_ROLES = {
    "mlpo": lambda c: ("leader",),
    "magrpo": lambda c: tuple(c.agents),
    "malt": lambda c: tuple(c.roles),
}
"""The team roles each algorithm updates, from its config."""
RECIPE_OWNED = ("team", "traces")
"""Trainer fields the recipe sets itself (from `team:` and `store:`)."""


class RecipeError(ValueError):
    """A recipe that cannot be used as written; the message names the file, the key and the fix."""


# ------------------------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Hardware(_Strict):
    """What the recipe assumes the machine has."""

    gpus: int = Field(ge=1)
    """GPUs on the node, numbered 0..gpus-1."""
    gpu: str
    """GPU model, e.g. H100-80GB (documentation only)."""
    memory_gib: float = Field(gt=0)
    """Memory per GPU in GiB."""


class ModelShape(_Strict):
    """A model's shape as its config.json gives it (not read here: no download on CPU)."""

    hf_id: str
    """Hugging Face id the servers and trainers load, e.g. Qwen/Qwen2.5-7B-Instruct."""
    layers: int = Field(ge=1)
    """num_hidden_layers (L)."""
    hidden: int = Field(ge=1)
    """hidden_size (h)."""
    intermediate: int = Field(ge=1)
    """intermediate_size of the gated MLP (I)."""
    heads: int = Field(ge=1)
    """num_attention_heads."""
    kv_heads: int = Field(ge=1)
    """num_key_value_heads (kv)."""
    head_dim: int = Field(ge=1)
    """Per-head dimension (d)."""
    vocab: int = Field(ge=1)
    """vocab_size (V)."""
    tied_embeddings: bool = False
    """tie_word_embeddings: the output head shares the embedding matrix."""


class Server(_Strict):
    """One vLLM OpenAI server (`vllm serve`)."""

    name: str
    """Label in the plan."""
    model: str
    """A key of `models`."""
    served_name: str
    """--served-model-name; the team's deployment is `hosted_vllm/<served_name>`."""
    api_base: str
    """Where the team reaches it: a `${VAR}` placeholder (e.g. http://host:8000/v1 at run time)."""
    port: int = Field(8000, ge=1, le=65535)
    """--port."""
    gpus: list[int]
    """GPU ids (CUDA_VISIBLE_DEVICES); their count is the tensor-parallel size."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """--gpu-memory-utilization: the fraction of each GPU vLLM reserves (weights + KV cache)."""
    max_model_len: int = Field(8192, ge=1)
    """--max-model-len: longest prompt + completion."""
    enable_lora: bool = False
    """--enable-lora (a trained role's adapters are loaded at run time)."""
    max_lora_rank: int = Field(16, ge=1)
    """--max-lora-rank: must be >= the trainer's lora_r."""
    max_loras: int = Field(2, ge=1)
    """--max-loras: adapters resident at once (the served and the next version, per trained role)."""


class Launch(_Strict):
    """How the update runs: `accelerate launch` processes on their GPUs."""

    num_processes: int = Field(ge=1)
    """Training processes (one per GPU)."""
    gpus: list[int]
    """GPU ids of the training processes (--gpu_ids)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: a full replica per process; fsdp: FULL_SHARD of weights and LoRA states."""
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    """--mixed_precision."""
    gradient_checkpointing: bool = True
    """Recompute activations layer by layer in the backward pass."""


class Store(_Strict):
    """The trace store every rollout worker writes to."""

    traces: str
    """A `${VAR}` placeholder holding a postgresql:// URL."""


class Trainer(_Strict):
    """The algorithm and the fields of its config dataclass (`team` and `traces` come from the recipe)."""

    algo: Literal["mlpo", "magrpo", "malt"]
    """Training algorithm."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Fields of MLPOConfig / MAGRPOConfig / MALTConfig; defaults for the others."""


class Recipe(_Strict):
    """One GPU recipe file."""

    name: str
    """Recipe name (the file stem)."""
    paper: str
    """The paper whose scale it follows, and what of it was verified."""
    hardware: Hardware
    """The machine it assumes."""
    env: dict[str, str]
    """Environment variables the recipe reads (`${NAME}` placeholders) -> what each must hold."""
    models: dict[str, ModelShape]
    """Model shapes by name (servers and the trained base refer to them)."""
    question_tokens: int = Field(ge=1)
    """Budget of a question with its chat template; prompts of later roles add earlier outputs to it."""
    servers: list[Server]
    """vLLM servers to start."""
    team: TeamConfig
    """The team (team-file format) routed to the servers."""
    trainer: Trainer
    """Algorithm and config."""
    launch: Launch
    """accelerate launch of the update."""
    store: Store
    """Trace store."""


# ------------------------------------------------------------------------------------------- loading


def recipe_path(name: str | Path) -> Path:
    """A recipe file: a path, or the name of a shipped one (`recipes/<name>.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES / f"{path.name.removesuffix('.yaml')}.yaml"  # not .stem: names hold dots
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml"))) or "none"
    raise RecipeError(f"{name}: no such recipe file (shipped recipes: {known})")


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _dataclass_defaults(cls: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@dataclass
class Checked:
    """A validated recipe, its trainer config and its file."""

    recipe: Recipe
    config: Any
    """The trainer config dataclass instance (validated by its own `__post_init__`)."""
    path: Path


def check_recipe(name: str | Path, overrides: dict[str, Any] | None = None) -> Checked:
    """Load and validate a recipe on CPU (no model, no server); `overrides` replace trainer fields."""
    path = recipe_path(name)
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level")
    declared = set(data.get("env") or {})
    used = {
        n for s in _strings({k: v for k, v in data.items() if k != "env"}) for n in PLACEHOLDER.findall(s)
    }
    if used - declared:
        raise RecipeError(
            f"{where}: placeholder(s) {', '.join(f'${{{n}}}' for n in sorted(used - declared))} are not declared "
            "under `env:`; add `NAME: what it holds` there or fix the name"
        )
    if declared - used:
        raise RecipeError(
            f"{where}: env declares {', '.join(sorted(declared - used))} but nothing uses it; drop it"
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        lines = [
            f"{where}: {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        ]
        raise RecipeError("\n".join(lines)) from None
    config = _trainer_config(recipe, where, overrides or {})
    _check_layout(recipe, config, where)
    return Checked(recipe, config, path)


def _trainer_config(recipe: Recipe, where: str, overrides: dict[str, Any]) -> Any:
    from .loop import ALGOS, _trainer_module

    config_cls = getattr(_trainer_module(recipe.trainer.algo), ALGOS[recipe.trainer.algo][1])
    names = {f.name for f in dataclasses.fields(config_cls)}
    fields = {**recipe.trainer.config, **overrides}
    owned = sorted(set(fields) & set(RECIPE_OWNED))
    if owned:
        raise RecipeError(
            f"{where}: trainer.config sets {owned}; the recipe's `team:` and `store:` set those"
        )
    unknown = sorted(set(fields) - names)
    if unknown:
        raise RecipeError(
            f"{where}: trainer.config: {config_cls.__name__} has no field(s) {unknown}; "
            f"valid fields: {', '.join(sorted(names - set(RECIPE_OWNED)))}"
        )
    out = fields.get("out", _dataclass_defaults(config_cls).get("out"))
    try:
        config = config_cls(**fields, team=f"{out}/team.yaml", traces=recipe.store.traces)
        if recipe.trainer.algo == "magrpo":  # its agents follow the topology, as in training (code_pair: helper, main)
            from .magrpo_joint import for_team

            config = for_team(config, recipe.team)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: trainer.config: {e}") from None
    return config


def _check_layout(recipe: Recipe, config: Any, where: str) -> None:
    from mlpo_agents.graphs import check_topology  # LangGraph: not at module import

    problems: list[str] = []
    hw, launch = recipe.hardware, recipe.launch
    valid_gpus = set(range(hw.gpus))
    for s in recipe.servers:
        if s.model not in recipe.models:
            problems.append(
                f"servers.{s.name}.model {s.model!r} is not in models ({', '.join(recipe.models)})"
            )
            continue
        shape = recipe.models[s.model]
        if not s.gpus or set(s.gpus) - valid_gpus or len(set(s.gpus)) != len(s.gpus):
            problems.append(f"servers.{s.name}.gpus {s.gpus}: give distinct ids in 0..{hw.gpus - 1}")
        elif shape.heads % len(s.gpus) or shape.kv_heads % len(s.gpus):
            problems.append(
                f"servers.{s.name}: tensor parallel {len(s.gpus)} does not divide {shape.heads} attention heads and "
                f"{shape.kv_heads} KV heads of {shape.hf_id}; use a divisor of both"
            )
        elif server_memory(s, shape, hw.memory_gib * GIB).kv_cache <= 0:
            problems.append(
                f"servers.{s.name}: {shape.hf_id} does not fit: bf16 weights need "
                f"{2 * param_count(shape) / len(s.gpus) / GIB:.1f} GiB per GPU of the "
                f"{s.gpu_memory_utilization * hw.memory_gib:.1f} GiB reserved; raise gpu_memory_utilization or "
                "spread it over more GPUs"
            )
        if not PLACEHOLDER.fullmatch(s.api_base):
            problems.append(
                f"servers.{s.name}.api_base {s.api_base!r}: use a ${{VAR}} placeholder, not a fixed address"
            )
    if launch.num_processes > len(launch.gpus):
        problems.append(
            f"launch.num_processes={launch.num_processes} but launch.gpus has {len(launch.gpus)} GPU(s) "
            f"{launch.gpus}: one process per GPU; lower num_processes or list more GPUs"
        )
    if launch.num_processes > hw.gpus or set(launch.gpus) - valid_gpus:
        problems.append(
            f"launch: {launch.num_processes} processes on GPUs {launch.gpus}, but the node has {hw.gpus} GPUs"
        )
    if not PLACEHOLDER.fullmatch(recipe.store.traces):
        problems.append(
            f"store.traces {recipe.store.traces!r}: use a ${{VAR}} placeholder holding a postgresql:// URL"
        )
    by_served = {(s.served_name, s.api_base): s for s in recipe.servers}
    for dep in recipe.team.model_list:
        params = dep["litellm_params"]
        key = (str(params["model"]).removeprefix("hosted_vllm/"), params.get("api_base"))
        if not str(params["model"]).startswith("hosted_vllm/") or key not in by_served:
            problems.append(
                f"team.model_list {dep['model_name']!r} ({params['model']} at {params.get('api_base')}) matches no "
                "server: use hosted_vllm/<served_name> and the server's api_base"
            )
    try:
        check_topology(recipe.team)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise RecipeError(f"{where}: " + "; ".join(problems))
    for role in TRAINED_ROLES[recipe.trainer.algo](config):
        server = role_server(recipe, role)
        rc = recipe.team.role(role)
        if not rc.trainable:
            problems.append(
                f"team.roles.{role} is trained by {recipe.trainer.algo} but not marked trainable: true"
            )
        if not server.enable_lora or server.max_lora_rank < config.lora_r:
            problems.append(
                f"servers.{server.name} serves trained role {role!r}: needs enable_lora: true and "
                f"max_lora_rank >= lora_r ({config.lora_r})"
            )
    base = {
        recipe.models[role_server(recipe, r).model].hf_id for r in TRAINED_ROLES[recipe.trainer.algo](config)
    }
    if len(base) > 1:
        problems.append(
            f"trained roles are served by different base models {sorted(base)}; one base per recipe"
        )
    if not problems:
        problems = _check_budgets(recipe, config)
    if not problems:
        for gpu, (used, parts) in gpu_usage(recipe, config).items():
            if used > hw.memory_gib * GIB:
                problems.append(
                    f"GPU {gpu} needs ~{used / GIB:.1f} GiB ({' + '.join(parts)}) of {hw.memory_gib:g} GiB: the layout "
                    "does not fit; move a server, use fsdp, smaller micro-batches or gradient checkpointing"
                )
    if problems:
        raise RecipeError(f"{where}: " + "; ".join(problems))


def resolved_team(recipe: Recipe, environ: dict[str, str] | None = None) -> TeamConfig:
    """The team with every `${VAR}` replaced from the environment (at launch); unset variables are an error."""
    environ = dict(os.environ if environ is None else environ)
    text = yaml.safe_dump(recipe.team.model_dump(mode="json"))
    unset = sorted({n for n in PLACEHOLDER.findall(text) if n not in environ})
    if unset:
        raise RecipeError(
            f"recipe {recipe.name}: set {', '.join(unset)} before launching ({'; '.join(recipe.env[n] for n in unset)})"
        )
    return TeamConfig.model_validate(yaml.safe_load(PLACEHOLDER.sub(lambda m: environ[m.group(1)], text)))


def role_server(recipe: Recipe, role: str) -> Server:
    """The (first) server behind a role's deployment."""
    dep = recipe.team.deployment(recipe.team.role(role).model)["litellm_params"]
    key = (str(dep["model"]).removeprefix("hosted_vllm/"), dep.get("api_base"))
    return next(s for s in recipe.servers if (s.served_name, s.api_base) == key)


def _check_budgets(recipe: Recipe, config: Any) -> list[str]:
    problems = []
    for role, (prompt, completion, _) in role_budgets(recipe).items():
        if role not in TRAINED_ROLES[recipe.trainer.algo](config):
            continue
        row, server = prompt + completion, role_server(recipe, role)
        if config.max_len is not None and row > config.max_len:
            problems.append(
                f"role {role}: rows of up to {row} tokens (prompt {prompt} + completion {completion}) exceed "
                f"max_len={config.max_len}, and the trainer skips longer rows; raise max_len or lower the budgets"
            )
        if row > server.max_model_len:
            problems.append(
                f"role {role}: {row} tokens exceed servers.{server.name}.max_model_len={server.max_model_len}"
            )
    return problems


# ------------------------------------------------------------------------------------------- layout


def trained_copies(recipe: Recipe, config: Any) -> int:
    """Base-model copies one training process holds (MAGRPO: one per agent; the others: one)."""
    return len(config.agents) if recipe.trainer.algo == "magrpo" else 1


def trained_shape(recipe: Recipe, config: Any) -> ModelShape:
    """The shape of the trained base model."""
    return recipe.models[role_server(recipe, TRAINED_ROLES[recipe.trainer.algo](config)[0]).model]


def process_memory(recipe: Recipe, config: Any) -> TrainMemory:
    """The largest training-process estimate over the step shapes."""
    shape = trained_shape(recipe, config)
    worst = max(step_shapes(recipe, config), key=lambda s: s.micro_rows * s.row_tokens)
    return train_memory(
        shape, copies=trained_copies(recipe, config), r=config.lora_r, micro_rows=worst.micro_rows,
        row_tokens=worst.row_tokens, launch=recipe.launch,
    )  # fmt: skip


def gpu_usage(recipe: Recipe, config: Any) -> dict[int, tuple[float, list[str]]]:
    """GPU id -> (estimated bytes in use, what uses them)."""
    gpu_bytes = recipe.hardware.memory_gib * GIB
    usage: dict[int, tuple[float, list[str]]] = {}

    def add(gpu: int, amount: float, label: str) -> None:
        used, parts = usage.get(gpu, (0.0, []))
        usage[gpu] = (used + amount, [*parts, f"{label} {amount / GIB:.1f}"])

    for s in recipe.servers:
        for gpu in s.gpus:
            add(gpu, server_memory(s, recipe.models[s.model], gpu_bytes).reserved, f"vLLM {s.name}")
    train = process_memory(recipe, config).total
    for gpu in recipe.launch.gpus[: recipe.launch.num_processes]:
        add(gpu, train, "training")
    return usage
