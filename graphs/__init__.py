"""Team topologies as LangGraph graphs, and the building blocks to compose new ones."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from langgraph.graph.state import CompiledStateGraph

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


def build_topology(name: str, **params: Any) -> CompiledStateGraph:
    """Build a shipped topology by name, or a user builder given as `package.module:function`."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            builder = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load topology builder {name!r} ({e}); use `package.module:function`") from None
    elif name in TOPOLOGIES:
        builder = TOPOLOGIES[name]
    else:
        raise ValueError(f"unknown topology {name!r}; use one of {', '.join(TOPOLOGIES)} or `module:function`")
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
