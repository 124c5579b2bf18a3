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
