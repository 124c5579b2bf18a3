"""Idle OpenMP pools are released: the thread that computes keeps the cores (see mlpo_agents/omp_pools.py).

Speed is the benchmarks' business (`benchmarks/profile_engine.py --compare-worker`); these tests pin the
mechanism: a thread's pool threads really go away, and the engine releases pools where it promises to.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from mlpo_agents import omp_pools
from mlpo_agents.engine import LocalEngine

# Counts the process's OS threads around one parallel op and one release, in a fresh interpreter.
SCRIPT = """
import os, time, torch
from mlpo_agents.omp_pools import release_idle_pool

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(2)
a = torch.randn(256, 256)
before = threads()
(a @ a).sum()  # a parallel op: this thread gets a pool of OpenMP threads, which stays
with_pool = threads()
released = release_idle_pool()
for _ in range(200):  # the pool's threads exit on their own, just after the release returns
    if threads() < with_pool:
        break
    time.sleep(0.01)
print(before, with_pool, threads(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc (GNU OpenMP)")
def test_release_frees_the_calling_threads_openmp_threads():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    before, with_pool, after, released = out.stdout.split()
    assert released == "True"
    assert int(with_pool) > int(before), "the parallel op should have started OpenMP threads"
    assert int(after) == int(before)


def test_release_is_a_no_op_when_turned_off(monkeypatch):
    monkeypatch.setenv("MLPO_RELEASE_OMP_POOLS", "0")
    monkeypatch.setattr(omp_pools, "_pause", None)
    assert omp_pools.release_idle_pool() is False
    monkeypatch.setattr(omp_pools, "_pause", None)  # looked up again by the next caller


def test_engine_releases_the_builders_the_callers_and_its_own_idle_pool(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(
        "mlpo_agents.engine.release_idle_pool", lambda: calls.append(threading.current_thread().name)
    )
    engine = LocalEngine("tiny-test", max_batch_size=4)
    try:
        here = threading.current_thread().name
        assert here in calls  # built here: this thread loaded the model
        calls.clear()
        caller = threading.Thread(
            target=lambda: engine.generate([{"role": "user", "content": "hi"}], max_tokens=3), name="caller"
        )
        caller.start()
        caller.join()
        assert "caller" in calls  # the caller waits on the worker
        for _ in range(100):  # the worker goes idle once the request is done
            if engine._thread.name in calls:
                break
            time.sleep(0.01)
        assert engine._thread.name in calls
    finally:
        engine.close()
