"""MLPO options beyond the paper's defaults, on the tiny model: solo groups mixed into the update."""

from __future__ import annotations

import pytest

from mlpo_agents.trace import TraceStore
from mlpo_agents.trainers.mlpo import MLPOConfig, train


def tiny_config(out, **kw):
    base = dict(
        team="tiny",
        task="arithmetic",
        out=str(out),
        steps=1,
        group_size=3,
        questions_per_step=2,
        train_questions=4,
        progress=False,
        concurrency=1,
        seed=3,
        easy_threshold=None,
        eval_questions=0,
    )
    return MLPOConfig(**{**base, **kw})


def test_solo_fraction_is_validated():
    with pytest.raises(ValueError, match=r"solo_fraction=1.0: must be in \[0, 1\)"):
        MLPOConfig(solo_fraction=1.0)


def test_solo_fraction_samples_some_questions_without_peers(tmp_path):
    """Half of the step's questions: the leader alone (no peer calls), G samples, in the same batch."""
    result = train(tiny_config(tmp_path, solo_fraction=0.5))
    store = TraceStore(tmp_path / "traces.sqlite")
    episodes = {c.episode_id for c in store.calls(role="leader")}
    assert len(episodes) == 2
    peers = {c.episode_id for c in store.calls(role="peer")}
    solo = episodes - peers
    assert len(solo) == 1 and len(peers & episodes) == 1, "one question alone, one with its peers"
    for episode in episodes:
        assert len(store.calls(episode_id=episode, role="leader")) == 3, "G leader samples each"
    step = next(r for r in result.history if r.get("step") == 1 and "batch/rows" in r)
    assert step["batch/rows"] == 6 and "reward/correct_solo" in step
    store.close()


def test_pool_easy_filter_drops_easy_questions_before_training(tmp_path):
    """The paper's filter: peers answer a new question first (filling the pool); a question whose pooled
    answers are right >= easy_threshold of the time is never trained on."""
    from mlpo_agents.rubric import Rubric, use_rubric

    easy_ids: list[str] = []

    def peers_right_on_the_first_question(task, completion):
        if not easy_ids:
            easy_ids.append(task.id)
        return float(task.id == easy_ids[0] and completion.role == "peer")

    with use_rubric(Rubric.for_kind("math").replace("correct", peers_right_on_the_first_question)):
        train(tiny_config(tmp_path, easy_threshold=0.75, pool_samples=2, train_questions=3))
    easy_ids_set = set(easy_ids)
    store = TraceStore(tmp_path / "traces.sqlite")
    trained = {e.task_id for e in store.episodes() if store.calls(episode_id=e.episode_id, role="leader")}
    filled = {e.task_id for e in store.episodes() if not store.calls(episode_id=e.episode_id, role="leader")}
    assert len(easy_ids_set) == 1 and easy_ids_set <= filled, "the easy question was pooled by a peers-only episode"
    assert not easy_ids_set & trained and len(trained) == 2, "and never trained on; two others were"
    fill_episode = next(e for e in store.episodes() if e.task_id in easy_ids_set)
    assert {c.sampling.get("n") for c in store.calls(episode_id=fill_episode.episode_id, role="peer")} == {2}
    store.close()


def test_pool_filter_config_errors():
    with pytest.raises(ValueError, match="easy_filter='peers'"):
        MLPOConfig(easy_filter="peers")
    with pytest.raises(ValueError, match="keep peer_pool=True"):
        MLPOConfig(peer_pool=False)


def test_lenient_shaping_is_recorded_per_call_and_weighed(tmp_path):
    """format_reward="lenient": each leader call gets a `lenient` reward (right under the lenient rule), and
    the batch weighs it beside strict correctness."""
    from mlpo_agents.trainers.batch import load_events

    train(tiny_config(tmp_path, format_reward="lenient", format_weight=0.5))
    store = TraceStore(tmp_path / "traces.sqlite")
    calls, rewards = load_events(store, roles=("leader",))
    lenient = {r.call_id for r in rewards if r.name == "lenient"}
    assert calls and lenient == {c.call_id for c in calls}, "one lenient reward per leader call"
    assert not [r for r in store.rewards() if r.name == "lenient" and r.call_id not in lenient], "leader calls only"
    store.close()
