"""Team configuration: topology, its parameters, and a litellm deployment for every role.

A team YAML maps one to one onto `TeamConfig`. `model_list` and `router_settings` use litellm's own
format, so a litellm proxy config can be pasted in unchanged.

```yaml
name: default
topology: leader_peers
params: {peers: 3, rounds: 1}
model_list:
  - model_name: smollm2
    litellm_params: {model: local/smollm2-135m}
router_settings: {num_retries: 2, timeout: 300}
roles:
  leader: {model: smollm2, trainable: true, sampling: {temperature: 0.7, max_tokens: 256}}
  peer:   {model: smollm2, sampling: {temperature: 1.0, max_tokens: 192}}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A team config that cannot be used; the message names the file, the key and the fix."""


class Sampling(BaseModel):
    """Sampling parameters for one role; every field maps to the OpenAI / litellm argument of that name."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    temperature: float = Field(0.7, ge=0.0, le=5.0)
    """Softmax temperature; 0 is greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_tokens: int = Field(256, ge=1, le=32768)
    """Most completion tokens per sample."""
    stop: list[str] | None = None
    """Stop strings; the completion ends before the first one."""
    seed: int | None = None
    """Sampling seed for reproducible draws (engines that support it). Each call of a team's graph samples
    with this seed mixed with the agent, the question and the round (`graphs.nodes.call_seed`)."""
    n: int = Field(1, ge=1, le=256)
    """Samples per call sharing one prompt and one group id (the GRPO group size at trainable nodes)."""

    def as_kwargs(self) -> dict[str, Any]:
        """The litellm keyword arguments, without unset optional values."""
        out = self.model_dump(exclude_none=True)
        return out


class RoleConfig(BaseModel):
    """Which deployment plays a role, how it samples, and whether it is trained."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str
    """A `model_name` from `model_list`."""
    sampling: Sampling = Field(default_factory=Sampling)
    """Sampling parameters for this role."""
    system_prompt: str | None = None
    """System message for this role (None: the model's chat template decides)."""
    trainable: bool = False
    """Whether trainers update this role (the leader in MLPO; several agents in MAGRPO)."""


class TeamConfig(BaseModel):
    """A team: topology + parameters + role → deployment map (litellm Router format)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = "team"
    """Name recorded with every episode; `--resume` matches on it."""
    topology: str = "leader_peers"
    """`leader_peers`, `gvr`, `debate`, or `package.module:builder` for a user topology."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the topology builder (e.g. peers, rounds)."""
    model_list: list[dict[str, Any]]
    """litellm Router deployments: `{model_name, litellm_params: {model, api_base, ...}, model_info}`."""
    router_settings: dict[str, Any] = Field(default_factory=lambda: {"num_retries": 2, "timeout": 600})
    """litellm Router keyword arguments: num_retries, timeout, fallbacks, retry_after, ..."""
    router_usage_tracking: bool = True
    """The Router's usage callbacks on every successful call (tpm/rpm counters, successes per minute that its
    cooldowns read). `false` drops them, about 0.3 ms of the 1.1-1.2 ms the Router adds to a call (docs/teams.md,
    "What the Router costs"); it needs `router_settings: {disable_cooldowns: true}` and no tpm/rpm limits."""
    roles: dict[str, RoleConfig]
    """Role → deployment. An agent `peer-2` uses `roles['peer-2']` when present, else `roles['peer']`."""

    @model_validator(mode="after")
    def _check_models(self) -> TeamConfig:
        names = []
        for i, dep in enumerate(self.model_list):
            if "model_name" not in dep or "model" not in dep.get("litellm_params", {}):
                raise ValueError(
                    f"model_list[{i}] needs `model_name` and `litellm_params.model` "
                    "(e.g. {model_name: smollm2, litellm_params: {model: local/smollm2-135m}})"
                )
            names.append(dep["model_name"])
        for role, rc in self.roles.items():
            if rc.model not in names:
                raise ValueError(
                    f"roles.{role}.model is {rc.model!r}, which is not a model_name in model_list "
                    f"(known: {', '.join(names)}); add a deployment or fix the name"
                )
        if not self.router_usage_tracking:
            _check_untracked_router(self.router_settings, self.model_list)
        return self

    def role(self, agent: str) -> RoleConfig:
        """The config for an agent id (`peer-2` falls back to `peer`)."""
        if agent in self.roles:
            return self.roles[agent]
        base = agent.rsplit("-", 1)[0]
        if base in self.roles:
            return self.roles[base]
        raise ConfigError(
            f"team {self.name!r} has no role {agent!r} (roles: {', '.join(self.roles)}); "
            f"add `roles: {{{base}: {{model: ...}}}}` to the team config"
        )

    def deployment(self, model_name: str) -> dict[str, Any]:
        """The model_list entry with this model_name."""
        for dep in self.model_list:
            if dep["model_name"] == model_name:
                return dep
        raise ConfigError(f"no deployment named {model_name!r} in model_list")

    def trainable_roles(self) -> list[str]:
        """Roles marked trainable."""
        return [r for r, rc in self.roles.items() if rc.trainable]

    def with_overrides(self, **params: Any) -> TeamConfig:
        """A copy with topology params updated."""
        return self.model_copy(update={"params": {**self.params, **params}})


def _check_untracked_router(settings: dict[str, Any], model_list: list[dict[str, Any]]) -> None:
    """Refuse `router_usage_tracking: false` where the Router reads what its usage callbacks count."""
    if settings.get("disable_cooldowns") is not True:
        raise ValueError(
            "router_usage_tracking: false leaves the Router's cooldowns without success counts (every failure "
            "would look like a 100% failure rate); add `disable_cooldowns: true` to router_settings"
        )
    if settings.get("routing_strategy", "simple-shuffle") != "simple-shuffle":
        raise ValueError(
            f"router_usage_tracking: false with routing_strategy {settings['routing_strategy']!r}: only "
            "simple-shuffle is known to read none of the usage counts; keep router_usage_tracking"
        )
    for dep in model_list:
        places = (dep, dep.get("litellm_params") or {}, dep.get("model_info") or {})
        if any(place.get(key) is not None for place in places for key in ("tpm", "rpm")):
            raise ValueError(
                f"router_usage_tracking: false: deployment {dep.get('model_name')!r} sets tpm/rpm limits, which "
                "the Router enforces from the usage callbacks count; drop the limits or keep router_usage_tracking"
            )


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def parse_team(data: dict[str, Any], source: str = "<team config>") -> TeamConfig:
    """Validate a team config dict; errors name the source, the key and the fix."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return TeamConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None


def load_team(path: str | Path) -> TeamConfig:
    """Load and validate a team YAML file."""
    p = Path(path)
    if not p.is_file():
        builtin = Path(__file__).parent / "teams" / f"{p.name}.yaml"
        if builtin.exists():
            p = builtin
        else:
            names = ", ".join(sorted(f.stem for f in (Path(__file__).parent / "teams").glob("*.yaml")))
            raise ConfigError(f"{path}: no such team file (built-in teams: {names})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    return parse_team(data, str(p))


def default_team(model: str = "local/smollm2-135m", peers: int = 3) -> TeamConfig:
    """The embedded default: one leader and `peers` peers on the same local weights."""
    return parse_team(
        {
            "name": "default",
            "topology": "leader_peers",
            "params": {"peers": peers, "rounds": 1},
            "model_list": [{"model_name": "base", "litellm_params": {"model": model}}],
            "roles": {
                "leader": {"model": "base", "trainable": True, "sampling": {"temperature": 0.7, "max_tokens": 256}},
                "peer": {"model": "base", "sampling": {"temperature": 0.8, "max_tokens": 192}},
            },
        },
        "default team",
    )
