"""Fused CPU kernels for the in-process engine, compiled from `kernels.cpp` on first use.

A decode step of a small model is hundreds of tiny ops a layer pays dispatch and thread wake-ups for, and an
attention that reads every padding column of a left-padded batch. `kernels.cpp` has what `fast_decode.FastDecoder`
calls instead: RMSNorm, the residual add fused with the next RMSNorm, SiLU-gate times up, the rotary embedding
fused with the q/k/v split (keys and values written straight into the KV cache's buffer), and decode attention
over each row's real columns only; and, for every engine, the sampler (`sampling.sample_tokens`) and the KV
cache's row moves (`kv_cache.keep_cache_rows`). They round where torch rounds, so bf16 outputs match the
op-by-op path's within summation order; `tests/test_kernels.py` pins each against torch.

Compiled with the machine's C++ compiler by `torch.utils.cpp_extension` (ninja, a dependency) the first time an
engine needs them (~30 s), then loaded from torch's extension cache (`TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`, one build per CPU type: they are compiled for the machine's own instruction set,
AVX-512 paths included where it has them). Without a compiler, or with `MLPO_ENGINE_KERNELS=0`, `load()` returns
None and the callers keep their torch ops (a warning says why).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
_state: dict[str, Any] = {}


def enabled() -> bool:
    return os.environ.get("MLPO_ENGINE_KERNELS", "1") != "0"


def load() -> Any | None:
    """The compiled kernels module, or None when turned off or when they cannot be built (logged once)."""
    if not enabled():
        return None
    if "module" in _state:  # the per-step callers (sampler, cache row moves) take no lock once it is decided
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def _cpu_tag() -> str:
    """A short tag of this CPU's instruction-set flags: the kernels are built with `-march=native`, so a build
    cached by another machine sharing the home directory is never loaded on one that lacks its instructions."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.machine()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _build() -> Any | None:
    try:
        from torch.utils.cpp_extension import load as compile_extension

        log.info("loading the fast-decode kernels (compiled once per machine into torch's extension cache)")
        return compile_extension(
            name=f"mlpo_kernels_{_cpu_tag()}",
            sources=[str(SOURCE)],
            # reassociation lets the dot products' sums vectorise; NaN and inf keep their IEEE meaning
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                          "-fno-signed-zeros", "-fassociative-math"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: the torch ops still work
        log.warning(
            "fast-decode kernels unavailable (%s: %s); decoding with torch ops instead. Install a C++ compiler "
            "(gcc / g++) to build them, or set MLPO_ENGINE_KERNELS=0 to skip this.",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
        return None
