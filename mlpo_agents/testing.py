"""Scripted models for fast, exact tests of topologies and of anything built on ModelClient.

A `ScriptedModel` is a plain function from chat messages to a reply, served through a real litellm
custom provider (`scripted/<name>`) in the same response shape as vLLM and the local engine, so tests
exercise the real Router, ModelClient and TraceStore. It records every prompt it was shown.

    leader = ScriptedModel("leader", lambda msgs: "<answer>4</answer>")
    team = scripted_team({"leader": leader, "peer": ScriptedModel("peer", "<answer>4</answer>")})
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from mlpo_agents.config import TeamConfig, parse_team

Reply = str | Callable[[list[dict[str, Any]]], str]

_MODELS: dict[str, ScriptedModel] = {}
_lock = threading.Lock()


def fake_token_ids(text: str) -> list[int]:
    """Deterministic stand-in token ids: one per UTF-8 byte."""
    return list(text.encode())


class ScriptedModel:
    """A fake model that answers with `reply(messages)` (or a fixed string) and logs what it saw."""

    def __init__(self, name: str, reply: Reply, *, base_model: str = "scripted"):
        self.name = name
        self.reply = reply
        self.base_model = base_model
        self.seen: list[list[dict[str, Any]]] = []
        with _lock:
            _MODELS[name] = self

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        self.seen.append(messages)
        return self.reply(messages) if callable(self.reply) else self.reply

    @property
    def prompts(self) -> list[str]:
        """The last user message of every call, in call order."""
        return [m[-1]["content"] for m in self.seen]


def _response(model: ScriptedModel, messages: list[dict[str, Any]], n: int, model_response: Any) -> Any:
    from litellm.types.utils import ChoiceLogprobs, Choices, Message, Usage

    prompt_ids = fake_token_ids("".join(str(m.get("content", "")) for m in messages))
    choices: list[Any] = []
    for i in range(n):
        text = model(messages)
        ids = fake_token_ids(text)
        content: list[Any] = [{"token": str(t), "logprob": -0.5, "bytes": None, "top_logprobs": []} for t in ids]
        choices.append(
            Choices(
                index=i, finish_reason="stop", message=Message(role="assistant", content=text),
                logprobs=ChoiceLogprobs(content=content), provider_specific_fields={"token_ids": ids},
            )
        )
    model_response.choices = choices
    completion = sum(len(c.provider_specific_fields["token_ids"]) for c in choices)  # type: ignore[index]
    model_response.usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                                 total_tokens=len(prompt_ids) + completion)
    model_response.prompt_token_ids = prompt_ids
    return model_response


def register_scripted_provider() -> None:
    """Register the `scripted` litellm provider (idempotent)."""
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    from litellm import CustomLLM

    with _lock:
        if any(p["provider"] == "scripted" for p in litellm.custom_provider_map):
            return

        class ScriptedProvider(CustomLLM):
            def completion(self, model, messages, *args, optional_params=None, **kwargs):  # type: ignore[override]
                name = model.split("/", 1)[-1]
                n = int((optional_params or {}).get("n") or 1)
                return _response(_MODELS[name], messages, n, kwargs["model_response"])

            async def acompletion(self, model, messages, *args, **kwargs):  # type: ignore[override]
                return self.completion(model, messages, *args, **kwargs)

        litellm.custom_provider_map.append({"provider": "scripted", "custom_handler": ScriptedProvider()})
        from litellm.utils import custom_llm_setup

        custom_llm_setup()


def scripted_team(
    roles: dict[str, ScriptedModel],
    *,
    topology: str = "leader_peers",
    params: dict[str, Any] | None = None,
    name: str = "scripted",
    trainable: tuple[str, ...] = ("leader",),
    num_retries: int = 0,
) -> TeamConfig:
    """A TeamConfig whose roles are served by scripted models (one deployment per model)."""
    register_scripted_provider()
    models = {m.name: m for m in roles.values()}
    return parse_team(
        {
            "name": name,
            "topology": topology,
            "params": params or {},
            "model_list": [
                {"model_name": m.name, "litellm_params": {"model": f"scripted/{m.name}"},
                 "model_info": {"base_model": m.base_model}}
                for m in models.values()
            ],
            "router_settings": {"num_retries": num_retries, "timeout": 30},
            "roles": {
                role: {"model": m.name, "trainable": role in trainable, "sampling": {"temperature": 0.0}}
                for role, m in roles.items()
            },
        },
        f"scripted team {name!r}",
    )
