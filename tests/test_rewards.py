"""Answer extraction and rewards, with gold answers and canonical solutions from ../shared/data."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from mlpo_agents.rewards import (
    answer_prompt,
    extract_answer,
    format_reward,
    match_choice,
    math_equal,
    score,
    score_detail,
)
from mlpo_agents.tasks import Task, load_task
from tests._commands import DATA  # noqa: E402 - $MLPO_DATA_DIR, else ../shared/data

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="benchmark data folder not found")


def answer(text: str) -> str:
    return f"Let me think.\n<answer>{text}</answer>"


def test_extract_answer():
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("so \\boxed{\\frac{1}{2}} and \\boxed{\\sqrt{x^{2}}}") == "\\sqrt{x^{2}}"
    assert extract_answer("<answer>\\boxed{5}</answer> \\boxed{7}") == "\\boxed{5}"
    assert extract_answer("the answer is 5 but then I kept going\nand said 7") is None  # not at the end
    assert extract_answer("\\boxed{unbalanced") is None


def test_format_reward():
    assert format_reward("x <answer>5</answer>") == 1.0
    assert format_reward("<answer>5</answer><answer>6</answer>") == 0.0
    assert format_reward("<answer>5") == 0.0
    assert format_reward("<answer>  </answer>") == 0.0
    assert format_reward("\\boxed{5}") == 0.0


def test_math_numbers_fast_path():
    assert math_equal("1000", "1,000") and math_equal("3", "3.0") and math_equal("18", "$18")
    assert math_equal("-7", "-7.") and not math_equal("1000", "100")
    task = Task("t/0", "q", "1000", "math", {})
    assert score(task, answer("1,000")) == 1.0
    assert score(task, answer("999")) == 0.0
    assert score_detail(task, "no tags").reason == "no_answer"


def test_math_latex_via_math_verify():
    assert math_equal("\\dfrac{9}{7}", "9/7")
    assert math_equal("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})")
    assert math_equal("18", "18 dollars")
    assert not math_equal("\\frac{9}{7}", "\\frac{7}{9}")


@needs_data
def test_math_gold_right_and_wrong():
    for name in ("gsm8k", "math500", "math"):
        tasks = load_task(name, data_dir=DATA, limit=15, seed=1)
        for t in tasks:
            assert score_detail(t, answer(t.answer)).reason == "correct", t.id
        wrong = score_detail(tasks[0], answer("123456789"))
        assert wrong.value == 0.0 and wrong.reason == "wrong"


@needs_data
def test_arithmetic_rewards():
    t = load_task("arithmetic", subset="hard", limit=1)[0]
    assert score(t, f"\\boxed{{{t.answer}}}") == 1.0
    assert score(t, answer(str(int(t.answer) + 1))) == 0.0


def test_match_choice_forms():
    options = {"A": "bank", "B": "library", "C": "department store", "D": "mall", "E": "new york"}
    for text in ("B", "(B)", "B)", "B. library", "B: library", "\\text{(B)}", "\\boxed{B}", "the answer is B",
                 "The answer is (B).", "library", "Library."):  # fmt: skip
        assert match_choice(text, options) == "B", text
    assert match_choice("A cat", options) is None
    assert match_choice("F", options) is None


@needs_data
def test_choice_rewards():
    for name in ("mmlu", "csqa"):
        for t in load_task(name, data_dir=DATA, limit=10, seed=2):
            letter = t.answer
            assert score(t, answer(letter)) == 1.0
            assert score(t, answer(f"({letter}) {t.meta['options'][letter]}")) == 1.0
            assert score(t, answer(t.meta["options"][letter])) == 1.0
            other = next(
                x
                for x in t.meta["options"]
                if x != letter and t.meta["options"][x] != t.meta["options"][letter]
            )
            assert score_detail(t, answer(other)).reason == "wrong"


@needs_data
@pytest.mark.parametrize(
    ("subset", "right", "wrong"),
    [
        ("boolean_expressions", None, "Maybe"),
        ("sports_understanding", None, "perhaps"),
        ("formal_fallacies", None, "neither"),
        ("object_counting", None, "1000"),
        ("multistep_arithmetic_two", None, "0.5"),
        ("dyck_languages", None, "( ( ("),
        ("word_sorting", None, "zzz aaa"),
        ("date_understanding", None, "(Z)"),
    ],
)
def test_bbh_exact_gold_and_variants(subset, right, wrong):
    for t in load_task("bbh", data_dir=DATA, subset=subset, limit=10, seed=0):
        assert score(t, answer(t.answer)) == 1.0, t.id
        assert score(t, answer(wrong)) == 0.0, t.id


@needs_data
def test_bbh_normalisation():
    tasks = {}
    for t in load_task("bbh", data_dir=DATA):
        tasks.setdefault(t.meta["subset"], t)
    shapes = tasks["geometric_shapes"]  # target (B) heptagon
    for text in ("B", "(B)", "B)", "heptagon", "(B) heptagon"):
        assert score(shapes, answer(text)) == 1.0, text
    boolean = tasks["boolean_expressions"]  # target False
    assert score(boolean, answer("false")) == 1.0 and score(boolean, answer("True")) == 0.0
    fallacy = next(
        t for t in load_task("bbh", data_dir=DATA, subset="formal_fallacies") if t.answer == "valid"
    )
    assert score(fallacy, answer("invalid")) == 0.0 and score(fallacy, answer("Valid.")) == 1.0
    dyck = next(t for t in load_task("bbh", data_dir=DATA, subset="dyck_languages") if t.answer == "] ]")
    assert score(dyck, answer("]]")) == 1.0 and score(dyck, answer("] ] ]")) == 0.0
    words = next(
        t for t in load_task("bbh", data_dir=DATA, subset="word_sorting") if t.answer == "syndrome therefrom"
    )
    assert (
        score(words, answer("syndrome, therefrom")) == 1.0
        and score(words, answer("therefrom syndrome")) == 0.0
    )
    monsters = next(
        t
        for t in load_task("bbh", data_dir=DATA, subset="movie_recommendation")
        if t.answer == "Monsters, Inc"
    )
    assert score(monsters, answer("Monsters, Inc")) == 1.0 and score(monsters, answer("(C)")) == 0.0


@needs_data
def test_code_canonical_solutions_pass_and_wrong_ones_fail():
    humaneval = load_task("humaneval", data_dir=DATA, limit=3, seed=0)
    mbpp = load_task("mbpp", data_dir=DATA, limit=3, seed=0)
    for t in humaneval:
        body = t.meta["canonical_solution"]
        assert score_detail(t, answer(body)).reason == "correct", t.id  # body continues the prompt
        full = t.meta["prompt"] + body
        assert score(t, f"Here:\n```python\n{full}```") == 1.0, t.id  # fenced full function
    for t in mbpp:
        assert score_detail(t, answer(t.meta["canonical_solution"])).reason == "correct", t.id
    he, mb = humaneval[0], mbpp[0]
    stub = f"def {he.meta['entry_point']}(*args):\n    return None\n"
    assert score_detail(he, answer(stub)).reason == "wrong"
    wrong_mbpp = f"def {mb.meta['entry_point']}(*args):\n    return None\n"
    assert score_detail(mb, answer(wrong_mbpp)).reason == "wrong"
    crash = score_detail(mb, answer("def broken(:\n"))
    assert crash.value == 0.0 and crash.reason.startswith("error: ") and "SyntaxError" in crash.reason
    assert score_detail(mb, "no code here").reason == "no_answer"


@needs_data
def test_code_timeout_is_reported():
    t = load_task("mbpp", data_dir=DATA, limit=1)[0]
    slow = Task(t.id, t.question, t.answer, t.kind, {**t.meta, "timeout_s": 1.0})
    result = score_detail(slow, answer("while True:\n    pass\n"))
    assert result.value == 0.0 and result.reason == "timeout"


@needs_data
def test_score_is_thread_safe():
    tasks = load_task("math500", data_dir=DATA, limit=24, seed=5)
    completions = [answer(t.answer) if i % 2 else answer("\\frac{1}{12345}") for i, t in enumerate(tasks)]
    serial = [score(t, c) for t, c in zip(tasks, completions, strict=True)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(score, tasks, completions))
    assert threaded == serial and sum(serial) == 12


def test_answer_prompt_and_unknown_kind():
    assert "<answer>" in answer_prompt(Task("x", "q", "1", "math", {}))
    assert "letter" in answer_prompt(Task("x", "q", "A", "choice", {}))
    assert "has_close" in answer_prompt(Task("x", "q", "", "code", {"entry_point": "has_close"}))
    assert "False" not in answer_prompt(Task("x", "q", "no", "exact", {"match": "label"}))
    with pytest.raises(ValueError, match="unknown task kind"):
        score(Task("x", "q", "1", "essay", {}), answer("1"))


def test_lenient_extraction_for_models_that_ignore_the_format():
    # text -> (strict, lenient): strict reads closed blocks, \boxed{} and a final-answer phrase at the end.
    cases = {
        "The correct option is B. Reflection.": (None, "B. Reflection"),
        "so 3+4 = 7 and 7*2 = 14 apples": (None, "14"),
        "The answer is 42 apples.": ("42", "42"),
        "<answer>17": (None, "17"),
        "Answer: \\frac{3}{4}": ("\\frac{3}{4}", "\\frac{3}{4}"),
        "total 1,234 dollars.": (None, "1,234"),
        "nothing here": (None, None),
    }
    for text, (strict, lenient) in cases.items():
        assert extract_answer(text, lenient=True) == lenient, text
        assert extract_answer(text) == strict, text
    assert extract_answer("<answer>5</answer> but 7", lenient=True) == "5"
    mc = Task(id="m", question="q", answer="B", kind="choice", meta={"options": {"A": "Fire", "B": "Reflection"}})
    assert score(mc, "The correct option is B. Reflection.") == 0.0  # strict: no answer given
    assert score_detail(mc, "The correct option is B. Reflection.", lenient=True).value == 1.0
    assert format_reward("The correct option is B. Reflection.") == 0.0
