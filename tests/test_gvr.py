"""Generator → verifier → refiner (MALT) against scripted models: prompts, parent links, votes, failures, trees."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from mlpo_agents.graphs import build_topology
from mlpo_agents.graphs.gvr import build_gvr
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore

TASK = Task(id="t/0", question="What is 2+2?", answer="4", kind="math", meta={})


@pytest.fixture
def store(tmp_path: Path) -> TraceStore:
    return TraceStore(tmp_path / "traces.sqlite")


def gvr_team(name, generator, verifier, refiner, **params):
    return scripted_team(
        {"generator": generator, "verifier": verifier, "refiner": refiner},
        topology="gvr",
        params=params,
        name=name,
        trainable=("generator", "verifier", "refiner"),
    )


def run(team, store):
    (result,) = asyncio.run(run_team(team, [TASK], store, task_name="unit", progress=False)).results
    return result


def test_each_role_sees_exactly_its_inputs_and_the_refined_answer_is_final(store):
    gen = ScriptedModel("g1-gen", "2+2=5 <answer>5</answer>")
    ver = ScriptedModel("g1-ver", "Step 1 is wrong: 2+2 is 4.")
    ref = ScriptedModel("g1-ref", "Fixed: <answer>4</answer>")
    result = run(gvr_team("g1", gen, ver, ref), store)

    instruction = gen.prompts[0].removeprefix("What is 2+2?\n\n")
    assert gen.prompts == [f"What is 2+2?\n\n{instruction}"]
    assert ver.prompts == [
        "What is 2+2?\n\nProposed solution:\n2+2=5 <answer>5</answer>\n\n"
        "Critique this solution: check every step, point out any error, and say whether the final "
        "answer is correct. Do not write a new solution."
    ]
    assert ref.prompts == [
        "What is 2+2?\n\nProposed solution:\n2+2=5 <answer>5</answer>\n\n"
        "Critique of the solution:\nStep 1 is wrong: 2+2 is 4.\n\n"
        f"Using the critique, write a corrected solution. {instruction}"
    ]
    assert result.answer == "4" and result.status == "done" and result.reward == 1.0
    assert result.state["chain_answers"] == {"chain-1": "4"} and result.state["failed_chains"] == []


def test_trace_records_parent_links_and_node_role_agent_round_group(store):
    gen = ScriptedModel("g2-gen", "<answer>5</answer>")
    ver = ScriptedModel("g2-ver", "wrong")
    ref = ScriptedModel("g2-ref", "<answer>4</answer>")
    run(gvr_team("g2", gen, ver, ref, chains=2), store)

    calls = {(c.role, c.agent): c for c in store.calls()}
    assert sorted(calls) == sorted(
        (r, f"{r}-{k}") for r in ("generator", "verifier", "refiner") for k in (1, 2)
    )
    for k in (1, 2):
        g, v, r = (calls[(role, f"{role}-{k}")] for role in ("generator", "verifier", "refiner"))
        assert g.parent_call_id is None
        assert v.parent_call_id == g.call_id and r.parent_call_id == v.call_id
        assert [(c.node, c.round) for c in (g, v, r)] == [("generator", 0), ("verifier", 0), ("refiner", 0)]
    assert len({c.group_id for c in calls.values()}) == 6


def test_majority_vote_over_chains(store):
    replies = iter(["<answer>7</answer>", "<answer>8</answer>", "<answer>7</answer>"])
    gen = ScriptedModel("g3-gen", "<answer>1</answer>")
    ref = ScriptedModel("g3-ref", lambda m: next(replies))
    result = run(gvr_team("g3", gen, ScriptedModel("g3-ver", "ok"), ref, chains=3), store)
    assert result.answer == "7" and sorted(result.state["chain_answers"].values()) == ["7", "7", "8"]


def test_ties_go_to_the_earliest_chain(store):
    replies = iter(["A <answer>1</answer>", "B <answer>2</answer>"])
    gen = ScriptedModel("g4-gen", lambda m: next(replies))
    ver = ScriptedModel("g4-ver", "ok")
    ref = ScriptedModel(
        "g4-ref", lambda m: "<answer>7</answer>" if "A <answer>" in m[-1]["content"] else "<answer>8</answer>"
    )
    result = run(gvr_team("g4", gen, ver, ref, chains=2), store)

    chain1 = next(c for c in store.calls(role="refiner") if c.agent == "refiner-1")
    assert result.answer == chain1.text.removeprefix("<answer>").removesuffix("</answer>")
    assert sorted(result.state["chain_answers"].values()) == ["7", "8"]


def test_failed_generator_marks_its_chain_failed_and_the_vote_uses_the_others(store):
    def flaky(messages):
        flaky.count += 1
        if flaky.count == 2:
            raise RuntimeError("generator backend exploded")
        return "<answer>5</answer>"

    flaky.count = 0
    gen = ScriptedModel("g5-gen", flaky)
    ref = ScriptedModel("g5-ref", "<answer>4</answer>")
    result = run(gvr_team("g5", gen, ScriptedModel("g5-ver", "wrong"), ref, chains=3), store)

    (failure,) = store.failures()
    assert failure.role == "generator" and "exploded" in failure.message
    broken = "chain-" + failure.agent.rsplit("-", 1)[1]
    assert result.state["failed_chains"] == [broken] and result.state["chain_answers"][broken] is None
    assert result.answer == "4" and result.status == "degraded"
    (episode,) = store.episodes()
    assert episode.status == "degraded" and episode.final_answer == "4"
    verifiers = {c.agent for c in store.calls(role="verifier")}
    assert len(verifiers) == 2 and failure.agent.replace("generator", "verifier") not in verifiers


def test_failed_verifier_breaks_only_its_chain(store):
    def flaky(messages):
        flaky.count += 1
        if flaky.count == 1:
            raise RuntimeError("verifier timed out")
        return "looks fine"

    flaky.count = 0
    ref = ScriptedModel("g10-ref", "<answer>4</answer>")
    team = gvr_team(
        "g10", ScriptedModel("g10-gen", "<answer>4</answer>"), ScriptedModel("g10-ver", flaky), ref, chains=2
    )
    result = run(team, store)

    (failure,) = store.failures()
    broken = "chain-" + failure.agent.rsplit("-", 1)[1]
    assert failure.role == "verifier" and result.state["failed_chains"] == [broken]
    refiners = {c.agent for c in store.calls(role="refiner")}
    assert refiners == {"refiner-1", "refiner-2"} - {failure.agent.replace("verifier", "refiner")}
    assert result.answer == "4" and result.status == "degraded"


def test_every_chain_failing_gives_no_answer(store):
    gen = ScriptedModel("g6-gen", lambda m: (_ for _ in ()).throw(RuntimeError("down")))
    result = run(
        gvr_team("g6", gen, ScriptedModel("g6-ver", "x"), ScriptedModel("g6-ref", "x"), chains=2), store
    )
    assert result.answer is None and result.status == "failed"  # no team answer: failed, not degraded
    assert result.state["failed_chains"] == ["chain-1", "chain-2"]
    assert store.calls() == []


def test_samples_per_role_share_a_group_and_the_chain_continues_with_sample_0(store):
    gens = itertools.cycle(["G0 <answer>1</answer>", "G1 <answer>2</answer>", "G2 <answer>3</answer>"])
    gen = ScriptedModel("g7-gen", lambda m: next(gens))
    ver = ScriptedModel("g7-ver", "critique")
    ref = ScriptedModel("g7-ref", "<answer>4</answer>")
    run(gvr_team("g7", gen, ver, ref, generator_samples=3, verifier_samples=2, refiner_samples=2), store)

    g, v, r = (store.calls(role=role) for role in ("generator", "verifier", "refiner"))
    assert [len(g), len(v), len(r)] == [3, 2, 2]
    for calls in (g, v, r):
        assert len({c.group_id for c in calls}) == 1 and [c.sample_index for c in calls] == list(
            range(len(calls))
        )
    g0 = next(c for c in g if c.sample_index == 0)
    v0 = next(c for c in v if c.sample_index == 0)
    assert {c.parent_call_id for c in v} == {g0.call_id} and {c.parent_call_id for c in r} == {v0.call_id}
    assert g0.text.startswith("G0") and len(set(ver.prompts)) == 1 and g0.text in ver.prompts[0]


def test_tree_expands_a_verifier_per_answer_and_a_refiner_per_critique(store):
    gen = ScriptedModel("g8-gen", "<answer>5</answer>")
    ver = ScriptedModel("g8-ver", "wrong")
    ref = ScriptedModel("g8-ref", "<answer>4</answer>")
    team = gvr_team(
        "g8", gen, ver, ref, generator_samples=2, verifier_samples=2, refiner_samples=2, tree=True
    )
    result = run(team, store)

    g, v, r = (store.calls(role=role) for role in ("generator", "verifier", "refiner"))
    assert [len(g), len(v), len(r)] == [2, 4, 8]  # n x n x n leaves
    assert {c.parent_call_id for c in v} == {c.call_id for c in g}
    assert {c.parent_call_id for c in r} == {c.call_id for c in v}
    for children, parents in ((v, g), (r, v)):
        by_parent = {
            p.call_id: {c.group_id for c in children if c.parent_call_id == p.call_id} for p in parents
        }
        assert all(len(groups) == 1 for groups in by_parent.values())  # one group per parent
        assert len(set().union(*by_parent.values())) == len(parents)
    assert result.answer == "4" and result.state["failed_chains"] == []


def test_each_role_routes_to_its_own_model(store):
    gen, ver, ref = (ScriptedModel(f"g9-{r}", "<answer>4</answer>", base_model=f"base-{r}") for r in "gvr")
    run(gvr_team("g9", gen, ver, ref, chains=2), store)
    assert {(c.role, c.base_model) for c in store.calls()} == {
        ("generator", "base-g"),
        ("verifier", "base-v"),
        ("refiner", "base-r"),
    }
    assert len(gen.seen) == len(ver.seen) == len(ref.seen) == 2


def test_mermaid_snapshot():
    assert (
        build_gvr(chains=3).get_graph().draw_mermaid()
        == (Path(__file__).parent / "snapshots" / "gvr.mmd").read_text()
    )


@pytest.mark.parametrize(
    "params",
    [
        {"chains": 0},
        {"generator_samples": 0},
        {"verifier_samples": 0},
        {"refiner_samples": 0},
        {"nonsense": 1},
    ],
)
def test_out_of_range_parameters_are_refused(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        build_topology("gvr", **params)


def test_tree_seeds_each_branch_so_identical_answers_get_independent_critiques(store):
    """Seeded tree calls mix their place in the tree into the seed: two identical answers (or critiques)
    would otherwise be critiqued (refined) with one seed, i.e. the same samples twice."""
    gen = ScriptedModel("g10-gen", "<answer>5</answer>")  # both answers identical: identical verifier prompts
    ver = ScriptedModel("g10-ver", "wrong")
    ref = ScriptedModel("g10-ref", "<answer>4</answer>")
    team = gvr_team(
        "g10", gen, ver, ref, generator_samples=2, verifier_samples=2, refiner_samples=2, tree=True
    )
    for role in team.roles.values():
        role.sampling.seed = 3
    run(team, store)
    v, r = store.calls(role="verifier"), store.calls(role="refiner")
    assert len(set(ver.prompts)) == 1 and len(set(ref.prompts)) == 1  # one prompt per role ...
    assert len({c.sampling["seed"] for c in v}) == 2  # ... but one seed per verifier call (2 calls x n 2)
    assert len({c.sampling["seed"] for c in r}) == 4  # and per refiner call (4 calls x n 2)
    assert len({c.sampling["seed"] for c in v} | {c.sampling["seed"] for c in r}) == 6
