"""Trained LoRA adapters, their whole lifecycle: save and read an adapter folder, check that it fits a base model,
hot-load it into the local engine serving a role and route the role's calls to it.

An adapter folder is plain peft format (`adapter_config.json` + `adapter_model.safetensors`, loadable by
`PeftModel.from_pretrained` and by vLLM's `--lora-modules`) plus `mlpo_adapter.json`, which records the base
model identity (`zoo.base_model_id`) so an adapter is never loaded onto other weights.

- `save(model, folder, base_model)` / `load(folder)`: write an adapter atomically / read its metadata.
- `check_base_model(folder, spec)`: a one-line error naming both models when the adapter was trained on
  another base.
- `role_spec(team, role)`, `hot_load(client, role, folder)`: the engine serving a role, and the adapter loaded
  into it with the role's calls routed to it. The trainers, `mlpo eval --adapter`, `Team.use_adapter` and the
  app's `POST /v1/adapters` all go through `hot_load`.

Core layer: torch, peft and the zoo (which imports torch) are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ADAPTER_META_FILE = "mlpo_adapter.json"


class AdapterMismatchError(ValueError):
    """An adapter trained on one base model was loaded onto another."""


# ------------------------------------------------------------------------------------------- the folder


def save(
    model: Any, folder: str | os.PathLike, base_model: str | None = None, meta: dict[str, Any] | None = None
) -> Path:
    """Write the adapter of `model` (a peft model) to `folder` in peft format, atomically; returns the folder.

    The adapter is written to a temporary sibling folder and renamed into place, so a reader (the engine
    reloading the leader) sees either the old adapter or the new one, never a half-written one. An
    existing folder is moved aside first and removed after the rename (a crash in between leaves the
    old adapter at `<folder>.old-*`). `base_model` defaults to the id recorded by `trainers.lora.attach_lora`.
    """
    base_id = base_model or getattr(model, "mlpo_base_model", None)
    if base_id is None:
        raise ValueError(
            "save_adapter needs base_model (the zoo.base_model_id of the weights under the adapter)"
        )
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        record = {"base_model": base_id, "saved_at": time.time(), "format": "peft-lora", **(meta or {})}
        (tmp / ADAPTER_META_FILE).write_text(json.dumps(record, indent=2))
        old = None
        if target.exists():
            old = target.with_name(f"{target.name}.old-{os.getpid()}-{time.time_ns()}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(folder: str | os.PathLike) -> dict[str, Any]:
    """The metadata `save` recorded in an adapter folder (`base_model`, `saved_at`, `format`, extra keys)."""
    path = Path(folder) / ADAPTER_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_META_FILE}: not an adapter saved by save_adapter")
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or "base_model" not in record:
        raise ValueError(f"{path}: no base_model recorded; not an adapter saved by save_adapter")
    return record


def base_model_of(folder: str | os.PathLike) -> str:
    """The base model id an adapter folder was trained on."""
    return str(load(folder)["base_model"])


def check_base_model(folder: str | os.PathLike, spec: str) -> str:
    """Raise `AdapterMismatchError` unless the adapter in `folder` was trained on the base model of zoo spec
    `spec`; returns that base model id."""
    from mlpo_agents import zoo  # imports torch: not at module import

    trained_on, base = base_model_of(folder), zoo.base_model_id(spec)
    if trained_on != base:
        raise AdapterMismatchError(
            f"adapter {folder} was trained on base model {trained_on!r}, not {base!r} (of {spec!r}); load it onto "
            f"{trained_on!r} or train a new adapter for {base!r}"
        )
    return base


# ------------------------------------------------------------------------------------------- serving


def role_spec(team: Any, role: str, fix: str = "serve every trained role with `local/<spec>`") -> str:
    """The zoo spec of the local engine serving `role` (`local/<spec>`); adapters can only be hot-loaded there."""
    from mlpo_agents.engines import parse_local_model  # the engine imports torch: not at module import

    model = team.deployment(team.role(role).model)["litellm_params"]["model"]
    if not model.startswith("local/"):
        raise ValueError(
            f"role {role!r} is served by {model!r}; trained LoRA adapters are hot-loaded into the local "
            f"engine, so {fix}"
        )
    return parse_local_model(model)[0]


def role_engine(team: Any, role: str) -> Any:
    """The shared local engine serving `role` (with its deployment's engine options, e.g. dtype)."""
    from mlpo_agents.engines import get_engine

    params = team.deployment(team.role(role).model)["litellm_params"]
    return get_engine(role_spec(team, role), **({"dtype": params["dtype"]} if params.get("dtype") else {}))


def hot_load(client: Any, role: str, folder: str | os.PathLike, name: str | None = None) -> str:
    """Hot-load the adapter in `folder` into the local engine serving `role` (after `check_base_model`) as
    `name` (default: the folder's name) and route the role's calls through `client` to it; the calls record
    `name` as their version. Returns the name."""
    team, folder = client.team, Path(folder)
    spec = role_spec(team, role)
    base = check_base_model(folder, spec)
    name = name or folder.name
    params = dict(team.deployment(team.role(role).model)["litellm_params"])
    role_engine(team, role).load_adapter(name, folder)
    client.use_version(role, name, {**params, "model": f"local/{spec}@{name}"}, base_model=base)
    return name
