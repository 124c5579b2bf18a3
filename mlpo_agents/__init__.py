"""mlpo-agents: multi-agent LLM teams as LangGraph graphs, routed through litellm, trained from their traces."""

import os as _os

# litellm fetches a remote cost map on import unless told not to; with no network that blocks for seconds.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Nothing reaches the network on its own: the Hugging Face libraries (TRL's trainers among them) stay
# offline unless the user allows them with HF_HUB_OFFLINE=0 (benchmark data from the hub needs that).
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

__all__ = ["Team"]


def __getattr__(name: str) -> object:
    # Lazy, so `import mlpo_agents` (and `mlpo --help`) does not import LangGraph and litellm.
    if name in ("Team", "TeamResult", "AgentTurn", "AgentFailure"):
        from mlpo_agents import team

        return getattr(team, name)
    raise AttributeError(f"module 'mlpo_agents' has no attribute {name!r}")
