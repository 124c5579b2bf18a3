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

from mlpo_agents.graphs.cooperate import build_cooperate
from mlpo_agents.graphs.debate import build_debate
from mlpo_agents.graphs.gvr import build_gvr
from mlpo_agents.graphs.leader_peers import build_leader_peers

TOPOLOGIES: dict[str, Callable[..., CompiledStateGraph]] = {
    "leader_peers": build_leader_peers,
    "gvr": build_gvr,
    "debate": build_debate,
    "cooperate": build_cooperate,
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
