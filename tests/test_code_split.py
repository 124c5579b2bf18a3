"""Task `code`: MBPP sanitized + HumanEval pooled, split into train and held-out test by a hash of the question."""

from __future__ import annotations

import argparse
import asyncio
import gzip

import pytest

from mlpo_agents.evaluate import load_tasks
from mlpo_agents.rewards import score_detail
from mlpo_agents.runner import run_team
from mlpo_agents.tasks import TaskError, load_task
from mlpo_agents.tasks.code import problem_id, split_of
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore
from mlpo_agents.trainers.common import load_split
from mlpo_agents.trainers.magrpo import MAGRPOConfig
from tests._commands import DATA  # $MLPO_DATA_DIR, else ../shared/data

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="benchmark data folder not found")

COUNTS = {("mbpp", "train"): 183, ("mbpp", "test"): 74, ("humaneval", "train"): 120, ("humaneval", "test"): 44}
"""Problems per source and split, as stated in mlpo_agents/tasks/code.py."""


def by_split() -> dict[str, list]:
    return {split: load_task("code", data_dir=DATA, split=split) for split in ("train", "test")}


def answer(code: str) -> str:
    return f"<answer>\n{code}</answer>"


def reference_program(task) -> str:
    """The task's reference solution as a full program the main agent could write."""
    if task.meta["style"] == "humaneval":  # the canonical solution is a body continuing the prompt
        return task.meta["prompt"] + task.meta["canonical_solution"]
    return task.meta["canonical_solution"]


def test_train_and_test_are_disjoint_cover_every_problem_and_have_the_stated_counts():
    splits = by_split()
    train, test = ({t.id for t in rows} for rows in splits.values())
    assert not train & test
    published = {t.id for name in ("mbpp", "humaneval") for t in load_task(name, data_dir=DATA)}
    sources = [t.meta["source_task"] for rows in splits.values() for t in rows]
    assert len(sources) == len(set(sources)) and set(sources) == published
    for split, rows in splits.items():
        for source in ("mbpp", "humaneval"):
            assert sum(t.meta["style"] == source for t in rows) == COUNTS[source, split], (source, split)
    assert len(splits["test"]) >= 100
    assert load_task("code", data_dir=DATA) == splits["test"]  # the default split is the held-out one


def test_the_split_of_a_problem_depends_only_on_its_question(tmp_path):
    full = {t.id: t.meta["split"] for rows in by_split().values() for t in rows}
    assert all(split_of(t.question) == t.meta["split"] for rows in by_split().values() for t in rows)
    for seed in (0, 1, 7):
        for split in ("train", "test"):
            sampled = load_task("code", data_dir=DATA, split=split, limit=40, seed=seed)
            assert len(sampled) == 40 and all(full[t.id] == split for t in sampled)
    # Another data folder with a third of the rows, in reverse order: every problem keeps its id and split.
    (tmp_path / "mbpp").mkdir()
    (tmp_path / "humaneval").mkdir()
    mbpp_lines = (DATA / "mbpp" / "sanitized_test.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "mbpp" / "sanitized_test.jsonl").write_text("\n".join(mbpp_lines[::-3]) + "\n", encoding="utf-8")
    with gzip.open(DATA / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        humaneval_lines = f.read().splitlines()
    with gzip.open(tmp_path / "humaneval" / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(humaneval_lines[::-3]) + "\n")
    fewer = [t for split in ("train", "test") for t in load_task("code", data_dir=tmp_path, split=split)]
    assert len(fewer) == len(mbpp_lines[::-3]) + len(humaneval_lines[::-3])
    assert all(full[t.id] == t.meta["split"] for t in fewer)


def test_ids_are_unique_and_name_one_problem():
    rows = [t for split_rows in by_split().values() for t in split_rows]
    assert len({t.id for t in rows}) == len(rows) == sum(COUNTS.values())
    assert all(t.id == problem_id(t.meta["style"], t.question) for t in rows)
    first = {t.meta["source_task"]: t.id for t in rows}
    # Pinned: a change of the hash scheme would silently move problems between train and test.
    assert first["mbpp/test/0"] == "code/mbpp/5718abd27c89"
    he = load_task("humaneval", data_dir=DATA)[0]
    assert first["humaneval/test/0"] == problem_id("humaneval", he.question)
    only_mbpp = load_task("code", data_dir=DATA, split="train", subset="mbpp")
    assert {t.meta["style"] for t in only_mbpp} == {"mbpp"} and len(only_mbpp) == COUNTS["mbpp", "train"]
    assert {t.id for t in only_mbpp} <= {t.id for t in rows}


def test_wrong_split_or_subset_names_the_valid_ones_and_published_tasks_point_to_code():
    with pytest.raises(TaskError, match=r"unknown split 'dev' for task 'code'; valid: train, test\."):
        load_task("code", data_dir=DATA, split="dev")
    with pytest.raises(TaskError, match=r"unknown subset 'apps' for task 'code'; valid: mbpp, humaneval\."):
        load_task("code", data_dir=DATA, subset="apps")
    for name in ("mbpp", "humaneval"):
        with pytest.raises(TaskError, match=rf"split 'train' for task '{name}'; valid: test .*task 'code'"):
            load_task(name, data_dir=DATA, split="train")


def test_eval_and_the_magrpo_trainer_load_the_task():
    args = argparse.Namespace(data_dir=str(DATA), split=None, limit=5, seed=0, task_option=None)
    loaded = load_tasks(["code", "code:humaneval"], args)
    assert {t.meta["split"] for t in loaded["code"]} == {"test"} and len(loaded["code"]) == 5
    assert {t.meta["style"] for t in loaded["code:humaneval"]} == {"humaneval"}
    config = MAGRPOConfig(task="code", team="code_pair", data_dir=str(DATA))
    train = load_split(config, "train", 8)
    assert len(train) == 8 and {t.meta["split"] for t in train} == {"train"}
    assert {t.meta["split"] for t in load_split(config, "test", 8)} == {"test"}


def two_of_each_source() -> list:
    rows = [t for split_rows in by_split().values() for t in split_rows]
    picked = []
    for source in ("mbpp", "humaneval"):
        for split in ("train", "test"):
            picked += [t for t in rows if t.meta["style"] == source and t.meta["split"] == split][:2]
    return picked


def test_reference_solutions_pass_the_code_reward_and_a_stub_does_not():
    for task in two_of_each_source():
        assert score_detail(task, answer(reference_program(task))).reason == "correct", task.id
        stub = f"def {task.meta['entry_point']}(*args):\n    return None\n"
        assert score_detail(task, answer(stub)).reason == "wrong", task.id


@pytest.mark.parametrize("source", ["mbpp", "humaneval"])
def test_a_row_runs_through_code_pair_and_its_reference_program_earns_the_joint_reward(tmp_path, source):
    task = next(t for t in load_task("code", data_dir=DATA, split="train") if t.meta["style"] == source)
    helper = ScriptedModel(f"split-{source}-h", answer("def aux(x):\n    return x\n"))
    main = ScriptedModel(f"split-{source}-m", answer(reference_program(task)))
    team = scripted_team({"helper": helper, "main": main}, topology="code_pair", params={"samples": 2},
                         name=f"split-{source}", trainable=("helper", "main"))
    store = TraceStore(tmp_path / "traces.sqlite")
    (result,) = asyncio.run(run_team(team, [task], store, task_name="code", progress=False)).results
    store.close()
    assert result.status == "done" and result.reward == 1.0, result
    assert f"`{task.meta['entry_point']}`" in main.prompts[0]  # the topology read the row's entry point


def test_rows_are_the_published_rows_plus_their_source_and_split():
    for task in two_of_each_source():
        original = next(t for t in load_task(task.meta["style"], data_dir=DATA) if t.id == task.meta["source_task"])
        assert (task.question, task.answer, task.kind) == (original.question, original.answer, original.kind)
        assert {k: v for k, v in task.meta.items() if k not in ("source_task", "split")} == original.meta
