"""GPU recipes (recipes/*.yaml): each loads and dry-runs on CPU, broken ones fail clearly, memory formulas by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlpo_agents.cli import main
from mlpo_agents.trainers.estimates import activation_bytes, lora_param_count, param_count, train_memory
from mlpo_agents.trainers.recipe import (
    RECIPES,
    Launch,
    ModelShape,
    RecipeError,
    check_recipe,
    resolved_team,
)
from mlpo_agents.trainers.recipe_plan import format_plan

SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_one_recipe_per_trainer_is_shipped():
    algos = {yaml.safe_load(p.read_text())["trainer"]["algo"] for p in SHIPPED}
    assert algos == {"mlpo", "magrpo", "malt"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_dry_runs(path, capsys):
    checked = check_recipe(path)
    assert checked.recipe.name == path.name.removesuffix(".yaml")
    plan = format_plan(checked)
    for section in (
        "servers to start",
        "vllm serve",
        "batch shapes per optimizer step",
        "memory per GPU",
        "ESTIMATES",
    ):
        assert section in plan
    assert main(["recipe", "check", checked.recipe.name]) == 0
    assert main(["train", "--recipe", str(path), "--dry-run"]) == 0
    assert "accelerate launch" in capsys.readouterr().out


def test_train_recipe_without_dry_run_says_why_and_flags_override(capsys):
    assert main(["train", "--recipe", "mlpo-qwen2.5-7b"]) == 2
    assert "add --dry-run" in capsys.readouterr().err
    assert main(["train", "--recipe", "mlpo-qwen2.5-7b", "--dry-run", "--group-size", "4"]) == 0
    assert "questions_per_step 16 x G 4 = 64" in capsys.readouterr().out
    assert main(["train", "--recipe", "mlpo-qwen2.5-7b", "--dry-run", "--team", "tiny"]) == 2
    assert "drop --team" in capsys.readouterr().err


def _broken(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((RECIPES / "mlpo-qwen2.5-7b.yaml").read_text())
    edit(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["trainer"]["config"].update(clip_epsilon=0.1),
            r"MLPOConfig has no field\(s\) \['clip_epsilon'\]",
        ),
        (lambda d: d["launch"].update(num_processes=6), r"launch.num_processes=6 but launch.gpus has 4 GPU"),
        (lambda d: d.update(budget=1), r"budget: Extra inputs are not permitted"),
        (
            lambda d: d["servers"][0].update(api_base="${LEADER_URL}"),
            r"\$\{LEADER_URL\} are not declared under `env:`",
        ),
        (
            lambda d: d["servers"][1].update(api_base="http://10.0.0.5:8001/v1"),
            r"use a \$\{VAR\} placeholder",
        ),
        (lambda d: d["hardware"].update(memory_gib=16), r"Qwen/Qwen2.5-7B-Instruct does not fit"),
        (lambda d: d["trainer"]["config"].update(micro_batch_size=32), r"GPU 4 needs ~.* GiB .* of 80 GiB"),
        (
            lambda d: d["trainer"]["config"].update(max_len=2048),
            r"exceed max_len=2048, and the trainer skips",
        ),
        (
            lambda d: d["servers"][0].update(gpus=[0, 1, 2]),
            r"tensor parallel 3 does not divide 28 attention heads",
        ),
        (lambda d: d["trainer"]["config"].update(group_size=1), r"group_size=1: GRPO needs >= 2"),
    ],
    ids=[
        "unknown-field",
        "too-many-processes",
        "unknown-key",
        "undeclared-env",
        "fixed-address",
        "model-too-large",
        "micro-batch-too-large",
        "rows-skipped",
        "bad-tensor-parallel",
        "trainer-validation",
    ],
)
def test_a_broken_recipe_fails_with_a_clear_message(tmp_path, edit, message):
    with pytest.raises(RecipeError, match=message):
        check_recipe(_broken(tmp_path, edit))


def test_team_placeholders_resolve_from_the_environment_at_launch():
    recipe = check_recipe("mlpo-qwen2.5-7b").recipe
    with pytest.raises(RecipeError, match="set MLPO_LEADER_API_BASE, MLPO_PEER1_API_BASE"):
        resolved_team(recipe, {})
    env = {
        f"MLPO_{n}_API_BASE": f"http://h:{8000 + i}/v1"
        for i, n in enumerate(["LEADER", "PEER1", "PEER2", "PEER3"])
    }
    team = resolved_team(recipe, env)
    assert team.deployment("leader")["litellm_params"]["api_base"] == "http://h:8000/v1"


TINY = ModelShape(hf_id="x", layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=32)


def test_memory_formulas_match_a_hand_computed_case():
    # P = V*h*2 + L*(h*(q + 2*kv*d) + q*h + 3*h*I + 2*h) + h, q = 8
    #   = 512 + 2*(8*16 + 64 + 384 + 16) + 8 = 512 + 1184 + 8
    assert param_count(TINY) == 1704
    # P_lora = L*r*((h+q) + 2*(h+kv*d) + (q+h) + 3*(h+I)) = 2*2*(16 + 24 + 16 + 72)
    assert lora_param_count(TINY, 2) == 512
    # per token: 2*L*h + 2*(4*h + 3*I) + 8*V = 32 + 160 + 256 = 448; 2 rows x 10 tokens
    assert activation_bytes(TINY, 2, 10, checkpointing=True) == 8960
    mem = train_memory(
        TINY, copies=2, r=2, micro_rows=2, row_tokens=10, launch=Launch(num_processes=2, gpus=[0, 1])
    )
    assert (mem.weights, mem.lora_states, mem.total) == (2 * 2 * 1704, 2 * 16 * 512, 6816 + 16384 + 8960)
    sharded = train_memory(
        TINY,
        copies=1,
        r=2,
        micro_rows=2,
        row_tokens=10,
        launch=Launch(num_processes=2, gpus=[0, 1], strategy="fsdp"),
    )
    assert (sharded.weights, sharded.lora_states) == (1704, 4096)


def test_parameter_counts_of_the_recipe_models_match_the_published_ones():
    models = {
        **check_recipe("malt-llama3.1-8b").recipe.models,
        **check_recipe("mlpo-qwen2.5-7b").recipe.models,
    }
    assert param_count(models["llama-3.1-8b-instruct"]) == 8_030_261_248  # Llama-3.1-8B's safetensors count
    qwen = models["qwen2.5-7b-instruct"]
    qkv_biases = qwen.layers * (qwen.hidden + 2 * qwen.kv_heads * qwen.head_dim)  # left out by the formula
    assert param_count(qwen) + qkv_biases == 7_615_616_512  # Qwen2.5-7B-Instruct's safetensors count


def test_the_plan_excerpt_in_the_docs_is_the_current_output():
    from tests._commands import ROOT, code_blocks

    plan = format_plan(check_recipe("mlpo-qwen2.5-7b")).splitlines()
    (excerpt,) = code_blocks((ROOT / "docs" / "gpu.md").read_text(), "text")
    missing = [line for line in excerpt.splitlines() if line not in plan]
    assert not missing, f"docs/gpu.md shows lines the plan no longer prints (paste the new output): {missing}"
