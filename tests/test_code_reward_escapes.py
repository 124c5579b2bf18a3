"""Code rewards cannot be gamed: a pass means the judge ran every test and each one passed.

Each "escape" below is a wrong solution plus a trick. All but three scored 1.0 when the reward
trusted the exit status of one process running solution and tests together (checked against that
harness): killing the judge and the last two attack the judge that replaced it.
"""

from __future__ import annotations

import collections
import json
import os

import pytest

from mlpo_agents import judge, sandbox
from mlpo_agents.judge import run_tests
from mlpo_agents.rewards import REWARD_FAILED, RewardResult, build_program, score_detail
from mlpo_agents.tasks import Task, load_task
from tests._commands import DATA  # noqa: E402 - $MLPO_DATA_DIR, else ../shared/data

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="benchmark data folder not found")

HUMANEVAL = Task(
    id="escape/humaneval",
    question="halve",
    answer="",
    kind="code",
    meta={
        "style": "humaneval",
        "entry_point": "halve",
        "prompt": (
            "def double(x: float) -> float:\n"
            "    return 2 * x\n\n\n"
            "def halve(x: float) -> float:\n"
            '    """Return x / 2, so that double(halve(x)) == x."""\n'
        ),
        "tests": (
            "def check(candidate):\n"
            "    assert candidate(3) == 1.5\n"
            "    assert abs(candidate(-4) + 2) < 1e-9\n"
            "    for x in (1, 7, 10):\n"
            "        assert double(candidate(x)) == x\n"
        ),
    },
)
MBPP = Task(
    id="escape/mbpp",
    question="halve",
    answer="",
    kind="code",
    meta={
        "style": "mbpp",
        "entry_point": "halve",
        "tests": [
            "assert halve(3) == 1.5",
            "assert abs(halve(-4) + 2) < 1e-9",
            "assert math.isclose(halve(1), 0.5)",
        ],
        "test_imports": ["import math"],
    },
)
TASKS = {"humaneval": HUMANEVAL, "mbpp": MBPP}

WRONG = "def halve(x):\n    return 0\n"

ESCAPES = {
    "sys.exit(0) at module level": "import sys\n" + WRONG + "sys.exit(0)\n",
    "os._exit(0) at module level": "import os\n" + WRONG + "os._exit(0)\n",
    "raise SystemExit at module level": WRONG + "raise SystemExit\n",
    "raise SystemExit(0) in the function": "def halve(x):\n    raise SystemExit(0)\n",
    "sys.exit(0) in the function": "import sys\n\ndef halve(x):\n    sys.exit(0)\n",
    "os._exit(0) in the function": "import os\n\ndef halve(x):\n    os._exit(0)\n",
    "sys.excepthook swallows the AssertionError": (
        "import os, sys\nsys.excepthook = lambda *args: os._exit(0)\n" + WRONG
    ),
    "atexit hook forces status 0": "import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG,
    "stdout redirected, fake success printed": (
        "import atexit, io, os, sys\n"
        "print('passed')\nprint('all tests passed', file=sys.stderr)\n"
        "sys.stdout = io.StringIO()\nsys.stderr = io.StringIO()\n"
        "atexit.register(lambda: os._exit(0))\n" + WRONG
    ),
    "signal handler exits 0 on a self-sent signal": (
        "import os, signal\n"
        "signal.signal(signal.SIGUSR1, lambda *args: os._exit(0))\n\n"
        "def halve(x):\n    os.kill(os.getpid(), signal.SIGUSR1)\n"
    ),
    "alarm fires during the tests": (
        "import os, signal, time\n"
        "signal.signal(signal.SIGALRM, lambda *args: os._exit(0))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.01)\n\n"
        "def halve(x):\n    time.sleep(1)\n"
    ),
    "profiler replaces the checker when it is called": (
        "import os, sys\n"
        "sys.setprofile(lambda frame, event, arg: os._exit(0) if event == 'call' and "
        "frame.f_code.co_name in ('check', 'halve') else None)\n" + WRONG
    ),
    "tracer skips the failing assert lines": (
        "import os, sys\n"
        "def _trace(frame, event, arg):\n"
        "    if event == 'exception' and issubclass(arg[0], AssertionError):\n"
        "        os._exit(0)\n"
        "    return _trace\n"
        "sys.settrace(_trace)\nsys._getframe().f_trace = _trace\n" + WRONG
    ),
    "builtins and library functions tampered": (
        "import builtins, math\n"
        "builtins.abs = lambda x: 0\nmath.isclose = lambda *args, **kwargs: True\n"
        "_answers = iter([1.5, 1.5, 0.5, 0.5, 3.5, 5])\n\n"
        "def halve(x):\n    return 1.5\n"
    ),
    "names the tests use shadowed in the shared namespace": (
        "abs = lambda x: 0\n\n"
        "class _Math:\n    isclose = staticmethod(lambda *args, **kwargs: True)\n\n"
        "math = _Math()\n\n"
        "def double(x):\n    return next(_answers)\n\n"
        "_answers = iter([1, 7, 10])\n\n"
        "def halve(x):\n    return 1.5\n"
    ),
    "returns an object equal to everything": (
        "class _Any:\n"
        "    __eq__ = lambda self, other: True\n"
        "    __add__ = __radd__ = __mul__ = __rmul__ = lambda self, other: self\n"
        "    __abs__ = lambda self: 0\n"
        "    __float__ = lambda self: 0.5\n\n"
        "def halve(x):\n    return _Any()\n"
    ),
    "kills the judge": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + WRONG,
    "writes a fake pass line to every descriptor": (
        "import os\n"
        "for fd in range(3, 256):\n"
        "    try:\n"
        "        os.write(fd, b'pass ' + b'0' * 32 + b'\\n')\n"
        "    except OSError:\n"
        "        pass\n" + WRONG
    ),
    "patches the encoder next to it to send a forged object": (
        "import __main__\n__main__._encode = lambda value, depth=0: {'$': 'object', 'v': []}\n" + WRONG
    ),
}


def answer(code: str) -> str:
    return f"<answer>\n{code}</answer>"


@pytest.mark.parametrize("style", TASKS)
def test_a_correct_solution_passes_and_a_wrong_one_is_wrong(style):
    task = TASKS[style]
    assert score_detail(task, answer("def halve(x):\n    return x / 2\n")) == RewardResult(
        1.0, "def halve(x):\n    return x / 2\n", "correct"
    )
    assert score_detail(task, answer("def halve(x):\n    return x / 3\n")).reason == "wrong"
    assert score_detail(task, answer(WRONG)).reason == "wrong"


def test_a_humaneval_body_that_continues_the_prompt_passes():
    assert score_detail(HUMANEVAL, answer("    return x / 2\n")).reason == "correct"


@pytest.mark.parametrize("style", TASKS)
@pytest.mark.parametrize("escape", ESCAPES)
def test_escapes_score_zero_with_a_reason(style, escape):
    result = score_detail(TASKS[style], answer(ESCAPES[escape]))
    assert result.value == 0.0, (escape, result)
    assert result.reason == "wrong" or result.reason.startswith("error: "), result.reason


def test_an_escape_says_what_happened():
    exited = score_detail(MBPP, answer(ESCAPES["sys.exit(0) at module level"]))
    assert exited.reason.startswith("error: ") and "exit" in exited.reason and "before" in exited.reason
    crashed = score_detail(HUMANEVAL, answer("def halve(x):\n    raise ValueError('boom')\n"))
    assert crashed.reason.startswith("error: ValueError: boom"), crashed.reason


def test_the_solution_cannot_reach_the_judge_or_its_token():
    probe = (
        "import os\n"
        "found = []\n"
        "judge = os.getppid()\n"
        "for path in (f'/proc/{judge}/fd', f'/proc/{judge}/environ', f'/proc/{judge}/mem'):\n"
        "    try:\n"
        "        os.listdir(path) if path.endswith('fd') else open(path, 'rb').read(1)\n"
        "        found.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "found += [f for f in os.listdir('/proc/self/fd') if int(f) > 2]\n"
        "print('REACHED', found, dict(os.environ), flush=True)\n\n"
        "def halve(x):\n    return x / 2\n"
    )
    program = build_program(MBPP, probe)
    result = run_tests(program)
    assert result.passed, result
    if os.geteuid() == 0 and "uid" not in result.isolation:
        pytest.skip("the solution ran as root, which may read any process (documented, not defended)")
    reached = next(line for line in result.stdout.splitlines() if line.startswith("REACHED"))
    assert "/mem" not in reached and "/fd" not in reached, reached
    assert "TOKEN" not in reached.upper()


def test_a_sandbox_failure_is_an_error_not_a_zero(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no more processes")

    monkeypatch.setattr(sandbox.subprocess, "Popen", refuse)
    result = score_detail(MBPP, answer("def halve(x):\n    return x / 2\n"))
    assert result.value == 0.0 and result.failed and result.reason.startswith(REWARD_FAILED), result
    assert "sandbox error" in result.reason and "no more processes" in result.reason


@needs_data
def test_canonical_solutions_still_pass():
    mbpp = load_task("mbpp", data_dir=DATA)
    tasks = load_task("humaneval", data_dir=DATA)[:5] + mbpp[:5] + [mbpp[35]]  # 35 returns a Counter
    for task in tasks:
        result = score_detail(task, answer(task.meta["canonical_solution"]))
        assert result.reason == "correct", (task.id, result)


def test_plain_data_crosses_the_pipe_and_nothing_else_does():
    values = [
        None, True, 3, 2.5, float("inf"), "é", b"x", bytearray(b"y"), 1 + 2j, [1, (2, 3)], {1: {"a"}},
        frozenset({1}), range(3), collections.Counter("abca"), collections.OrderedDict(a=1), collections.deque([1]),
    ]  # fmt: skip
    for value in values:
        decoded = judge._decode(json.loads(json.dumps(judge._encode(value))))
        assert decoded == value and type(decoded) is type(value), value
    assert list(judge._decode(judge._encode(iter([1, 2])))) == [1, 2]
    for forged in ({"$": "object", "v": []}, {"$": "tuple", "v": 1}, {"x": 1}, {"$": "dict", "v": [[1]]}):
        with pytest.raises(ValueError):
            judge._decode(forged)
