"""mlpo-agents: multi-agent LLM teams as LangGraph graphs, routed through litellm, trained from their traces."""

import os as _os

# litellm fetches a remote cost map on import unless told not to; with no network that blocks for seconds.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"

__all__ = ["Team"]


def __getattr__(name: str) -> object:
    # Lazy, so `import mlpo_agents` (and `mlpo --help`) does not import LangGraph and litellm.
    if name in ("Team", "TeamResult", "AgentTurn", "AgentFailure"):
        from mlpo_agents import team

        return getattr(team, name)
    raise AttributeError(f"module 'mlpo_agents' has no attribute {name!r}")
