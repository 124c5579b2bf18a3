"""Scripted models for fast, exact tests of topologies and of anything built on ModelClient.

A `ScriptedModel` is a plain function from chat messages to a reply, served through a real litellm
custom provider (`scripted/<name>`) in the same response shape as vLLM and the local engine, so tests
exercise the real Router, ModelClient and TraceStore. It records every prompt it was shown.

    leader = ScriptedModel("leader", lambda msgs: "<answer>4</answer>")
    team = scripted_team({"leader": leader, "peer": ScriptedModel("peer", "<answer>4</answer>")})
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from mlpo_agents.config import TeamConfig, parse_team
from mlpo_agents.providers import Completion, fill_response, register_provider

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
    prompt_ids = fake_token_ids("".join(str(m.get("content", "")) for m in messages))
    completions = []
    for _ in range(n):
        text = model(messages)
        ids = fake_token_ids(text)
        completions.append(Completion(text, ids, [-0.5] * len(ids), [str(t) for t in ids], "stop"))
    return fill_response(model_response, f"scripted/{model.name}", prompt_ids, completions)


def _scripted_provider_class() -> type:
    from litellm import CustomLLM

    class ScriptedProvider(CustomLLM):
        def completion(self, model, messages, *args, optional_params=None, **kwargs):  # type: ignore[override]
            name = model.split("/", 1)[-1]
            n = int((optional_params or {}).get("n") or 1)
            return _response(_MODELS[name], messages, n, kwargs["model_response"])

        async def acompletion(self, model, messages, *args, **kwargs):  # type: ignore[override]
            return self.completion(model, messages, *args, **kwargs)

    return ScriptedProvider


def register_scripted_provider() -> None:
    """Register the `scripted` litellm provider (idempotent)."""
    register_provider("scripted", _scripted_provider_class())


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


def save_tiny_adapter(
    path: Any, seed: int, targets: Sequence[str] = ("q_proj", "v_proj", "o_proj", "down_proj"),
    layers: Sequence[int] | None = None,
) -> None:  # fmt: skip
    """Save a LoRA adapter of tiny-test whose B matrices are seeded random (so it changes the outputs)."""
    from peft import LoraConfig

    from mlpo_agents import zoo

    layer_list = None if layers is None else list(layers)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), layers_to_transform=layer_list)
    save_random_adapter(path, zoo.build_tiny_test()[0], config, seed)


def save_random_adapter(path: Any, model: Any, config: Any, seed: int, scale: float = 0.5) -> None:
    """Save the LoRA adapter `config` (a peft LoraConfig) of `model` with seeded random B matrices, `scale` x
    N(0, 1): a fresh adapter's B is zero, which would leave every output unchanged."""
    import torch
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(path)
