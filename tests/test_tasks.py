"""Task loaders against the offline benchmark copies in ../shared/data."""

from __future__ import annotations

import json

import pytest

from mlpo_agents.tasks import TASKS, Task, TaskError, load_task
from mlpo_agents.tasks.bbh import SUBSETS
from mlpo_agents.tasks.mmlu import SUBJECTS
from tests._commands import DATA  # noqa: E402 - $MLPO_DATA_DIR, else ../shared/data

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="benchmark data folder not found")


@pytest.mark.parametrize(
    ("name", "split", "subset", "count", "kind"),
    [
        ("gsm8k", "test", None, 1319, "math"),
        ("gsm8k", "train", None, 7473, "math"),
        ("math", None, None, 5000, "math"),
        ("math500", None, None, 500, "math"),
        ("bbh", None, None, 6511, "exact"),
        ("bbh", None, "snarks", 178, "exact"),
        ("mmlu", None, None, 14042, "choice"),
        ("mmlu", None, "abstract_algebra", 100, "choice"),
        ("csqa", None, None, 1221, "choice"),
        ("humaneval", None, None, 164, "code"),
        ("mbpp", None, None, 257, "code"),
        ("arithmetic", "test", "easy", 200, "math"),
    ],
)
def test_counts_and_fields(name, split, subset, count, kind):
    tasks = load_task(name, data_dir=DATA, split=split, subset=subset)
    assert len(tasks) == count
    assert len({t.id for t in tasks}) == count
    for t in tasks[:5]:
        assert isinstance(t, Task) and t.kind == kind and t.question.strip()
        assert t.answer or kind == "code"


def test_row_contents():
    gsm = load_task("gsm8k", data_dir=DATA)[2]
    assert gsm.answer == "70000" and gsm.id == "gsm8k/test/2"  # "#### 70000" in the file
    math = load_task("math", data_dir=DATA)[2]
    assert math.answer == "\\dfrac{9}{7}" and math.meta["subject"] == "Algebra"
    assert load_task("math500", data_dir=DATA)[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    mmlu = load_task("mmlu", data_dir=DATA)[0]
    assert (
        mmlu.answer == "D"
        and set(mmlu.meta["options"]) == set("ABCD")
        and "D. Not wrong, Not wrong" in mmlu.question
    )
    csqa = load_task("csqa", data_dir=DATA)[0]
    assert csqa.answer == "A" and csqa.meta["options"]["A"] == "bank" and "E. new york" in csqa.question
    bbh = load_task("bbh", data_dir=DATA, subset="geometric_shapes")[0]
    assert bbh.answer == "(B)" and bbh.meta["gold_letter"] == "B" and bbh.meta["options"]["B"] == "heptagon"
    he = load_task("humaneval", data_dir=DATA)[0]
    assert he.meta["entry_point"] == "has_close_elements" and "def check(candidate)" in he.meta["tests"]
    assert he.question.startswith("from typing import List")
    mbpp = load_task("mbpp", data_dir=DATA)[0]
    assert mbpp.meta["entry_point"] == "remove_Occ" and len(mbpp.meta["tests"]) == 3
    assert 'assert remove_Occ("hello","l") == "heo"' in mbpp.question


def test_every_bbh_subset_and_mmlu_subject_loads():
    assert len(SUBSETS) == 27 and len(SUBJECTS) == 57
    bbh = load_task("bbh", data_dir=DATA)
    assert {t.meta["subset"] for t in bbh} == set(SUBSETS)
    mmlu = load_task("mmlu", data_dir=DATA)
    assert {t.meta["subject"] for t in mmlu} == set(SUBJECTS)


def test_env_var_data_dir(monkeypatch):
    monkeypatch.setenv("MLPO_DATA_DIR", str(DATA))
    assert len(load_task("math500")) == 500


def test_seeded_sampling_is_reproducible():
    a = load_task("gsm8k", data_dir=DATA, limit=20, seed=3)
    b = load_task("gsm8k", data_dir=DATA, limit=20, seed=3)
    c = load_task("gsm8k", data_dir=DATA, limit=20, seed=4)
    assert [t.id for t in a] == [t.id for t in b] and len(a) == 20
    assert [t.id for t in a] != [t.id for t in c]
    assert len(load_task("csqa", data_dir=DATA, limit=10_000)) == 1221


def test_arithmetic_is_deterministic_and_splits_are_disjoint():
    for level in ("easy", "medium", "hard"):
        train = load_task("arithmetic", split="train", subset=level, limit=2000, seed=0)
        test = load_task("arithmetic", split="test", subset=level, limit=300, seed=1)
        assert not {t.meta["expression"] for t in train} & {t.meta["expression"] for t in test}
        again = load_task("arithmetic", split="train", subset=level, limit=2000, seed=0)
        assert [(t.question, t.answer) for t in train] == [(t.question, t.answer) for t in again]
        for t in test[:20]:
            assert int(t.answer) == eval(t.meta["expression"])
    wide = load_task("arithmetic", subset="easy", num_operands=5, limit=5)
    assert all(len(t.meta["expression"].split()) == 9 for t in wide)


def test_row_missing_a_field_names_file_line_and_field(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    good = {"question": "1+1?", "answer": "2 #### 2"}
    lines = [json.dumps(good), json.dumps({"question": "2+2?"}), json.dumps(good)]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError) as err:
        load_task("gsm8k", data_dir=tmp_path)
    message = str(err.value)
    assert "test.jsonl" in message and "line 2" in message and "'answer'" in message


def test_unknown_task_subject_and_split_list_valid_names():
    with pytest.raises(TaskError, match="gsm8k.*humaneval"):
        load_task("gsm9k", data_dir=DATA)
    with pytest.raises(TaskError, match="abstract algebra"):
        load_task("mmlu", data_dir=DATA, subset="astrology")
    with pytest.raises(TaskError, match="word_sorting"):
        load_task("bbh", data_dir=DATA, subset="nope")
    with pytest.raises(TaskError, match="train, test"):
        load_task("gsm8k", data_dir=DATA, split="dev")


def test_missing_data_folder_says_where_and_how(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(TaskError) as err:
        load_task("gsm8k", data_dir=missing)
    assert (
        str(missing) in str(err.value)
        and "MLPO_DATA_DIR" in str(err.value)
        and "--data-dir" in str(err.value)
    )


def test_hub_path_fails_fast_offline(monkeypatch):
    monkeypatch.delenv("MLPO_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskError, match="openai/gsm8k"):
        load_task("gsm8k")


def test_registry_names():
    assert set(TASKS) == {
        "arithmetic",
        "gsm8k",
        "math",
        "math500",
        "word_problems",
        "bbh",
        "mmlu",
        "csqa",
        "humaneval",
        "mbpp",
        "code",
    }


def test_arithmetic_id_identifies_the_question_across_overrides():
    plain = load_task("arithmetic", subset="easy", limit=50, seed=0)
    narrow = load_task("arithmetic", subset="easy", limit=30, seed=0, max_value=20, ops="+")
    by_id = {t.id: t.question for t in plain}
    for t in narrow:  # same subset, seed and positions: an id may only repeat with the same question
        assert by_id.get(t.id, t.question) == t.question
    again = load_task("arithmetic", subset="easy", limit=50, seed=7)
    shared = {t.id for t in again} & set(by_id)
    assert all(by_id[i] == next(t.question for t in again if t.id == i) for i in shared)


def test_small_model_levels_match_their_definitions():
    one = load_task("arithmetic", split="train", subset="one_digit", limit=40)
    assert all(e.count("+") == 1 and all(0 <= int(x) <= 9 for x in e.split(" + ")) for e in
               (t.meta["expression"] for t in one))
    two = load_task("arithmetic", subset="two_digit", limit=20)
    assert all(max(map(int, t.meta["expression"].split(" + "))) <= 20 for t in two)
    three = load_task("arithmetic", subset="three_step", limit=20)
    assert all(len(t.meta["expression"].split()) == 5 for t in three)
    assert len(load_task("arithmetic", subset="one_digit")) == 5  # default size: all that exist


def test_too_small_split_says_how_many_exist_and_suggests_a_level():
    with pytest.raises(TaskError, match=r"only 5 distinct.*--limit 5.*--split train.*--subset two_digit"):
        load_task("arithmetic", subset="one_digit", limit=10)
    with pytest.raises(TaskError, match="limit must be >= 0"):
        load_task("arithmetic", limit=-1)


def test_task_options_are_checked_by_name_and_type():
    with pytest.raises(TaskError, match=r"no option 'max_value'; valid options: none"):
        load_task("gsm8k", data_dir=DATA, max_value=3)
    with pytest.raises(TaskError, match=r"max_value='x'.*integer"):
        load_task("arithmetic", max_value="x")


def test_lone_surrogate_in_a_row_is_rejected_naming_task_and_field(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "x\\udc00y", "answer": "#### 2"}\n')
    with pytest.raises(TaskError, match=r"gsm8k/test/0: field 'question'.*surrogate"):
        load_task("gsm8k", data_dir=tmp_path)
