"""Answer extraction and correctness rewards for every task kind.

``score`` is a plain function ``(Task, completion) -> float``; ``score_detail`` also says why.
Math goes through math-verify (with a fast path for plain numbers) under our own time limit, since
its built-in limits use ``signal.alarm`` and only work in the main thread. Multiple choice has its
own matcher (math-verify does not match ``\\text{(B)}`` to ``B``). Code runs in ``sandbox``.
Thread-safe: nothing here keeps mutable state.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

from .judge import TestedProgram, run_tests

if TYPE_CHECKING:
    from .tasks.base import Task

MATH_TIMEOUT_S = 10.0
REWARD_FAILED = "reward failed:"
"""Prefix of a `RewardResult.reason` when the checker itself failed (timeout, crash), not the answer."""
CODE_TIMEOUT_S = 10.0

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")

# Without timeouts math-verify warns on every call; we enforce the limit ourselves.
logging.getLogger("math_verify.parser").addFilter(lambda r: "Timeout is disabled" not in r.getMessage())
logging.getLogger("math_verify.grader").addFilter(lambda r: "Timeout is disabled" not in r.getMessage())


class TaskKindError(ValueError):
    """A task no reward knows how to score (unknown kind or normalisation): misuse, raised at once."""


@dataclass(frozen=True)
class RewardResult:
    """A reward with the answer it judged and why."""

    value: float
    """1.0 correct, 0.0 otherwise."""
    extracted: str | None
    """The answer (or code) taken from the completion; None when there was none."""
    reason: str
    """``"correct"``, ``"wrong"``, ``"no_answer"``, ``"timeout"`` (the candidate program ran too long),
    ``"error: ..."`` (the candidate program crashed), or ``"reward failed: ..."`` (the checker itself
    failed: see ``failed``)."""

    @property
    def failed(self) -> bool:
        """The reward could not be computed (checker timeout or crash): not a verdict on the answer."""
        return self.reason.startswith(REWARD_FAILED)


# ---------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5": one token up to whitespace or "$"
        match = re.match(r" ([^\s$]+)", text[i:])
        return match.group(1) if match else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced


def extract_answer(text: str, *, lenient: bool = False, truncated: bool = False) -> str | None:
    """The final answer of a completion under the strict rule (``lenient=False``, what trains and is reported).

    The strict rule, in order:
    1. the content of the last closed ``<answer>...</answer>`` block;
    2. else the content of the last balanced ``\\boxed{...}``;
    3. else an explicit final-answer phrase ("The final answer is X", "Answer: X", "the answer is X")
       on the completion's last non-empty line, X taken up to the end of its sentence — unless the
       completion was cut at the token limit (``truncated``): a cut-off phrase may hold a cut-off
       number ("The answer is 4" of "45"), so only closed forms (1, 2) count then.
    Nothing else is an answer: a completion that merely contains numbers has none.

    ``lenient`` adds what evaluation harnesses accept from models that ignore the format: an unclosed
    last ``<answer>``, an answer phrase anywhere, then the last number in the text. It is reported
    only as a separately labelled "lenient" figure; no reward a trainer reads uses it.
    """
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if lenient:
        return _lenient_answer(text)
    return None if truncated else _final_phrase(text)


_OPEN_ANSWER = re.compile(r"<answer>(.+)$", re.DOTALL | re.IGNORECASE)
_ANSWER_PHRASE = re.compile(r"(?:final answer|answer|option)\s*(?:is|:|=)[\s:]*(?:\*\*)?([^\n]+)", re.IGNORECASE)
_FINAL_PHRASE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(?:\*\*)?", re.IGNORECASE)
_NUMBER_THEN_WORDS = re.compile(r"^([+-]?[\d,]*\.?\d+)\s+[A-Za-z]")
_SENTENCE_END = re.compile(r"\.(?=\s|$)")  # a period that is not a decimal point


def _final_phrase(text: str) -> str | None:
    """Strict rule 3: "The final answer is X" on the last non-empty line; X up to its sentence's end."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    phrases = list(_FINAL_PHRASE.finditer(lines[-1]))
    if not phrases:
        return None
    value = lines[-1][phrases[-1].end() :]
    end = _SENTENCE_END.search(value)
    value = (value[: end.start()] if end else value).strip().strip("*").strip()
    number = _NUMBER_THEN_WORDS.match(value)
    return (number.group(1) if number else value) or None


def _lenient_answer(text: str) -> str | None:
    opened = _OPEN_ANSWER.search(text)
    if opened and opened.group(1).strip():
        return opened.group(1).strip()
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        phrase = phrases[-1].strip().strip("*").rstrip(".").strip()
        number = _NUMBER_THEN_WORDS.match(phrase)
        if phrase:
            return number.group(1) if number else phrase
    matches = [*_THOUSANDS.finditer(text), *_NUMBER.finditer(text)]
    if matches:  # the last number; "1,234" wins over the "234" that ends at the same place
        return max(matches, key=lambda m: (m.end(), m.end() - m.start())).group(0).rstrip(".")
    return None


def format_reward(completion_text: str) -> float:
    """1.0 when the completion has exactly one well-formed, non-empty ``<answer>`` block, else 0.0."""
    lowered = completion_text.lower()
    if lowered.count("<answer>") != 1 or lowered.count("</answer>") != 1:
        return 0.0
    blocks = _ANSWER_BLOCK.findall(completion_text)
    return 1.0 if len(blocks) == 1 and blocks[0].strip() else 0.0


def answer_prompt(task: Task) -> str:
    """The instruction appended to a question telling the model how to format its final answer.

    It never shows an example answer: small models copy it (SmolLM2 leaders looped on "The final
    answer is 42" when the instruction said "e.g. <answer>42</answer>"). A test checks that no built-in
    instruction holds a number or an option letter.
    """
    tail = "Think step by step, then give only the final answer inside <answer></answer>"
    if task.kind == "math":
        return f"{tail}, as a number or a simplified expression."
    if task.kind == "choice":
        return f"{tail}, as the letter of the correct option."
    if task.kind == "exact":
        how = {
            "choice": "as the letter of the correct option, in parentheses",
            "label": "as the one word the question asks for, spelled as in the question",
            "number": "as a number",
            "dyck": "as the closing brackets separated by spaces",
            "words": "as the sorted words separated by spaces",
        }.get(task.meta.get("match", "text"), "exactly as the question expects")
        return f"{tail}, {how}."
    if task.kind == "code":
        name = task.meta.get("entry_point")
        what = f"the function `{name}`" if name else "the function"
        return (
            f"Write the complete, self-contained Python code for {what}, with the imports it needs, "
            "inside <answer></answer> (no Markdown fences, no example usage)."
        )
    raise TaskKindError(f"unknown task kind {task.kind!r}; expected math, choice, exact or code.")


# ---------------------------------------------------------------- math


def _plain_number(text: str) -> Decimal | None:
    """``"1,000"``, ``"$3.0"``, ``"-7."``, ``"\\boxed{12}"`` -> Decimal; None when not a plain number."""
    s = text.strip()
    inner = last_boxed(s)
    if inner is not None and s.startswith(("\\boxed", "\\fbox")):
        s = inner.strip()
    s = s.strip("$ ").removeprefix("\\$").removesuffix("\\%").removesuffix("%").strip()
    s = s.rstrip(".") if s.endswith(".") and s.count(".") == 1 and len(s) > 1 else s
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def _math_verify_equal(gold: str, predicted: str) -> bool:
    """math-verify with its signal-based timeouts off (callers may be in worker threads)."""
    from math_verify import parse, verify  # import costs ~0.5 s; only pay it when needed

    no_limit = {"parsing_timeout": None}
    gold_parsed = parse(f"\\boxed{{{gold}}}", **no_limit)
    if not gold_parsed:
        gold_parsed = parse(gold, **no_limit)
    for candidate in (f"\\boxed{{{predicted}}}", predicted):
        parsed = parse(candidate, **no_limit)
        if parsed and verify(gold_parsed, parsed, timeout_seconds=None):
            return True
    return False


def math_equal(gold: str, predicted: str, *, timeout_s: float = MATH_TIMEOUT_S) -> bool | None:
    """Whether two math answers agree: numbers compare as numbers, else math-verify; None on timeout."""
    gold_number, predicted_number = _plain_number(gold), _plain_number(predicted)
    if gold_number is not None and predicted_number is not None:
        return gold_number == predicted_number
    outcome: list[bool | BaseException] = []

    def work() -> None:
        try:
            outcome.append(_math_verify_equal(gold, predicted))
        except BaseException as e:  # handed to the caller's thread below
            outcome.append(e)

    # A daemon thread we can abandon: sympy cannot be interrupted, but the caller must not hang.
    worker = threading.Thread(target=work, name="math-verify", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        return None
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


# ---------------------------------------------------------------- multiple choice and exact match


def _norm_text(text: str) -> str:
    """Lower case, ``\\text{}`` unwrapped, outer ``$``/quotes/trailing period removed, spaces collapsed."""
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", text)
    s = s.strip().strip("$").strip()
    s = s.strip("\"'`").strip()
    s = s.rstrip(".").strip()
    return " ".join(s.lower().split())


def match_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter ``answer`` names, or None.

    Accepts ``B``, ``(B)``, ``B)``, ``B. text``, ``B: text``, ``\\text{(B)}``, ``\\boxed{B}``,
    ``the answer is B``, or the exact text of one option.
    """
    letters = "".join(options) or "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    boxed = last_boxed(answer)
    s = boxed if boxed is not None else answer
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", s).strip().strip("$*").strip()
    # "(B) ..." may be followed by anything; a bare "B" only by ".", ":", ")" or the end ("A cat" is text).
    lead = re.match(rf"^(?:\(([{letters}])\)|([{letters}])(?=[.:)]|$))", s)
    if lead:
        return lead.group(1) or lead.group(2)
    normalised = _norm_text(s)
    for letter, text in options.items():
        if _norm_text(text) == normalised:
            return letter
    phrase = re.search(
        rf"(?:answer|option|choice)\s*(?:is|:)?\s*(?:option\s*)?\(?([{letters}])\)?(?![A-Za-z])",
        s,
        re.IGNORECASE,
    )
    if phrase and phrase.group(1).upper() in letters:
        return phrase.group(1).upper()
    return None


def exact_match(task: Task, answer: str) -> bool:
    """BBH-style exact match with the normalisation named by ``task.meta["match"]``."""
    how = task.meta.get("match", "text")
    gold = task.answer
    if how == "choice":
        options = task.meta.get("options", {})
        gold_letter = task.meta.get("gold_letter")
        if gold_letter is not None:
            return match_choice(answer, options) == gold_letter
        return _norm_text(answer) == _norm_text(gold)
    if how == "number":
        gold_number, predicted = _plain_number(gold), _plain_number(answer)
        return gold_number is not None and gold_number == predicted
    if how == "dyck":
        return re.sub(r"\s+", "", _strip_wrappers(answer)) == re.sub(r"\s+", "", gold)
    if how == "words":
        return _strip_wrappers(answer).lower().replace(",", " ").split() == gold.lower().split()
    if how in ("label", "text"):
        return _norm_text(answer) == _norm_text(gold)
    raise TaskKindError(f"unknown exact-match normalisation {how!r} on task {task.id}.")


def _strip_wrappers(text: str) -> str:
    """Remove ``\\text{}``, surrounding ``$`` and quotes, without touching brackets or case."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", text).strip().strip("$").strip()
    return s.strip("\"'`").strip().rstrip(".")


# ---------------------------------------------------------------- code


def extract_code(text: str) -> str | None:
    """The program in a completion: the ``<answer>`` block (fences inside removed), else the last fence."""
    blocks = _ANSWER_BLOCK.findall(text)
    body = blocks[-1] if blocks else None
    if body is None:
        fences = _FENCE.findall(text)
        body = fences[-1] if fences else ""
        return body.strip("\n") + "\n" if body.strip() else None
    fenced = _FENCE.findall(body)
    code = fenced[-1] if fenced else body
    return code.strip("\n") + "\n" if code.strip() else None


def build_program(task: Task, code: str) -> TestedProgram:
    """The solution and the task's tests, for ``run_tests``: the tests run in the judge, not beside the code."""
    style = task.meta.get("style")
    entry = task.meta.get("entry_point")
    if not entry:
        raise ValueError(f"code task {task.id} has no meta['entry_point']; the tests need a function to call.")
    if style == "humaneval":
        prompt = task.meta["prompt"]
        # A full definition is appended after the prompt (keeping its imports and helpers);
        # a bare body continues the prompt's signature.
        defines = re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE)
        solution = prompt + "\n" + code if defines else prompt + code
        # The judge runs the prompt too, so the tests use its helpers, not the solution's redefinitions.
        return TestedProgram(solution, f"{task.meta['tests']}\n\ncheck({entry})\n", (entry,), setup=prompt)
    if style == "mbpp":
        imports = "\n".join(task.meta.get("test_imports", []))
        tests = "\n".join(task.meta["tests"])
        return TestedProgram(f"{imports}\n{code}", tests + "\n", (entry,), setup=imports)
    raise ValueError(f"code task {task.id} has meta['style']={style!r}; expected 'humaneval' or 'mbpp'.")


def _score_code(task: Task, completion_text: str) -> RewardResult:
    code = extract_code(completion_text)
    if code is None:
        return RewardResult(0.0, None, "no_answer")
    result = run_tests(build_program(task, code), timeout_s=task.meta.get("timeout_s", CODE_TIMEOUT_S))
    if result.passed:  # the judge saw every test pass; nothing the solution does can fake this
        return RewardResult(1.0, code, "correct")
    if result.timed_out:
        return RewardResult(0.0, code, "timeout")
    if result.reason.startswith("sandbox error"):
        return RewardResult(0.0, code, f"{REWARD_FAILED} {result.reason}")
    if result.reason.startswith("AssertionError"):
        return RewardResult(0.0, code, "wrong")
    return RewardResult(0.0, code, f"error: {result.reason}")


# ---------------------------------------------------------------- entry points


def score_detail(
    task: Task, completion_text: str, *, truncated: bool = False, lenient: bool = False
) -> RewardResult:
    """Correctness of ``completion_text`` for ``task`` with the extracted answer and the reason.

    The answer is read with the strict rule (`extract_answer`) unless ``lenient``; ``truncated`` says the
    completion was cut at the token limit. When the checker itself fails (math-verify times out or
    raises, the sandbox breaks) the result says so (`RewardResult.failed`): a failed reward is not a
    wrong answer, and trainers leave such rows out instead of learning from a 0.
    """
    try:
        return _score(task, completion_text, truncated=truncated, lenient=lenient)
    except TaskKindError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded with its reason, never a silent 0
        return RewardResult(0.0, None, f"{REWARD_FAILED} {type(e).__name__}: {e}"[:500])


def _score(task: Task, completion_text: str, *, truncated: bool, lenient: bool) -> RewardResult:
    if task.kind == "code":
        return _score_code(task, completion_text)
    extracted = extract_answer(completion_text, lenient=lenient, truncated=truncated)
    if extracted is None or not extracted.strip():
        return RewardResult(0.0, extracted, "no_answer")
    if task.kind == "math":
        equal = math_equal(task.answer, extracted)
        if equal is None:
            return RewardResult(0.0, extracted, f"{REWARD_FAILED} math-verify timed out after {MATH_TIMEOUT_S:g} s")
    elif task.kind == "choice":
        equal = match_choice(extracted, task.meta.get("options", {})) == task.answer.strip()
    elif task.kind == "exact":
        equal = exact_match(task, extracted)
    else:
        raise TaskKindError(
            f"unknown task kind {task.kind!r} on task {task.id}; expected math, choice, exact or code."
        )
    return RewardResult(1.0, extracted, "correct") if equal else RewardResult(0.0, extracted, "wrong")


def score(task: Task, completion_text: str, *, truncated: bool = False) -> float:
    """1.0 when the completion answers ``task`` correctly (strict rule), else 0.0 (``score_detail`` says why)."""
    return score_detail(task, completion_text, truncated=truncated).value
