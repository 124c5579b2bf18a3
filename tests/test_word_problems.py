"""The word_problems task: answers right, splits disjoint, ids naming the question, bad options refused."""

from __future__ import annotations

import re

import pytest

from mlpo_agents.tasks import TaskError, load_task


def test_answers_match_the_story_and_splits_never_share_a_question() -> None:
    train = load_task("word_problems", split="train", limit=500, seed=3)
    test = load_task("word_problems", split="test", limit=200, seed=3)
    assert len({t.question for t in test}) == 200
    assert not {t.question for t in train} & {t.question for t in test}
    for task in train[:100] + test:
        a, op, b = task.meta["expression"].split()
        assert task.answer == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert int(task.answer) >= 0
        assert all(int(n) <= 9 for n in re.findall(r"\d+", task.question))


def test_ids_name_the_question_whatever_the_seed() -> None:
    one = {t.id: t.question for t in load_task("word_problems", split="test", limit=100, seed=0)}
    two = {t.id: t.question for t in load_task("word_problems", split="test", limit=100, seed=1)}
    assert all(one[i] == two[i] for i in set(one) & set(two))
    wider = {t.id: t.question for t in load_task("word_problems", split="test", limit=100, max_value=20)}
    assert all(one[i] == wider[i] for i in set(one) & set(wider))


@pytest.mark.parametrize("options", [{"max_value": 0}, {"ops": "*"}, {"ops": ""}])
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(TaskError, match="word_problems"):
        load_task("word_problems", split="test", limit=5, **options)
