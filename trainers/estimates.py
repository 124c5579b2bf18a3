"""Estimates for a GPU recipe: parameter counts, memory per GPU and the batch shapes of one optimizer step.

Pure functions of a recipe's model shapes, servers and launch (trainers/recipe.py checks a recipe
with them, trainers/recipe_plan.py prints them); nothing is loaded or measured. The memory estimate (bytes; every figure is an estimate,
not a measurement):
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

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Launch, ModelShape, Recipe, Server

GIB = 1 << 30


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
    if recipe.trainer.algo == "magrpo":  # the first agent reads the question, the second also its output
        from .magrpo_joint import JOINT_TOPOLOGIES

        joint = JOINT_TOPOLOGIES.get(team.topology, JOINT_TOPOLOGIES["cooperate"])
        first, second = joint.agents
        return {
            first: (q, out(first), f"question {q}"),
            second: (q + out(first), out(second), f"question {q} + {first} {out(first)}"),
        }
    g, v = out("generator"), out("verifier")
    return {
        "generator": (q, g, f"question {q}"),
        "verifier": (q + g, v, f"question {q} + answer {g}"),
        "refiner": (q + g + v, out("refiner"), f"question {q} + answer {g} + critique {v}"),
    }


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
