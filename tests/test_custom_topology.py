"""A user topology (examples/mixture_of_agents.py) runs through the public API, the runner and traces_to_batch."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

import pytest
import torch

from mlpo_agents.graphs import build_topology
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore
from mlpo_agents.trainers.batch import load_events, traces_to_batch

REPO = Path(__file__).resolve().parents[1]
TOPOLOGY = "examples.mixture_of_agents:build_mixture_of_agents"
TASKS = [
    Task(id=f"t/{i}", question=f"What is {i}+2?", answer=str(i + 2), kind="math", meta={}) for i in range(2)
]


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch):
    # What `PYTHONPATH=.` does from the repo root (see the example's docstring).
    monkeypatch.syspath_prepend(str(REPO))
    yield
    sys.modules.pop("examples.mixture_of_agents", None)


@pytest.fixture
def store(tmp_path: Path) -> TraceStore:
    return TraceStore(tmp_path / "traces.sqlite")


def moa_team(name, proposer, aggregator, **params):
    return scripted_team(
        {"proposer": proposer, "aggregator": aggregator},
        topology=TOPOLOGY,
        params=params,
        name=name,
        trainable=("aggregator",),
    )


def run(team, store, tasks):
    return asyncio.run(run_team(team, tasks, store, task_name="unit", progress=False))


def test_layers_see_the_previous_layer_and_the_aggregator_sees_the_last(store):
    counter = itertools.count(1)
    proposer = ScriptedModel("moa1-prop", lambda m: f"P{next(counter)} <answer>2</answer>")
    aggregator = ScriptedModel("moa1-agg", "<answer>2</answer>")
    summary = run(moa_team("moa1", proposer, aggregator, proposers=2, layers=2), store, TASKS[:1])

    calls = store.calls()
    assert sorted((c.role, c.agent, c.round) for c in calls) == [
        ("aggregator", "aggregator", 2),
        ("proposer", "proposer-1", 0),
        ("proposer", "proposer-1", 1),
        ("proposer", "proposer-2", 0),
        ("proposer", "proposer-2", 1),
    ]
    assert {c.node for c in calls} == {"proposer", "aggregator"}
    layer0 = {c.text for c in calls if c.round == 0}
    for c in calls:
        prompt = c.messages[-1]["content"]
        if c.round == 0:
            assert "Responses from other models" not in prompt
        else:
            previous = {c2.text for c2 in calls if c2.role == "proposer" and c2.round == c.round - 1}
            assert all(text in prompt for text in previous) and prompt.count("<answer>2</answer>") == 2
    assert not any(text in aggregator.prompts[0] for text in layer0)
    assert summary.results[0].answer == "2" and summary.accuracy == 1.0


def test_aggregator_samples_become_a_grpo_batch_without_special_cases(store):
    replies = itertools.cycle(["right <answer>{}</answer>", "wrong <answer>0</answer>", "none"])

    def aggregate(messages):
        i = int(messages[-1]["content"].removeprefix("What is ").split("+", 1)[0])  # "What is i+2?"
        return next(replies).format(i + 2)

    proposer = ScriptedModel("moa2-prop", "<answer>3</answer>", base_model="frozen-api")
    aggregator = ScriptedModel("moa2-agg", aggregate)
    team = moa_team("moa2", proposer, aggregator, proposers=2, layers=1, aggregator_samples=3)
    summary = run(team, store, TASKS)
    assert summary.episodes == 2 and summary.accuracy == 1.0  # sample 0 is "right" in both episodes

    batch = traces_to_batch(*load_events(store), roles=("aggregator",), base_model="scripted")
    assert len(batch) == 6 and batch.stats.groups == 2 and batch.stats.other_role == 4
    assert batch.stats.dropped == 0 and batch.stats.mixed_prompt_groups == 0
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0] * 2
    assert torch.allclose(batch.advantages, torch.tensor([2 / 3, -1 / 3, -1 / 3] * 2))
    assert batch.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    calls = {c.call_id: c for c in store.calls(role="aggregator")}
    for b, call_id in enumerate(batch.call_ids):
        c = calls[call_id]
        p, n = len(c.prompt_token_ids), len(c.completion_token_ids)
        assert batch.input_ids[b, : p + n].tolist() == c.prompt_token_ids + c.completion_token_ids
        assert batch.completion_mask[b].nonzero().flatten().tolist() == list(range(p, p + n))
        assert batch.attention_mask[b].sum().item() == p + n


def test_mermaid_snapshot():
    graph = build_topology(TOPOLOGY, proposers=3, layers=2)
    assert (
        graph.get_graph().draw_mermaid()
        == (REPO / "tests" / "snapshots" / "mixture_of_agents.mmd").read_text()
    )


@pytest.mark.parametrize("params", [{"proposers": 0}, {"layers": 0}])
def test_out_of_range_parameters_are_refused(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        build_topology(TOPOLOGY, **params)
