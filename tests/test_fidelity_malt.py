"""MALT labels and pairs vs Algorithm 1 of the paper (Motwani et al. 2024, arXiv 2412.01928, Alg. 1 and §4.3).

Reference: Algorithm 1, transcribed below on nested dicts independently of `trainers.malt`: a
refinement's value is its 0/1 reward; a critique's value the mean of its refinements'; an answer's value
the mean of its critiques'; an output is positive when its value > 0.5. Training data per role: SFT on
the positives; DPO pairs (positive, negative) of the verifier's and refiner's outputs that share a parent;
the generator gets SFT only (line 22; §4.3). Trees are hand-built: complete (n = 2, 8 leaves) and
incomplete (a failed refinement and a critique whose refinements all failed: no graded leaf below it,
so no value, no label, no pair, as `trainers.malt` documents).
"""

from __future__ import annotations

import itertools

from mlpo_agents.trace import ModelCall, Reward
from mlpo_agents.trainers.malt import MALTConfig, assign_values, build_datasets, build_tree, walk

ROLE = {"G": "generator", "V": "verifier", "R": "refiner"}


def alg1(tree: dict[str, dict[str, dict[str, float | None]]]) -> tuple[dict[str, float | None], set]:
    """Algorithm 1 on {answer: {critique: {refinement: reward or None (failed)}}}: values and training pairs."""
    value: dict[str, float | None] = {}
    for answer, critiques in tree.items():
        for critique, refinements in critiques.items():
            for refinement, reward in refinements.items():
                value[refinement] = reward
            graded = [r for r in refinements.values() if r is not None]
            value[critique] = sum(graded) / len(graded) if graded else None
        valued = [value[c] for c in critiques if value[c] is not None]
        value[answer] = sum(valued) / len(valued) if valued else None  # type: ignore[arg-type]

    def positive(node: str) -> bool | None:
        v = value[node]
        return None if v is None else v > 0.5

    pairs = set()
    sibling_sets = [list(c) for c in tree.values()] + [list(r) for cs in tree.values() for r in cs.values()]
    for siblings in sibling_sets:  # verifier and refiner siblings; the generator is SFT only
        for chosen, rejected in itertools.product(siblings, siblings):
            if positive(chosen) is True and positive(rejected) is False:
                pairs.add((chosen, rejected))
    return value, pairs


def traces(tree) -> tuple[list[ModelCall], list[Reward]]:
    calls, rewards = [], []

    def add(call_id: str, parent: str | None) -> None:
        role = ROLE[call_id[0]]
        calls.append(
            ModelCall(
                call_id=call_id, episode_id="e1", node=role, role=role, agent=f"{role}-1", round=0,
                group_id=f"g-{parent}", sample_index=0, messages=[], text=call_id,
                prompt_token_ids=[1] if parent is None else [2, *map(ord, parent)],
                completion_token_ids=list(map(ord, call_id)), logprobs=[-0.1] * len(call_id),
                finish_reason="stop", model="scripted/x", base_model="scripted", version="base",
                parent_call_id=parent,
            )
        )  # fmt: skip

    for answer, critiques in tree.items():
        add(answer, None)
        for critique, refinements in critiques.items():
            add(critique, answer)
            for refinement, reward in refinements.items():
                add(refinement, critique)
                if reward is not None:  # a failed refinement has no grade
                    rewards.append(Reward("e1", "correct", reward, call_id=refinement))
    return calls, rewards


COMPLETE = {
    "G1": {"V1": {"R1": 1.0, "R2": 1.0}, "V2": {"R3": 0.0, "R4": 1.0}},
    "G2": {"V3": {"R5": 0.0, "R6": 0.0}, "V4": {"R7": 1.0, "R8": 1.0}},
}
INCOMPLETE = {
    "G1": {"V1": {"R1": 1.0, "R2": None}, "V2": {"R3": None, "R4": None}},
    "G2": {"V3": {"R5": 0.0, "R6": 1.0}, "V4": {"R7": 0.0, "R8": 0.0}},
    "G3": {"V5": {"R9": 1.0, "Ra": 1.0}, "V6": {"Rb": 1.0, "Rc": 0.0}},
}


def ours(tree):
    config = MALTConfig()
    roots = assign_values(build_tree(*traces(tree)), config.threshold, config.propagate)
    data = build_datasets(roots, config.max_pairs_per_parent)
    values = {n.call.call_id: n.value for n in walk(roots)}
    trained_pairs = {
        (p.chosen_call_id, p.rejected_call_id)
        for role, d in data.items()
        if role in config.dpo_roles
        for p in d.pairs
    }
    sft = {e.call_id for d in data.values() for e in d.sft}
    return values, trained_pairs, sft, data


def check(tree):
    expected_values, expected_pairs = alg1(tree)
    values, pairs, sft, data = ours(tree)
    assert values == expected_values
    assert pairs == expected_pairs
    assert sft == {k for k, v in expected_values.items() if v is not None and v > 0.5}
    return values, pairs, data


def test_complete_tree_matches_algorithm_1():
    values, pairs, data = check(COMPLETE)
    # G1 = (1 + 0.5) / 2 = 0.75 positive, G2 = (0 + 1) / 2 = 0.5 negative (not > 0.5)
    assert values["G1"] == 0.75 and values["G2"] == 0.5
    assert pairs == {("V1", "V2"), ("V4", "V3"), ("R4", "R3")}
    assert [(p.chosen_call_id, p.rejected_call_id) for p in data["generator"].pairs] == [("G1", "G2")]


def test_incomplete_tree_matches_algorithm_1_and_leaves_unvalued_outputs_out():
    values, pairs, data = check(INCOMPLETE)
    assert values["V1"] == 1.0 and values["V2"] is None and values["G1"] == 1.0  # G1 from V1 alone
    assert not any("V2" in p for p in pairs) and ("R6", "R5") in pairs
    assert data["verifier"].counts["unvalued"] == 1 and data["refiner"].counts["unvalued"] == 3


def test_defaults_are_the_papers():
    """Alg. 1 / §4.3 and the appendix: generator SFT only, DPO beta 0.2, n = 3, tree temperature 0.3."""
    config = MALTConfig()
    assert config.dpo_roles == ("verifier", "refiner") and config.dpo_beta == 0.2
    assert config.branching == 3 and config.tree_temperature == 0.3 and config.threshold == 0.5
    assert config.propagate == "mean"
