"""Trained LoRA adapters on the local engine: which engine spec serves a role, and hot-loading an adapter
into it with the role's calls routed to it. `Team.use_adapter` and the trainers use these."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def role_spec(team: Any, role: str, fix: str = "serve every trained role with `local/<spec>`") -> str:
    """The zoo spec of the local engine serving `role` (`local/<spec>`); adapters can only be hot-loaded there."""
    from mlpo_agents.engine import parse_local_model  # the engine imports torch: not at module import

    model = team.deployment(team.role(role).model)["litellm_params"]["model"]
    if not model.startswith("local/"):
        raise ValueError(
            f"role {role!r} is served by {model!r}; trained LoRA adapters are hot-loaded into the local "
            f"engine, so {fix}"
        )
    return parse_local_model(model)[0]


def serve_adapter(
    client: Any, engine: Any, role: str, name: str, folder: Path, spec: str, base_model: str
) -> None:
    """Hot-load the adapter in `folder` into `engine` as `name` and route `role`'s calls to it."""
    engine.load_adapter(name, folder)
    client.use_version(role, name, {"model": f"local/{spec}@{name}"}, base_model=base_model)
