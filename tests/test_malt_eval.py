"""MALT's held-out evaluation gives per-question strict and lenient outcomes, and the benchmark's paired
report (examples/malt_learning.py) is built from them."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest

from examples.malt_learning import markdown, report
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore
from mlpo_agents.trainers import malt
from mlpo_agents.trainers.common import load_split
from mlpo_agents.trainers.malt_eval import role_outcomes, roles_markdown, team_outcomes

# Three chains per question; each question's refiners reply with these texts (in any order):
#   q1: all strict 4              -> strict vote 4 (right), lenient 4 (right)
#   q2: "so it is 4" twice, 5 once -> strict vote 5 (the only strict answer: wrong), lenient 4, 4, 5 -> 4 (right)
#   q3: no number at all          -> no answer either way (wrong, wrong)
REPLIES = {
    "q1": ["<answer>4</answer>"] * 3,
    "q2": ["so it is 4", "so it is 4", "<answer>5</answer>"],
    "q3": ["I am not sure"] * 3,
}
QUESTIONS = {"q1": "What is 2+2?", "q2": "What is 1+3?", "q3": "What is 3+1?"}


def test_team_outcomes_are_the_strict_vote_and_a_lenient_vote_per_question(tmp_path):
    served: dict[str, int] = defaultdict(int)

    def refine(messages):
        qid = next(q for q, text in QUESTIONS.items() if text in messages[-1]["content"])
        served[qid] += 1
        return REPLIES[qid][served[qid] - 1]

    team = scripted_team(
        {"generator": ScriptedModel("me-gen", "<answer>4</answer>"), "verifier": ScriptedModel("me-ver", "fine"),
         "refiner": ScriptedModel("me-ref", refine)},
        topology="gvr", name="malt-eval", params={"chains": 3},
    )  # fmt: skip
    tasks = [Task(id=q, question=text, answer="4", kind="math", meta={}) for q, text in QUESTIONS.items()]
    with TraceStore(tmp_path / "traces.sqlite") as store:
        asyncio.run(run_team(team, tasks, store, task_name="unit", progress=False, score_roles=()))
        outcomes = team_outcomes(store, "malt-eval", "unit", tasks)
        roles = role_outcomes(store, "malt-eval", "unit", tasks)
    assert outcomes.correct == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    # Each role's own replies, every chain: the generator is always right, the verifier never answers, the
    # refiner is right 3 times of 9 (q1's three; "so it is 4" has no strict answer).
    assert {r: (v["strict"], v["cut"], v["replies"]) for r, v in roles.items()} == {
        "generator": (1.0, 0.0, 9), "verifier": (0.0, 0.0, 9), "refiner": (pytest.approx(1 / 3), 0.0, 9)
    }
    assert outcomes.lenient == {"q1": 1.0, "q2": 1.0, "q3": 0.0}
    assert outcomes.lenient_accuracy == pytest.approx(2 / 3) and outcomes.failed == 0


@pytest.fixture
def parity_rewards():
    """The random tiny model never solves a question: grade by text length parity to get both outcomes."""
    from mlpo_agents.rewards import RewardResult
    from mlpo_agents.rubric import Rubric, use_rubric

    def parity(task, completion):
        value = float(len(completion.text) % 2)
        return RewardResult(value, completion.text[-20:], "correct" if value else "wrong")

    with use_rubric(Rubric.for_kind("math").replace("correct", parity)):
        yield


def test_evaluate_on_tiny_pairs_per_question_and_the_report_is_built_from_them(
    tmp_path, parity_rewards, monkeypatch, capsys
):
    from mlpo_agents.config import load_team
    from mlpo_agents.models import ModelClient

    config = malt.MALTConfig(team="tiny_gvr", out=str(tmp_path / "run"), progress=False, eval_questions=8,
                             eval_chains=2, eval_temperature=1.0)  # fmt: skip
    team = load_team("tiny_gvr")
    with TraceStore(tmp_path / "traces.sqlite") as store:
        client = ModelClient(team, store)
        before = malt.evaluate(config, team, client, store, "before")
        after = malt.evaluate(config, team, client, store, "after")
    ids = {t.id for t in load_split(config, "test", 8)}
    for evaluation in (before, after):
        outcomes = evaluation["team_correct"]
        assert set(outcomes) == ids and set(outcomes.values()) <= {0.0, 1.0}
        assert sum(outcomes.values()) / len(outcomes) == pytest.approx(evaluation["accuracy"])
        assert evaluation["n"] == 8 and 0.0 <= evaluation["lenient_accuracy"] <= 1.0
    gained = sum(before["team_correct"][i] < after["team_correct"][i] for i in ids)
    lost = sum(before["team_correct"][i] > after["team_correct"][i] for i in ids)

    counts = dict(outputs=4, positive=1, negative=3, unvalued=0, prompt_mismatch=0, sft=1, pairs=2)
    result = SimpleNamespace(
        evaluation={"before": before, "after": after},
        history=[{"step": 0, "tree/questions": 2, "tree/leaves": 8, "tree/leaf_accuracy": 0.25,
                  "tree/failed_episodes": 0}],
        counts={role: counts for role in malt.ROLES},
        adapters={},
    )  # fmt: skip
    results = report(result, argparse.Namespace(seed=0), config, wall_s=60.0)
    row = results["rows"]["team"]
    assert row["n"] == 8 and (row["gained"], row["lost"]) == (gained, lost)
    assert row["before"] == pytest.approx(before["accuracy"]) and row["after"] == pytest.approx(after["accuracy"])
    assert row["before_lenient"] == before["lenient_accuracy"]
    assert [results["search"][r]["dpo_trained"] for r in malt.ROLES] == [0, 2, 2]  # the generator: SFT only
    table = markdown(results)
    assert f"{gained} / {lost}" in table and "| verifier | 4 | 1 | 3 | 0 | 1 | 2 (2) |" in table
    for label, evaluation in (("before", before), ("after", after)):  # 8 questions x 2 chains per role
        assert {r: v["replies"] for r, v in evaluation["roles"].items()} == dict.fromkeys(malt.ROLES, 16)
        assert results["roles"][label] == evaluation["roles"]
    verifier = before["roles"]["verifier"]
    assert f"| verifier | {verifier['strict']:.3f} → " in table

    # examples/malt_roles.py reads the same table back from a run's config and a trace store.
    from examples import malt_roles

    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    monkeypatch.setattr("sys.argv", ["malt_roles.py", "--run", str(run), "--store", str(tmp_path / "traces.sqlite")])
    malt_roles.main()
    printed = capsys.readouterr().out
    assert roles_markdown(before["roles"], after["roles"]) in printed
    assert json.loads(printed.strip().splitlines()[-1]) == {"before": before["roles"], "after": after["roles"]}


def test_malt_vote_refuses_a_folder_that_is_not_a_finished_malt_run(tmp_path):
    from examples.malt_vote import vote

    with pytest.raises(SystemExit, match="is the run folder: give this evaluation its own folder"):
        vote(tmp_path, tmp_path, chains=3)
    with pytest.raises(SystemExit, match="no config.json: pass the folder of a MALT run"):
        vote(tmp_path, tmp_path / "out", chains=3)
    (tmp_path / "config.json").write_text(json.dumps({"task": "tiny", "team": "tiny_gvr"}))
    with pytest.raises(SystemExit, match="not a MALT run's config"):
        vote(tmp_path, tmp_path / "out", chains=3)
    fields = {"task": "tiny", "team": "tiny_gvr", "roles": ["generator", "verifier", "refiner"], "adapter_per_role": True}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(SystemExit, match=r"no trained adapter in .*generator.*finish the run first"):
        vote(tmp_path, tmp_path / "out", chains=3)
    assert not (tmp_path / "out").exists()  # nothing written for a run it refused
