"""Hostile programs in the sandbox: each is contained and reported, never crashing the caller."""

from __future__ import annotations

import os
import time
import uuid

from mlpo_agents.sandbox import run_program


def test_ok_and_failing_programs():
    ok = run_program("print('hello')")
    assert ok.passed and ok.returncode == 0 and ok.stdout == "hello\n" and ok.reason == "passed"
    bad = run_program("assert 1 == 2, 'nope'")
    assert not bad.passed and bad.returncode == 1 and "AssertionError: nope" in bad.reason
    assert "Traceback" in bad.stderr


def test_runs_in_a_fresh_folder_that_is_removed():
    result = run_program(
        "import os\nprint(os.getcwd())\nprint(os.environ['HOME'], os.environ['TMPDIR'])\nopen('f.txt', 'w').write('x')"
    )
    assert result.passed
    cwd, home = result.stdout.split("\n")[:2]
    assert home.split() == [cwd, cwd] or home.split()[0] == "/tmp"
    leftovers = [p for p in os.listdir("/tmp") if p.startswith("mlpo-sandbox-")]
    assert not any(os.path.exists(os.path.join("/tmp", p, "f.txt")) for p in leftovers)


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and not result.passed and result.reason == "timeout after 1s"
    assert time.monotonic() - start < 5


def test_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    result = run_program("while True:\n    pass\n", timeout_s=10.0, cpu_s=1)
    assert not result.passed and not result.timed_out and "SIGXCPU" in result.reason


def test_fork_bomb_is_contained_and_cleaned_up():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run_program(bomb, timeout_s=1.5)
    assert not result.passed and time.monotonic() - start < 10
    assert result.timed_out or "BlockingIOError" in result.stderr or result.returncode != 0


def test_escaped_children_are_killed():
    marker = f"mlpo-escape-{uuid.uuid4().hex}"
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(300)', '{marker}'])\n"
    )
    result = run_program(code)
    assert result.passed
    time.sleep(0.2)
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if marker.encode() in cmdline:
            alive.append(pid)
    if "uid" in result.isolation:
        assert not alive
    else:  # without a throwaway uid a child that left the process group survives; record it
        for pid in alive:
            os.kill(int(pid), 9)


def test_huge_allocation_fails_cleanly():
    result = run_program("x = bytearray(4 * 1024**3)\nprint(len(x))", memory_mb=512)
    assert not result.passed and ("MemoryError" in result.reason or "SIGKILL" in result.reason)


def test_write_outside_the_work_folder_does_not_land():
    target = f"/tmp/outside-{uuid.uuid4().hex}"
    result = run_program(f"open({target!r}, 'w').write('x')\n")
    assert not os.path.exists(target), result
    assert "mountns" in result.isolation or not result.passed


def test_network_is_unreachable():
    code = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('connected')\n"
    result = run_program(code, timeout_s=5)
    assert "connected" not in result.stdout
    if "netns" not in result.isolation:
        assert result.unavailable  # network isolation was refused: it must be recorded


def test_output_is_truncated():
    result = run_program("print('x' * 100_000)")
    assert result.passed and len(result.stdout) < 5000 and result.stdout.endswith("[truncated]")
