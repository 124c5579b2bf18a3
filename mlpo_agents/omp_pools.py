"""Give the cores back to the thread that computes: release idle OpenMP thread pools.

torch on Linux runs its parallel CPU kernels on GNU OpenMP (libgomp). Every thread that runs a parallel op
(the main thread converting a model to bf16, LocalEngine's worker decoding, a trainer's update) gets a pool
of its own OpenMP threads, and the pool stays after the work is done. Once the pools hold more threads than
the machine has cores, libgomp stops spinning between parallel regions (its "throttled" wait) and every one
of the few hundred small parallel ops of a decode step pays a futex wake-up instead. Measured on 2 cores:
the engine's decode loop ran at 0.6x (bf16) to 0.8x (fp32) the speed of the same loop in the main thread,
with 1.2 of 2 cores busy, only because the main thread held an idle pool (a single 576x1536 bf16 linear:
39 us in a lone thread, 126 us beside an idle pool).

`release_idle_pool()` frees the calling thread's pool (OpenMP 5.0 `omp_pause_resource_all`); the thread gets
a new one the next time it runs a parallel op. The engine calls it where a thread is about to wait on another
one's computation: in the thread that built the engine, in a thread that submits a request, and in its own
worker before it sleeps (so a trainer's update in the main thread runs at full speed beside an idle engine).
Where no other thread ever ran a parallel op (an fp32 model loaded and only decoded, as `make demo` does) there
is nothing to release and nothing changes; in a training loop the trainer's update gives the main thread a pool
between rollouts, and there the release made MLPO's rollouts 1.63x and its update 1.47x faster (README, MLPO).
A no-op where the OpenMP runtime has no such call (or `MLPO_RELEASE_OMP_POOLS=0`).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_pause: Any = None  # the runtime's omp_pause_resource_all, False when there is none; None until looked up
OMP_PAUSE_SOFT = 1


def _find_pause() -> Any:
    if os.environ.get("MLPO_RELEASE_OMP_POOLS", "1") == "0":
        return False
    import torch

    candidates = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    try:  # the OpenMP runtime this process has loaded (a torch built against another libgomp, conda's, ...)
        maps = Path("/proc/self/maps").read_text()
        candidates += [Path(line.split()[-1]) for line in maps.splitlines() if "libgomp" in line]
    except OSError:
        pass
    for path in candidates:
        try:
            pause = ctypes.CDLL(str(path)).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause
    return False


def release_idle_pool() -> bool:
    """Free the calling thread's idle OpenMP threads; True when the runtime did (or had nothing to free)."""
    global _pause
    if _pause is None:
        with _lock:
            if _pause is None:
                _pause = _find_pause()
    return bool(_pause) and _pause(OMP_PAUSE_SOFT) == 0
