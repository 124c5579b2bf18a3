"""mlpo-agents: multi-agent LLM teams as LangGraph graphs, routed through litellm, trained from their traces."""

import os as _os

# litellm fetches a remote cost map on import unless told not to; with no network that blocks for seconds.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"
