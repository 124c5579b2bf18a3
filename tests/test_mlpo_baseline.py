"""Reusing an untrained evaluation across MLPO runs: only when everything it depends on matches."""

from __future__ import annotations

import json

import pytest

from mlpo_agents.config import load_team
from mlpo_agents.trainers.mlpo import MLPOConfig
from mlpo_agents.trainers.mlpo_eval import BASELINE, baseline_fingerprint, load_baseline


def saved_run(tmp_path, config: MLPOConfig, team) -> object:
    folder = tmp_path / "previous"
    folder.mkdir()
    before = {"team_accuracy": 0.1, "team_correct": {"q1": 0.0, "q2": 1.0}}
    pool = {"entries": {"q1": {}}, "pick": 0}
    payload = {"fingerprint": baseline_fingerprint(config, team), "before": before, "eval_pool": pool}
    (folder / BASELINE).write_text(json.dumps(payload))
    return folder


def test_a_matching_run_is_reused_whatever_the_training_temperature(tmp_path) -> None:
    team = load_team("tiny")
    config = MLPOConfig(team="tiny", eval_questions=2, seed=3)
    folder = saved_run(tmp_path, config, team)
    hotter = team.model_copy(deep=True)
    hotter.roles["leader"].sampling.temperature = 1.3  # evaluation replaces it with eval_temperature
    before, pool = load_baseline(folder, baseline_fingerprint(MLPOConfig(team="tiny", eval_questions=2, seed=3, lr=1e-3), hotter))
    assert before["team_correct"] == {"q1": 0.0, "q2": 1.0} and pool["entries"] == {"q1": {}}


@pytest.mark.parametrize("change", [{"seed": 4}, {"eval_questions": 3}, {"task": "gsm8k"}, {"eval_temperature": 0.5}])
def test_other_evaluation_settings_are_refused_by_name(tmp_path, change) -> None:
    team = load_team("tiny")
    folder = saved_run(tmp_path, MLPOConfig(team="tiny", eval_questions=2, seed=3), team)
    other = MLPOConfig(**{"team": "tiny", "eval_questions": 2, "seed": 3, **change})
    with pytest.raises(ValueError, match=next(iter(change))):
        load_baseline(folder, baseline_fingerprint(other, team))


def test_a_different_peer_setting_is_refused(tmp_path) -> None:
    team = load_team("tiny")
    config = MLPOConfig(team="tiny", eval_questions=2)
    folder = saved_run(tmp_path, config, team)
    other = team.model_copy(update={"params": {**team.params, "peers": 1}})
    with pytest.raises(ValueError, match="team"):
        load_baseline(folder, baseline_fingerprint(config, other))


def test_a_folder_without_a_baseline_says_what_to_point_at(tmp_path) -> None:
    with pytest.raises(ValueError, match="point it at the folder of an MLPO run"):
        load_baseline(tmp_path, {})
