"""MALT: value iteration and labels on a hand-built tree, datasets, trees from scripted runs, training and resume."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from pathlib import Path

import pytest

from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import ModelCall, Reward, TraceStore
from mlpo_agents.trainers import malt
from mlpo_agents.trainers.loop import Checkpointer
from mlpo_agents.trainers.malt import MALTConfig, assign_values, build_datasets, build_tree, walk

# ------------------------------------------------------------------------------------------- a hand-built tree
#
#   G1 ── V1 ── R1 = 1, R2 = 1      V1 = (1 + 1) / 2 = 1.0   positive
#     └── V2 ── R3 = 0, R4 = 1      V2 = (0 + 1) / 2 = 0.5   negative (0.5 is not > 0.5)
#                                   G1 = (1.0 + 0.5) / 2 = 0.75 positive
#   G2 ── V3 ── R5 = 0, R6 = 0      V3 = 0.0                 negative
#     └── V4 ── R7 = 1, R8 = 0      V4 = 0.5                 negative
#                                   G2 = (0.0 + 0.5) / 2 = 0.25 negative
#
# Binarized propagation: G1 = mean(1, 0) = 0.5 (negative), G2 = mean(0, 0) = 0.

LEAVES = {"R1": 1.0, "R2": 1.0, "R3": 0.0, "R4": 1.0, "R5": 0.0, "R6": 0.0, "R7": 1.0, "R8": 0.0}
SHAPE = {"V1": "G1", "V2": "G1", "V3": "G2", "V4": "G2", "R1": "V1", "R2": "V1", "R3": "V2", "R4": "V2",
         "R5": "V3", "R6": "V3", "R7": "V4", "R8": "V4"}  # fmt: skip
ROLE = {"G": "generator", "V": "verifier", "R": "refiner"}


def call(call_id: str, parent: str | None, episode: str = "e1") -> ModelCall:
    role = ROLE[call_id[0]]
    prompt = [7, 7] if parent is None else [8, ord(parent[1])]  # siblings share their parent's prompt
    return ModelCall(
        call_id=call_id, episode_id=episode, node=role, role=role, agent=f"{role}-1", round=0,
        group_id=f"g-{parent}", sample_index=0, messages=[], text=call_id, prompt_token_ids=prompt,
        completion_token_ids=[ord(c) for c in call_id], logprobs=[-0.1] * len(call_id), finish_reason="stop",
        model="scripted/x", base_model="scripted", version="base", parent_call_id=parent,
    )  # fmt: skip


def hand_tree() -> tuple[list[ModelCall], list[Reward]]:
    calls = [call("G1", None), call("G2", None)] + [call(c, p) for c, p in SHAPE.items()]
    rewards = [Reward("e1", "correct", v, call_id=c) for c, v in LEAVES.items()]
    rewards.append(Reward("e1", "format", 1.0, call_id="R3"))  # other reward names are ignored
    return calls, rewards


def by_id(roots):
    return {n.call.call_id: n for n in walk(roots)}


def test_value_iteration_and_labels_on_a_hand_built_tree():
    nodes = by_id(assign_values(build_tree(*hand_tree()), threshold=0.5))
    expected = {"V1": 1.0, "V2": 0.5, "V3": 0.0, "V4": 0.5, "G1": 0.75, "G2": 0.25, **LEAVES}
    assert {k: n.value for k, n in nodes.items()} == pytest.approx(expected)
    positives = {k for k, n in nodes.items() if n.positive}
    assert positives == {"G1", "V1", "R1", "R2", "R4", "R7"}
    assert [n.call.call_id for n in nodes["G1"].children] == ["V1", "V2"]


def test_binarized_propagation_averages_child_labels():
    nodes = by_id(assign_values(build_tree(*hand_tree()), threshold=0.5, propagate="binarized"))
    assert nodes["G1"].value == 0.5 and nodes["G1"].positive is False  # V1 positive, V2 not
    assert nodes["G2"].value == 0.0
    assert nodes["V2"].value == 0.5  # leaves are already 0/1: critiques are the same either way


def test_a_lower_threshold_flips_the_half_values():
    nodes = by_id(assign_values(build_tree(*hand_tree()), threshold=0.4))
    assert nodes["V2"].positive and nodes["V4"].positive and not nodes["G2"].positive


def test_unscored_and_childless_outputs_get_no_value_and_no_label():
    calls, rewards = hand_tree()
    calls = [c for c in calls if c.call_id not in ("R7", "R8")]  # V4's refinements failed
    rewards = [r for r in rewards if r.call_id != "R6"]  # R6 was never graded
    roots = assign_values(build_tree(calls, rewards))
    nodes = by_id(roots)
    assert nodes["V4"].value is None and nodes["V4"].positive is None
    assert nodes["R6"].value is None and nodes["V3"].value == 0.0  # mean over the graded leaf only
    assert nodes["G2"].value == 0.0  # V4 does not count as a zero
    data = build_datasets(roots)
    assert data["verifier"].counts["unvalued"] == 1 and data["refiner"].counts["unvalued"] == 1


def test_datasets_sft_from_positives_and_pairs_from_siblings():
    roots = assign_values(build_tree(*hand_tree()))
    data = build_datasets(roots)
    assert {r: [e.call_id for e in d.sft] for r, d in data.items()} == {
        "generator": ["G1"], "verifier": ["V1"], "refiner": ["R1", "R2", "R4", "R7"],
    }  # fmt: skip
    pairs = {r: [(p.chosen_call_id, p.rejected_call_id) for p in d.pairs] for r, d in data.items()}
    # G: G1 vs G2 (same question). V: under G1 only (V3, V4 both negative). R: under V2 and V4 (V1: both positive).
    assert pairs == {
        "generator": [("G1", "G2")],
        "verifier": [("V1", "V2")],
        "refiner": [("R4", "R3"), ("R7", "R8")],
    }
    parent_of = {**SHAPE, "G1": None, "G2": None}
    for d in data.values():
        for p in d.pairs:
            assert parent_of[p.chosen_call_id] == parent_of[p.rejected_call_id]  # same parent
            assert p.parent == (parent_of[p.chosen_call_id] or "question:e1")
            assert p.chosen_value > p.rejected_value  # never equal values
            assert p.chosen_ids == [ord(c) for c in p.chosen_call_id]  # the recorded token ids
    assert data["refiner"].counts == {"outputs": 8, "positive": 4, "negative": 4, "unvalued": 0,
                                      "prompt_mismatch": 0, "sft": 4, "pairs": 2}  # fmt: skip


def test_no_pairs_between_questions_or_equal_values_and_the_cap_per_parent():
    calls, rewards = hand_tree()
    calls = [
        c if c.call_id != "G2" else call("G2", None, episode="e2") for c in calls
    ]  # G2: another question
    data = build_datasets(assign_values(build_tree(calls, rewards)))
    assert data["generator"].pairs == []
    roots = assign_values(build_tree(*hand_tree()), threshold=0.2)  # V1, V2, V4 positive; V3 negative
    capped = build_datasets(roots, max_pairs_per_parent=1)
    assert [(p.chosen_call_id, p.rejected_call_id) for p in capped["verifier"].pairs] == [("V4", "V3")]


def test_build_tree_refuses_calls_that_are_not_a_gvr_tree():
    calls, rewards = hand_tree()
    with pytest.raises(ValueError, match="not a verifier call"):
        build_tree([c for c in calls if c.call_id != "V2"], rewards)  # R3, R4 lose their parent
    with pytest.raises(ValueError, match="MALT trees hold only"):
        build_tree([*calls, ModelCall(**{**calls[0].__dict__, "call_id": "L1", "role": "leader"})], rewards)


def test_config_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        MALTConfig(threshold=1.5)
    with pytest.raises(ValueError, match="roles"):
        MALTConfig(roles=("leader",))
    with pytest.raises(ValueError, match="propagate"):
        MALTConfig(propagate="max")


def test_micro_batches_give_the_same_dpo_gradient_with_less_memory(tmp_path):
    """`micro_batch_size` accumulates gradients up to `batch_size`: the first optimizer step sees the same loss
    and gradient as with whole batches (what a run that ran out of memory resumes with). Later steps are not
    compared: Adam turns float noise in near-zero gradients into full-size steps."""
    from mlpo_agents import zoo
    from mlpo_agents.trainers.common import lora_copy
    from mlpo_agents.trainers.trl_glue import dpo_rows, fit

    with pytest.raises(ValueError, match="micro_batch_size=3 must be >= 1 and divide batch_size=4"):
        MALTConfig(batch_size=4, micro_batch_size=3)
    tokenizer = zoo.resolve("tiny-test")[1]
    pairs = [([5, 6, 7 + i], [10 + i, 11, 12], [20, 21 + i]) for i in range(8)]
    first: dict[int | None, dict[str, float]] = {}
    for micro in (None, 2, 1):
        logs: list[dict[str, float]] = []
        model = lora_copy("tiny-test", MALTConfig(batch_size=4, micro_batch_size=micro), seed=0)
        fit("dpo", model, tokenizer, dpo_rows(pairs), tmp_path / f"dpo-{micro}", lr=1e-2, seed=0, epochs=1.0,
            batch_size=4, micro_batch_size=micro, beta=0.2, on_log=logs.append)  # fmt: skip
        steps = [row for row in logs if "grad_norm" in row]
        assert [row["optimizer_step"] for row in steps] == [1, 2]  # 8 pairs, 4 per optimizer step
        first[micro] = steps[0]
    assert first[None]["grad_norm"] > 0
    for micro in (2, 1):
        assert first[micro]["loss"] == pytest.approx(first[None]["loss"], rel=1e-4)
        assert first[micro]["grad_norm"] == pytest.approx(first[None]["grad_norm"], rel=1e-4)


def test_mlpo_train_flags_map_onto_malt_config(tmp_path):
    from mlpo_agents.trainers.loop import add_subcommand, config_from_args

    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers())
    args = parser.parse_args(["train", "--algo", "malt", "--team", "tiny_gvr", "--out", str(tmp_path), "--seed",
                              "3", "--set", "branching=2", "--set", "roles=[\"refiner\"]"])  # fmt: skip
    config = config_from_args(args)
    assert isinstance(config, MALTConfig) and config.branching == 2 and config.roles == ("refiner",)
    assert config.seed == 3


# ------------------------------------------------------------------------------------------- trees from real runs


def test_tree_from_a_scripted_gvr_run_has_8_leaves_with_the_right_parents(tmp_path):
    answers = itertools.cycle(["<answer>4</answer>", "<answer>5</answer>"])
    gen = ScriptedModel("malt-gen", "<answer>5</answer>")
    ver = ScriptedModel("malt-ver", "check the sum")
    ref = ScriptedModel("malt-ref", lambda m: next(answers))
    team = scripted_team(
        {"generator": gen, "verifier": ver, "refiner": ref}, topology="gvr", name="malt-tree",
        params={"generator_samples": 2, "verifier_samples": 2, "refiner_samples": 2, "tree": True},
        trainable=("generator", "verifier", "refiner"),
    )  # fmt: skip
    task = Task(id="t/0", question="What is 2+2?", answer="4", kind="math", meta={})
    store = TraceStore(tmp_path / "traces.sqlite")
    asyncio.run(run_team(team, [task], store, task_name="unit", progress=False, score_roles=("refiner",)))
    calls, rewards = store.calls(), store.rewards()

    roots = assign_values(build_tree(calls, rewards))
    leaves = [n for n in walk(roots) if n.role == "refiner"]
    assert len(roots) == 2 and all(len(g.children) == 2 for g in roots) and len(leaves) == 8
    for g in roots:
        for v in g.children:
            assert v.role == "verifier" and v.call.parent_call_id == g.call.call_id and len(v.children) == 2
            assert all(r.call.parent_call_id == v.call.call_id for r in v.children)
            assert v.value == pytest.approx(sum(r.value for r in v.children) / 2)
        assert g.value == pytest.approx(sum(v.value for v in g.children) / 2)
    assert sorted(n.value for n in leaves) == [0.0] * 4 + [1.0] * 4  # refinements alternate 4 / 5
    data = build_datasets(roots)
    assert len(data["refiner"].sft) == 4 and all(len(d.sft) <= d.counts["outputs"] for d in data.values())
    for pair in data["refiner"].pairs:
        chosen = next(c for c in calls if c.call_id == pair.chosen_call_id)
        assert pair.prompt_ids == chosen.prompt_token_ids and pair.chosen_ids == chosen.completion_token_ids


# ------------------------------------------------------------------------------------------- training


@pytest.fixture
def mixed_rewards():
    """The random tiny model never solves arithmetic: grade by text length parity to get both labels."""
    from mlpo_agents.rewards import RewardResult
    from mlpo_agents.rubric import Rubric, use_rubric

    def parity(task, completion):
        value = float(len(completion.text) % 2)
        return RewardResult(value, completion.text[-20:], "correct" if value else "wrong")

    with use_rubric(Rubric.for_kind("math").replace("correct", parity)):  # every rollout is scored with it
        yield


def tiny_config(tmp_path: Path, **overrides) -> MALTConfig:
    values = dict(team="tiny_gvr", questions=2, branching=2, out=str(tmp_path / "run"), progress=False,
                  batch_size=8, eval_questions=0)  # fmt: skip
    return MALTConfig(**{**values, **overrides})


@pytest.mark.slow
def test_short_malt_run_on_tiny_changes_every_role_adapter_and_serves_it(tmp_path, mixed_rewards):
    from safetensors.torch import load_file

    # Temperature 1 (not the paper's 0.3) so a random tiny model's 2-branch tree has pairs to learn from, and
    # 3 questions: the parity grade labels each output by chance, and every role needs a positive (6 answers).
    result = malt.train(
        tiny_config(tmp_path, questions=3, eval_questions=1, eval_chains=2, dpo_lr=1e-3, sft_lr=1e-3,
                    tree_temperature=1.0)
    )

    for role in ("generator", "verifier", "refiner"):
        counts = result.counts[role]
        dpo = role in malt.MALTConfig().dpo_roles  # the generator is trained with SFT only (Alg. 1 line 22)
        assert counts["sft"] > 0 and (counts["pairs"] > 0 or not dpo), counts
        weights = load_file(str(result.adapters[role] / "adapter_model.safetensors"))
        lora_b = [w for k, w in weights.items() if "lora_B" in k]
        assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # LoRA B starts at zero: it was trained
        assert not any(".ref." in k for k in weights)  # DPO's reference copy is not shipped
        if dpo:
            sft_b = load_file(str(result.adapters[role].with_name(f"{role}-sft") / "adapter_model.safetensors"))
            assert any((sft_b[k] - weights[k]).abs().sum() > 0 for k in weights if "lora_B" in k)  # DPO moved it
    with TraceStore(tmp_path / "run" / "traces.sqlite") as store:
        after = [e.episode_id for e in store.episodes() if e.team.endswith("eval-after")]
        versions = {c.role: c.version for c in store.calls(episode_id=after)}
    assert set(versions) == {"generator", "verifier", "refiner"}
    assert all(v.startswith("malt-") and v.endswith(role) for role, v in versions.items())
    assert set(result.evaluation) == {"before", "after"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("dpo/refiner/loss" in r for r in rows) and any("tree/leaves" in r for r in rows)

    # The finished run re-evaluated with a majority vote (examples/malt_vote.py): untrained, then trained roles.
    from examples.malt_vote import vote

    run_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    voted = vote(tmp_path / "run", tmp_path / "vote", chains=3, temperature=1.0, questions=2, concurrency=2)
    assert voted["rows"]["team"]["n"] == 2 and voted["eval"]["chains"] == 3
    with TraceStore(tmp_path / "vote" / "traces.sqlite") as store:
        for label in ("before", "after"):
            episodes = [e.episode_id for e in store.episodes() if e.team.endswith(f"eval-{label}")]
            calls = store.calls(episode_id=episodes)
            assert len(episodes) == 2 and len(calls) == 2 * 3 * 3  # questions x chains x roles
            trained = {c.role: c.version for c in calls if c.version.startswith("malt-vote-")}
            assert trained == ({} if label == "before" else {r: f"malt-vote-{r}" for r in malt.ROLES})
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == run_files  # read only


def test_resume_skips_expanded_questions_and_finished_roles(tmp_path, mixed_rewards, monkeypatch):
    ran: list[str] = []

    def fake_sft(model, tokenizer, examples, config, folder, logger, prefix, offset):
        ran.append(prefix)
        return {f"{prefix}/optimizer_steps": 1}

    def fake_dpo(model, tokenizer, pairs, config, folder, logger, prefix, offset):
        ran.append(prefix)
        if prefix == "dpo/verifier" and not config.resume:
            raise KeyboardInterrupt  # the first run dies in the verifier's DPO
        return {f"{prefix}/optimizer_steps": 1}

    monkeypatch.setattr(malt, "sft", fake_sft)
    monkeypatch.setattr(malt, "dpo", fake_dpo)
    with pytest.raises(KeyboardInterrupt):
        malt.train(tiny_config(tmp_path))
    assert ran == ["sft/generator", "dpo/generator", "sft/verifier", "dpo/verifier"]
    with TraceStore(tmp_path / "run" / "traces.sqlite") as store:
        calls_before = len(store.calls())
    checkpoint = Checkpointer(tmp_path / "run").latest()  # the run's state after each finished phase
    assert checkpoint is not None and checkpoint.step == 3
    assert checkpoint.state["done"] == ["generator/sft", "generator/dpo", "verifier/sft"]

    ran.clear()
    result = malt.train(tiny_config(tmp_path, resume=True))
    assert ran == ["dpo/verifier", "sft/refiner", "dpo/refiner"]  # generator and verifier SFT are not redone
    with TraceStore(tmp_path / "run" / "traces.sqlite") as store:
        assert len(store.calls()) == calls_before  # no question was expanded again
    assert all((p / "adapter_model.safetensors").is_file() for p in result.adapters.values())

    ran.clear()
    malt.train(tiny_config(tmp_path, resume=True))
    assert ran == []  # everything finished: nothing runs again
