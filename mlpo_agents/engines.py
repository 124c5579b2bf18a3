"""The shared in-process engines: one `LocalEngine` per (model spec, dtype), created on first use and
reused by every role, trainer and server that names it (`local/<spec>[@<adapter>]`)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from mlpo_agents import zoo
from mlpo_agents.engine import LocalEngine

_engines: dict[tuple[str, str], LocalEngine] = {}
_engines_lock = threading.Lock()


def get_engine(spec: str, dtype: str | None = None, **options: Any) -> LocalEngine:
    """The shared engine for (spec, dtype); created on first use. dtype defaults to env MLPO_ENGINE_DTYPE."""
    dtype = dtype or os.environ.get("MLPO_ENGINE_DTYPE", "float32")
    key = (zoo.canonical_spec(spec), str(zoo.torch_dtype(dtype)))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None or engine._closed:
            engine = _engines[key] = LocalEngine(spec, dtype=dtype, **options)
        return engine


def fastest_cpu_dtype() -> str:
    """"bfloat16" where this CPU has native bf16 matmul kernels (oneDNN with AMX or AVX-512 BF16: there the
    engine runs 2.4-4.2x faster in bf16 than in fp32, README "Benchmarks"), else "float32" (bf16 emulated
    in software would be slower than fp32)."""
    import torch

    from mlpo_agents.packed_linear import can_pack

    return "bfloat16" if can_pack(torch.bfloat16, torch.device("cpu")) else "float32"


def run_dtype(asked: str, out: Path, resume: bool) -> str:
    """A learning run's engine dtype (`--dtype` of the examples), recorded in `<out>/engine.json`.

    `auto` is, when resuming, the dtype the run's first stage recorded (float32 for a run from before the
    record: the engine's default then), else `fastest_cpu_dtype()`. An explicit dtype is taken as asked.
    """
    record = out / "engine.json"
    if asked != "auto":
        dtype = asked
    elif resume and record.exists():
        dtype = str(json.loads(record.read_text())["dtype"])
    elif resume and (out / "config.json").exists():  # a first stage from before the record
        dtype = "float32"
    else:
        dtype = fastest_cpu_dtype()
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"dtype": dtype}) + "\n")
    return dtype


def close_engines() -> None:
    """Close every shared engine."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()


def parse_local_model(model: str) -> tuple[str, str | None]:
    """'local/tiny-test@v3' or 'tiny-test@v3' -> ('tiny-test', 'v3'); no '@' -> (spec, None)."""
    if model.startswith("local/"):
        model = model[len("local/") :]
    spec, _, adapter = model.partition("@")
    return spec, adapter or None
