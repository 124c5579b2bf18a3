"""GPU recipes: a trainer at the papers' scale (7-8B models) written down as one YAML file, checked on CPU.

A recipe (`recipes/<name>.yaml`) holds everything a GPU run needs: the hardware it assumes, the vLLM
servers (leader, peers), the team routed to them (a team file whose `api_base`s are `${ENV_VAR}`
placeholders), the trainer config (algorithm + fields of MLPOConfig / MAGRPOConfig / MALTConfig), the
accelerate launch (processes, DDP or FSDP, mixed precision) and the trace store (a `postgresql://` URL
from an environment variable, so many rollout workers can write to it). `check_recipe` validates it all
without loading a model or contacting a server, and `format_plan` prints the plan: the servers to
start, the trainer config, the batch shapes of one optimizer step and a memory estimate per GPU.
`mlpo recipe check NAME` and `mlpo train --recipe NAME --dry-run` print it; tests/test_recipes.py
dry-runs every shipped recipe so they cannot rot.

The memory estimate (bytes; every figure is an estimate, not a measurement):
- parameters, from the model's shape (config.json): P = V*h*(1 if tied else 2)
  + L*(h*(q + 2*kv*d) + q*h + 3*h*I + 2*h) + h, with q = heads*d (biases left out: < 0.01%).
- LoRA on every linear layer (peft "all-linear", the project's default) with rank r:
  P_lora = L*r*((h + q) + 2*(h + kv*d) + (q + h) + 3*(h + I)).
- a vLLM server reserves gpu_memory_utilization * GPU memory on each of its GPUs: bf16 weights 2*P/tp,
  LoRA slots max_loras * 2*P_lora(max_lora_rank)/tp, and the rest is KV cache (an upper bound: vLLM
  also keeps activation and CUDA-graph memory in it), 2*L*kv*d*2/tp bytes per token.
- a training process: bf16 base weights 2*P per trained copy (MAGRPO keeps one copy per agent),
  LoRA weights + gradients + AdamW moments in fp32 16*P_lora, activations of one micro-batch of m rows
  of T tokens with gradient checkpointing m*T*(2*L*h + 2*(4*h + 3*I) + 8*V) (one bf16 hidden state per
  layer, one layer recomputed, fp32 logits and their gradient), without checkpointing
  m*T*(2*L*(6*h + 3*I) + 8*V). FSDP (FULL_SHARD) divides weights and LoRA states by the process count.
  CUDA context, allocator fragmentation and NCCL buffers are not counted (keep a few GiB free).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlpo_agents.config import TeamConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
"""The shipped recipes (`recipes/` at the top of the repository)."""
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
GIB = 1 << 30
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


# ------------------------------------------------------------------------------------------- memory (pure)


def param_count(m: ModelShape) -> int:
    """P: parameters of a decoder-only transformer with a gated MLP (biases left out)."""
    q = m.heads * m.head_dim
    per_layer = m.hidden * (q + 2 * m.kv_heads * m.head_dim) + q * m.hidden + 3 * m.hidden * m.intermediate
    return (
        m.vocab * m.hidden * (1 if m.tied_embeddings else 2)
        + m.layers * (per_layer + 2 * m.hidden)
        + m.hidden
    )


def lora_param_count(m: ModelShape, r: int) -> int:
    """P_lora: LoRA A and B of rank r on every linear layer of every block (peft "all-linear")."""
    q, h = m.heads * m.head_dim, m.hidden
    return m.layers * r * ((h + q) + 2 * (h + m.kv_heads * m.head_dim) + (q + h) + 3 * (h + m.intermediate))


def activation_bytes(m: ModelShape, rows: int, tokens: int, checkpointing: bool) -> int:
    """Activations of one micro-batch of `rows` rows of `tokens` tokens (see the module docstring)."""
    layers = (
        2 * m.layers * m.hidden + 2 * (4 * m.hidden + 3 * m.intermediate)
        if checkpointing
        else (2 * m.layers * (6 * m.hidden + 3 * m.intermediate))
    )
    return rows * tokens * (layers + 8 * m.vocab)


def kv_bytes_per_token(m: ModelShape, tp: int) -> int:
    """bf16 K and V of one token on one GPU of a tensor-parallel group of `tp`."""
    return 2 * m.layers * m.kv_heads * m.head_dim * 2 // tp


@dataclass
class ServerMemory:
    """A vLLM server's memory on each of its GPUs (bytes)."""

    reserved: float
    weights: float
    lora_slots: float
    kv_cache: float
    kv_tokens: int


def server_memory(s: Server, m: ModelShape, gpu_bytes: float) -> ServerMemory:
    """What a server reserves per GPU and how much of it is left for the KV cache."""
    tp = len(s.gpus)
    reserved = s.gpu_memory_utilization * gpu_bytes
    weights = 2 * param_count(m) / tp
    lora = s.max_loras * 2 * lora_param_count(m, s.max_lora_rank) / tp if s.enable_lora else 0.0
    kv = reserved - weights - lora
    return ServerMemory(reserved, weights, lora, kv, max(0, int(kv // kv_bytes_per_token(m, tp))))


@dataclass
class TrainMemory:
    """A training process's memory (bytes)."""

    weights: float
    lora_states: float
    activations: float
    micro_rows: int
    row_tokens: int

    @property
    def total(self) -> float:
        """Sum of the three terms."""
        return self.weights + self.lora_states + self.activations


def train_memory(
    m: ModelShape, *, copies: int, r: int, micro_rows: int, row_tokens: int, launch: Launch
) -> TrainMemory:
    """One process: `copies` bf16 base copies, their LoRA states in fp32 + AdamW, one micro-batch."""
    shard = launch.num_processes if launch.strategy == "fsdp" else 1
    return TrainMemory(
        weights=copies * 2 * param_count(m) / shard,
        lora_states=copies * 16 * lora_param_count(m, r) / shard,
        activations=activation_bytes(m, micro_rows, row_tokens, launch.gradient_checkpointing),
        micro_rows=micro_rows,
        row_tokens=row_tokens,
    )


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
    from mlpo_agents.trainers.loop import ALGOS, _trainer_module

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
        return config_cls(**fields, team=f"{out}/team.yaml", traces=recipe.store.traces)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: trainer.config: {e}") from None


def _check_layout(recipe: Recipe, config: Any, where: str) -> None:
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
        recipe.team.check_topology()
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


# ------------------------------------------------------------------------------------------- shapes


def role_budgets(recipe: Recipe) -> dict[str, tuple[int, int, str]]:
    """Trained role -> (prompt budget, completion budget, how the prompt budget adds up), from the team."""
    team, q = recipe.team, recipe.question_tokens

    def out(role: str) -> int:
        return team.role(role).sampling.max_tokens

    if recipe.trainer.algo == "mlpo":
        peers = [out(f"peer-{i}") for i in range(1, int(team.params.get("peers", 0)) + 1)]
        how = f"question {q} + peers {' + '.join(map(str, peers)) or '0'}"
        return {"leader": (q + sum(peers), out("leader"), how)}
    if recipe.trainer.algo == "magrpo":
        return {
            "drafter": (q, out("drafter"), f"question {q}"),
            "solver": (q + out("drafter"), out("solver"), f"question {q} + draft {out('drafter')}"),
        }
    g, v = out("generator"), out("verifier")
    return {
        "generator": (q, g, f"question {q}"),
        "verifier": (q + g, v, f"question {q} + answer {g}"),
        "refiner": (q + g + v, out("refiner"), f"question {q} + answer {g} + critique {v}"),
    }


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


@dataclass
class StepShape:
    """The rows one optimizer step trains on, for one trained unit (an agent, or a role's SFT/DPO phase)."""

    unit: str
    rows: int
    """Rows (completions) per optimizer step, over all processes."""
    row_tokens: int
    """T: longest row (prompt + completion budget, capped by max_len)."""
    rows_per_process: int
    micro_rows: int
    """Rows per forward/backward on one process."""
    micro_batches: int
    """Forward/backward passes per process per optimizer step (gradient accumulation)."""
    how: str
    """How `rows` adds up."""

    @property
    def tokens(self) -> int:
        """Upper bound of tokens per optimizer step."""
        return self.rows * self.row_tokens


def step_shapes(recipe: Recipe, config: Any) -> list[StepShape]:
    """Batch shapes of one optimizer step per trained unit."""
    n = recipe.launch.num_processes
    budgets = role_budgets(recipe)

    def tokens(role: str) -> int:
        prompt, completion, _ = budgets[role]
        return min(prompt + completion, config.max_len or prompt + completion)

    def shape(unit: str, role: str, rows: int, micro: int, how: str) -> StepShape:
        per = math.ceil(rows / n)
        return StepShape(unit, rows, tokens(role), per, min(micro, per), math.ceil(per / micro), how)

    algo, q = recipe.trainer.algo, getattr(config, "questions_per_step", 0)
    if algo == "mlpo":
        g = config.group_size
        return [shape("leader", "leader", q * g, config.micro_batch_size, f"questions_per_step {q} x G {g}")]
    if algo == "magrpo":
        g = config.group_size
        nodes = sum(g**t for t in range(config.turns))  # every joint action branches (no early termination)
        shapes = []
        for role in config.agents:
            fan = g * g if config.joint_mode == "cross" and role == config.answer_role else g
            how = f"questions_per_step {q} x nodes {nodes} x {'G^2' if fan != g else 'G'} {fan}"
            shapes.append(shape(role, role, q * nodes * fan, config.micro_batch_size, how))
        return shapes
    shapes = []
    for role in config.roles:
        per = math.ceil(config.batch_size / n)
        shapes.append(
            shape(f"{role} SFT", role, config.batch_size, per, f"batch_size {config.batch_size} rows")
        )
        if role in config.dpo_roles:
            rows = 2 * config.batch_size
            shapes.append(
                shape(f"{role} DPO", role, rows, 2 * per, f"batch_size {config.batch_size} pairs x 2")
            )
    return shapes


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


# ------------------------------------------------------------------------------------------- the plan


def launch_gaps(recipe: Recipe) -> list[str]:
    """What `mlpo train` does not do yet for this recipe (so it is a checked plan, not a launcher)."""
    gaps = []
    if any(not str(d["litellm_params"]["model"]).startswith("local/") for d in recipe.team.model_list):
        gaps.append(
            "trained roles are served by vLLM here, but the trainers hot-load adapters into the in-process "
            "engine only (trainers/common.py role_spec refuses other deployments); serving them needs "
            "VLLMServer.load_lora on the role's server"
        )
    gaps.append(
        "the trainers open `traces` as an SQLite path (TraceStore); a postgresql:// URL needs trace.open_store"
    )
    if recipe.launch.num_processes > 1:
        gaps.append(
            "`mlpo train` runs one process: trainers/update.py policy_update takes an accelerate Accelerator "
            "(DDP, tested on CPU in tests/test_mlpo.py), but train() does not create one yet, and FSDP is untested"
        )
    return gaps


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def format_plan(checked: Checked) -> str:
    """The plan as text: servers, trainer config, launch, batch shapes, memory estimates, gaps."""
    recipe, config = checked.recipe, checked.config
    hw, launch = recipe.hardware, recipe.launch
    gpu_bytes = hw.memory_gib * GIB
    lines = [
        f"recipe {recipe.name} ({checked.path}): {recipe.trainer.algo.upper()} on {hw.gpus} x {hw.gpu} "
        f"({hw.memory_gib:g} GiB each)",
        f"  paper: {recipe.paper}",
        "",
        "environment (read at launch; the dry run needs none of them):",
    ]
    for name, what in recipe.env.items():
        lines.append(f"  {name:<24} {'set' if name in os.environ else 'unset'}  {what}")
    lines += ["", "servers to start (vLLM 0.32):"]
    for s in recipe.servers:
        shape = recipe.models[s.model]
        flags = [
            f"--served-model-name {s.served_name}", f"--port {s.port}", "--dtype bfloat16",
            f"--tensor-parallel-size {len(s.gpus)}", f"--gpu-memory-utilization {s.gpu_memory_utilization}",
            f"--max-model-len {s.max_model_len}",
        ]  # fmt: skip
        env = f"CUDA_VISIBLE_DEVICES={','.join(map(str, s.gpus))}"
        if s.enable_lora:
            flags += ["--enable-lora", f"--max-lora-rank {s.max_lora_rank}", f"--max-loras {s.max_loras}"]
            env += " VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
        lines.append(f"  {s.name}: {env} vllm serve {shape.hf_id} {' '.join(flags)}")
        lines.append(f"    team reaches it at {s.api_base} as hosted_vllm/{s.served_name}")
    lines += ["", f"team {recipe.team.name}: topology {recipe.team.topology} {recipe.team.params}"]
    for role, rc in recipe.team.roles.items():
        lines.append(
            f"  {role}: {rc.model}{' (trained)' if rc.trainable else ''}, temperature {rc.sampling.temperature}, "
            f"max_tokens {rc.sampling.max_tokens}"
        )
    defaults = _dataclass_defaults(type(config))
    changed = {k: v for k, v in dataclasses.asdict(config).items() if defaults.get(k, object()) != v}
    lines += ["", f"trainer: {type(config).__name__} (fields that differ from the defaults)"]
    lines += [f"  {k} = {v!r}" for k, v in changed.items()]
    accelerate = [f"--num_processes {launch.num_processes}", f"--gpu_ids {','.join(map(str, launch.gpus))}",
                  f"--mixed_precision {launch.mixed_precision}"]  # fmt: skip
    accelerate.insert(
        0, "--use_fsdp --fsdp_sharding_strategy FULL_SHARD" if launch.strategy == "fsdp" else "--multi_gpu"
    )
    lines += [
        "",
        f"launch (once the gaps at the end are closed): accelerate launch {' '.join(accelerate)} "
        f"-m mlpo_agents.cli train --recipe {recipe.name}",
        f"  {launch.strategy.upper()}, gradient checkpointing {'on' if launch.gradient_checkpointing else 'off'}",
        f"trace store: {recipe.store.traces} (Postgres: every rollout worker writes to it)",
        "",
        "batch shapes per optimizer step (budgets are upper bounds):",
    ]
    budgets = role_budgets(recipe)
    for role in TRAINED_ROLES[recipe.trainer.algo](config):
        prompt, completion, how = budgets[role]
        lines.append(f"  {role}: prompt <= {prompt} ({how}), completion <= {completion}")
    if recipe.trainer.algo == "malt":
        n = config.branching
        lines.append(
            f"  tree expansion: questions {config.questions} x (n + n^2 + n^3 = {n + n * n + n**3}) = "
            f"{_fmt_int(config.questions * (n + n * n + n**3))} calls, n={n}"
        )
    for step in step_shapes(recipe, config):
        lines.append(
            f"  {step.unit}: rows = {step.how} = {step.rows}; tokens <= {step.rows} x T {step.row_tokens} = {_fmt_int(step.tokens)}; "
            f"per process ({launch.num_processes}): {step.rows_per_process} rows = {step.micro_batches} micro-batch(es) "
            f"of <= {step.micro_rows}"
        )
    lines += ["", "memory per GPU (ESTIMATES from the formulas; GiB = 2^30 bytes):"]
    for name, shape in recipe.models.items():
        lines.append(
            f"  {name}: P = V*h*{1 if shape.tied_embeddings else 2} + L*(h*(q+2*kv*d) + q*h + 3*h*I + 2*h) + h "
            f"= {param_count(shape) / 1e9:.2f}e9 parameters ({shape.hf_id})"
        )
    for s in recipe.servers:
        shape = recipe.models[s.model]
        served = server_memory(s, shape, gpu_bytes)
        lines.append(
            f"  GPU {','.join(map(str, s.gpus))} vLLM {s.name}: reserves {s.gpu_memory_utilization} x {hw.memory_gib:g} "
            f"= {served.reserved / GIB:.1f} GiB: weights 2*P/tp {served.weights / GIB:.1f}"
            + (
                f", LoRA slots max_loras*2*P_lora(r={s.max_lora_rank})/tp {served.lora_slots / GIB:.2f}"
                if s.enable_lora
                else ""
            )
            + f", KV cache <= {served.kv_cache / GIB:.1f} GiB = {_fmt_int(served.kv_tokens)} tokens at "
            f"2*L*kv*d*2/tp = {kv_bytes_per_token(shape, len(s.gpus))} B/token "
            f"(~{served.kv_tokens // s.max_model_len} sequences of {s.max_model_len})"
        )
    shape, mem = trained_shape(recipe, config), process_memory(recipe, config)
    copies, shard = trained_copies(recipe, config), launch.num_processes if launch.strategy == "fsdp" else 1
    act = "m*T*(2*L*h + 2*(4*h+3*I) + 8*V)" if launch.gradient_checkpointing else "m*T*(2*L*(6*h+3*I) + 8*V)"
    div = f"/{shard}" if shard > 1 else ""
    lines += [
        f"  GPU {','.join(map(str, launch.gpus[: launch.num_processes]))} training, per process:",
        f"    base weights bf16 {copies} x 2*P{div} = {mem.weights / GIB:.1f} GiB",
        f"    LoRA weights+grads+AdamW fp32 {copies} x 16*P_lora{div} = {mem.lora_states / GIB:.2f} GiB "
        f"(P_lora = L*r*((h+q) + 2*(h+kv*d) + (q+h) + 3*(h+I)) = {_fmt_int(lora_param_count(shape, config.lora_r))}, "
        f"r={config.lora_r})",
        f"    activations {act}, m={mem.micro_rows}, T={mem.row_tokens}: {mem.activations / GIB:.1f} GiB",
        f"    total ~{mem.total / GIB:.1f} GiB of {hw.memory_gib:g} (not counted: CUDA context, fragmentation, NCCL buffers)",
        "  per GPU: "
        + "; ".join(
            f"{gpu}: {used / GIB:.1f}" for gpu, (used, _) in sorted(gpu_usage(recipe, config).items())
        )
        + f" GiB of {hw.memory_gib:g}",
    ]
    gaps = launch_gaps(recipe)
    if gaps:
        lines += ["", "not wired yet (why this is a checked plan, not a launcher):"]
        lines += [f"  - {g}" for g in gaps]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI


def cmd_train_recipe(args: argparse.Namespace) -> int:
    """`mlpo train --recipe NAME --dry-run`: flags and --set override trainer fields; prints the plan."""
    from mlpo_agents.trainers.loop import COMMON_FLAGS

    owned = [f"--{name}" for name in RECIPE_OWNED if getattr(args, name, None) is not None]
    if owned:
        raise RecipeError(f"--recipe sets the team and the trace store itself; drop {', '.join(owned)}")
    overrides = {name: getattr(args, name) for name in COMMON_FLAGS if getattr(args, name, None) is not None}
    overrides.update({flag: True for flag in ("resume", "offline") if getattr(args, flag, False)})
    overrides.update(overrides_from_sets(args.set))
    checked = check_recipe(args.recipe, overrides)
    if args.algo not in ("mlpo", checked.recipe.trainer.algo):  # "mlpo" is --algo's default
        raise RecipeError(
            f"--algo {args.algo}: recipe {checked.recipe.name} trains with {checked.recipe.trainer.algo}"
        )
    if not args.dry_run:
        gaps = "; ".join(launch_gaps(checked.recipe))
        raise RecipeError(
            f"recipe {checked.recipe.name} is a checked plan for now ({gaps}); add --dry-run to print it"
        )
    print(format_plan(checked))
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    """`mlpo recipe check NAME|PATH` (or list): validate on CPU and print the plan."""
    if args.action == "list":
        for path in sorted(RECIPES.glob("*.yaml")):
            print(path.stem)
        return 0
    if not args.name:
        raise RecipeError("mlpo recipe check needs a recipe name or path (`mlpo recipe list` shows them)")
    print(format_plan(check_recipe(args.name, overrides_from_sets(args.set))))
    return 0


def overrides_from_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set field=value` items as trainer-field overrides (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set {item!r}: use field=value, e.g. --set group_size=16")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def add_subcommand(subparsers: Any) -> None:
    """Add `mlpo recipe` to the `mlpo` command line."""
    p = subparsers.add_parser(
        "recipe",
        help="check a GPU recipe on CPU and print its plan (servers, batch shapes, memory estimate)",
        description="Validates a recipe (recipes/<name>.yaml or a path) without loading a model or contacting "
        "a server, and prints the plan. Same as `mlpo train --recipe NAME --dry-run`.",
    )
    p.add_argument("action", choices=["check", "list"])
    p.add_argument("name", nargs="?", default=None, help="recipe name (recipes/<name>.yaml) or path")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a trainer config field")
    p.set_defaults(func=cmd_recipe)
