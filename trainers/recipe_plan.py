"""The plan of a checked GPU recipe as text, and the commands that print it.

`format_plan` lists the servers to start, the team, the trainer config, the accelerate launch, the
batch shapes of one optimizer step and the memory estimates per GPU (trainers/estimates.py), then
what `mlpo train` does not do yet (`launch_gaps`). `mlpo recipe check NAME` and
`mlpo train --recipe NAME --dry-run` print it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import yaml

from .estimates import (
    GIB,
    kv_bytes_per_token,
    lora_param_count,
    param_count,
    role_budgets,
    server_memory,
    step_shapes,
)
from .recipe import (
    RECIPE_OWNED,
    RECIPES,
    TRAINED_ROLES,
    Checked,
    Recipe,
    RecipeError,
    _dataclass_defaults,
    check_recipe,
    gpu_usage,
    process_memory,
    trained_copies,
    trained_shape,
)

# ------------------------------------------------------------------------------------------- the plan


def launch_gaps(recipe: Recipe) -> list[str]:
    """What `mlpo train` does not do yet for this recipe (so it is a checked plan, not a launcher)."""
    gaps = []
    if any(not str(d["litellm_params"]["model"]).startswith("local/") for d in recipe.team.model_list):
        gaps.append(
            "trained roles are served by vLLM here, but the trainers hot-load adapters into the in-process "
            "engine only (mlpo_agents/adapters.py role_spec refuses other deployments); serving them needs "
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
    from .loop import COMMON_FLAGS

    owned = [f"--{name}" for name in RECIPE_OWNED if getattr(args, name, None) is not None]
    if owned:
        raise RecipeError(f"--recipe sets the team and the trace store itself; drop {', '.join(owned)}")
    overrides = {name: getattr(args, name) for name in COMMON_FLAGS if getattr(args, name, None) is not None}
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
