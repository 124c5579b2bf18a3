"""Team topologies as LangGraph graphs, and the building blocks to compose new ones."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from typing import Any

from langgraph.graph.state import CompiledStateGraph
from pydantic import TypeAdapter, ValidationError

from mlpo_agents.config import ConfigError, TeamConfig

from .code_pair import build_code_pair
from .cooperate import build_cooperate
from .debate import build_debate
from .gvr import build_gvr
from .leader_peers import build_leader_peers

TOPOLOGIES: dict[str, Callable[..., CompiledStateGraph]] = {
    "leader_peers": build_leader_peers,
    "gvr": build_gvr,
    "debate": build_debate,
    "cooperate": build_cooperate,
    "code_pair": build_code_pair,
}

# Roles in a shipped topology's ROLES that it calls only when a parameter asks for them.
OPTIONAL_ROLES: dict[Callable[..., Any], Callable[[dict[str, Any]], set[str]]] = {
    build_leader_peers: lambda args: {"peer"} if args.get("peers") == 0 else set(),
    build_debate: lambda args: set() if args.get("judge") else {"judge"},
}


def builder_of(name: str) -> Callable[..., Any]:
    """The builder function of a shipped topology name or of `package.module:function`."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)  # `my_team:build` finds my_team.py in the current folder (after installed packages)
        importlib.invalidate_caches()  # a module file written after the folder was first listed
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            path = module_name.replace(".", "/")
            raise ValueError(
                f"cannot import module {module_name!r} of topology {name!r} ({e}); the module is looked up in "
                f"the current folder ({cwd}) and on PYTHONPATH: run from the folder that holds {path}.py, "
                "or add its folder to PYTHONPATH"
            ) from None
        builder = getattr(module, attr, None)
        if not callable(builder):
            found = sorted(n for n in vars(module) if n.startswith("build_"))
            raise ValueError(
                f"module {module_name!r} ({module.__file__}) has no function {attr!r} for topology {name!r}; "
                f"builders it defines: {', '.join(found) or 'none'}"
            )
        return typing.cast(Callable[..., Any], builder)
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    raise ValueError(f"unknown topology {name!r}; use one of {', '.join(TOPOLOGIES)} or `module:function`")


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter, its value and the fix when the builder cannot take it."""
    builder = builder_of(name)
    signature = inspect.signature(builder)
    accepted = {k: p for k, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # noqa: BLE001 - unresolvable annotations in a user builder: skip the type checks
        hints = {}
    valid = ", ".join(k for k in accepted if k != "checkpointer")
    if "checkpointer" in params and "checkpointer" not in accepted and not takes_any:
        raise ValueError(
            f"topology builder {name!r} does not accept `checkpointer=`, which --checkpoint needs; add a "
            "`checkpointer=None` parameter to the builder and end it with "
            "`return graph.compile(checkpointer=checkpointer)`, or run without --checkpoint"
        )
    for key, value in params.items():
        if key not in accepted:
            if takes_any:
                continue
            raise ValueError(f"topology {name!r} has no parameter {key!r}; valid: {valid}")
        if key not in hints or key == "checkpointer":
            continue
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(hints[key])
        except Exception:  # noqa: BLE001 - a type pydantic cannot check (e.g. a user class): the builder checks it
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError:
            default = accepted[key].default
            example = default if default not in (inspect.Parameter.empty, None) else 1
            raise ValueError(
                f"topology {name!r}: {key}={value!r} is not a valid {_type_name(hints[key])}; "
                f"pass e.g. --param {key}={str(example).lower() if isinstance(example, bool) else example}"
            ) from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def required_roles(name: str, **params: Any) -> tuple[str, ...]:
    """Roles a team needs for this topology and parameters: the builder module's `ROLES`, minus those
    the parameters switch off. A user topology without `ROLES` declares none (nothing is checked)."""
    builder = builder_of(name)
    roles = tuple(getattr(sys.modules.get(builder.__module__), "ROLES", ()))
    bound = inspect.signature(builder).bind_partial(**params)
    bound.apply_defaults()
    unused = OPTIONAL_ROLES.get(builder, lambda args: set())(dict(bound.arguments))
    return tuple(r for r in roles if r not in unused)


def build_topology(name: str, **params: Any) -> CompiledStateGraph:
    """Build a shipped topology by name, or a user builder given as `package.module:function`."""
    builder = builder_of(name)
    check_params(name, params)
    try:
        graph = builder(**params)
    except TypeError as e:
        raise ValueError(f"topology {name!r} does not take these parameters: {e}") from None
    if not isinstance(graph, CompiledStateGraph):
        raise ValueError(
            f"topology builder {name!r} returned {type(graph).__name__}, not a compiled graph; "
            "end the builder with `return graph.compile()`"
        )
    return graph


def check_topology(team: TeamConfig) -> None:
    """Check, before any episode starts, that the team's topology builds with its `params` and that the
    team has every role the topology calls (the builder module's `ROLES`); raises ConfigError with the fix."""
    try:
        build_topology(team.topology, **team.params)
        needed = required_roles(team.topology, **team.params)
    except ValueError as e:
        raise ConfigError(f"team {team.name!r}: {e}") from None
    missing = [r for r in needed if r not in team.roles and not any(k.startswith(f"{r}-") for k in team.roles)]
    if missing:
        model = next(iter(team.roles.values())).model if team.roles else "..."
        add = ", ".join(f"{r}: {{model: {model}}}" for r in missing)
        raise ConfigError(
            f"team {team.name!r} has no role {', '.join(map(repr, missing))}, which topology "
            f"{team.topology!r} calls (team roles: {', '.join(team.roles) or 'none'}); add `roles: {{{add}}}` "
            "to the team config, or use a team written for this topology"
        )
