"""MAGRPO evaluation on the tiny model: the team and its solver alone, scored per question before and after
training, and the learning example's before/after table built from those outcomes."""

from __future__ import annotations

import pytest

from examples.magrpo_learning import markdown, paired_rows, recorded_config, reproducing_flags
from mlpo_agents.rewards import RewardResult
from mlpo_agents.rubric import Rubric, use_rubric
from mlpo_agents.trace import TraceStore
from mlpo_agents.trainers.common import load_split
from mlpo_agents.trainers.magrpo import MAGRPOConfig, train


def parity(task, completion):
    """A reward the random tiny model earns on about half of its outputs: the parity of the text's byte sum (for
    the team's answer, which the tiny model never gives under the strict rule: of the episode's last output)."""
    text = completion.text or (completion.state.get("turns") or [{"text": ""}])[-1]["text"]
    value = float(sum(text.encode()) % 2)
    return RewardResult(value, text[-20:], "correct" if value else "wrong")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("magrpo_eval")
    config = MAGRPOConfig(
        model="tiny-test",
        task="arithmetic",
        out=str(out),
        steps=1,
        group_size=2,
        questions_per_step=2,
        train_questions=2,
        max_tokens=6,
        lr=1e-2,
        eval_questions=8,
        progress=False,
        concurrency=4,
    )
    with use_rubric(Rubric.for_kind("math").replace("correct", parity)):
        return config, train(config)


def test_evaluation_returns_strict_outcomes_per_question_for_the_team_and_the_solver_alone(run):
    config, result = run
    ids = {t.id for t in load_split(config, "test", config.eval_questions)}
    for label in ("before", "after"):
        evaluation = result.evaluation[label]
        for who in ("team", "solo"):
            correct = evaluation[f"{who}_correct"]
            assert set(correct) == ids, f"{label} {who}: one outcome per held-out question"
            assert set(correct.values()) <= {0.0, 1.0}
            assert evaluation[f"{who}_accuracy"] == pytest.approx(sum(correct.values()) / len(ids))
            assert evaluation[f"{who}_lenient_accuracy"] is not None, f"{label} {who}: the lenient figure"
    outcomes = [result.evaluation[label][f"{who}_correct"] for label in ("before", "after") for who in ("team", "solo")]
    assert any(0 < sum(c.values()) < len(ids) for c in outcomes), "the parity reward should split the questions"


def test_the_solver_alone_is_evaluated_with_its_base_model_before_and_its_trained_adapter_after(run):
    config, result = run
    store = TraceStore(f"{config.out}/eval_traces.sqlite")
    try:
        versions = {}
        for label in ("before", "after"):
            episodes = store.episodes(team=f"cooperate-solver-alone-{label}")
            calls = store.calls(episode_id=[e.episode_id for e in episodes])
            assert len(episodes) == config.eval_questions and {c.role for c in calls} == {"leader"}
            versions[label] = {c.version for c in calls}
            team = store.episodes(team=f"cooperate-{label}")
            assert len(team) == config.eval_questions
    finally:
        store.close()
    assert versions == {"before": {"base"}, "after": {"solver-step-1"}}


def test_the_report_pairs_before_and_after_per_question(run):
    _, result = run
    before, after = result.evaluation["before"], result.evaluation["after"]
    rows = paired_rows(before, after)
    assert list(rows) == ["team", "solver alone", "trained team vs untrained solver alone"]
    for name, (was, now) in {"team": ("team", "team"), "trained team vs untrained solver alone": ("solo", "team")}.items():
        b, a = before[f"{was}_correct"], after[f"{now}_correct"]
        row = rows[name]
        assert row["n"] == len(b)
        assert row["before"] == pytest.approx(sum(b.values()) / len(b))
        assert row["after"] == pytest.approx(sum(a.values()) / len(a))
        assert row["gained"] == sum(1 for k in b if b[k] == 0 and a[k] == 1)
        assert row["lost"] == sum(1 for k in b if b[k] == 1 and a[k] == 0)
        assert row["before_lenient"] == before[f"{was}_lenient_accuracy"]
    config = {"agents": ["drafter", "solver"], "task": "word_problems"}
    table = markdown({"steps": result.steps, "wall_minutes": 0.1, "seed": 0, "rows": rows, "team": "cooperate",
                      "config": config})
    assert table.startswith("MAGRPO, cooperate team (drafter + solver) on word_problems,")
    assert "| team | 8 |" in table and "| solver alone | 8 |" in table and "lenient" in table


def test_paired_rows_use_the_outcomes_not_the_accuracies():
    before = {"team_correct": {"a": 0.0, "b": 1.0}, "solo_correct": {"a": 1.0, "b": 1.0}, "team_accuracy": 0.9}
    after = {"team_correct": {"a": 1.0, "b": 1.0}, "solo_correct": {"a": 0.0, "b": 1.0}}
    rows = paired_rows(before, after)
    assert (rows["team"]["before"], rows["team"]["after"], rows["team"]["gained"]) == (0.5, 1.0, 1)
    assert (rows["solver alone"]["lost"], rows["trained team vs untrained solver alone"]["gained"]) == (1, 0)
    assert "before_lenient" not in rows["team"], "no lenient column without lenient figures"


def test_the_recorded_command_leaves_out_flags_a_team_file_overrides():
    import argparse

    args = argparse.Namespace(team="qwen_code_pair", model="smollm2-135m", max_tokens=96, temperature=0.7, top_p=0.95,
                              seed=0, lr=2e-4)  # fmt: skip
    assert reproducing_flags(args) == {"team": "qwen_code_pair", "seed": 0, "lr": 2e-4}
    args.team = None  # the built-in team: its model and sampling come from these flags
    assert reproducing_flags(args)["model"] == "smollm2-135m" and reproducing_flags(args)["max_tokens"] == 96


def test_the_recorded_config_shows_a_team_files_own_agents_not_the_built_in_flags():
    from mlpo_agents.config import load_team
    from mlpo_agents.trainers.magrpo import MAGRPOConfig, for_team

    team = load_team("qwen_code_pair")
    config = for_team(MAGRPOConfig(team="qwen_code_pair", task="code"), team)
    record = recorded_config(config, team)
    assert not {"model", "max_tokens", "temperature", "top_p"} & set(record)  # the built-in team's, not applied
    assert set(record["team_agents"]) == set(team.roles)
    for role, rc in team.roles.items():
        assert record["team_agents"][role]["max_tokens"] == rc.sampling.max_tokens
        assert "qwen" in record["team_agents"][role]["model"]
    assert recorded_config(config)["model"] == config.model  # the built-in team: the flags are what ran
