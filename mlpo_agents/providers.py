"""litellm custom providers in the response shape of vLLM (`hosted_vllm/` with token ids and logprobs).

`local/<spec>[@<adapter>]` routes to the in-process `LocalEngine`; `testing.py` registers `scripted/`
on the same response builder. Every provider answers like a vLLM server asked for
`return_token_ids` and `logprobs`, so `ModelClient` has one parse path:
`choices[i].message.content`, `choices[i].finish_reason`,
`choices[i].provider_specific_fields["token_ids"]`, `choices[i].logprobs["content"][t]["logprob"]`,
`response.prompt_token_ids` and `response.usage`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_ENGINE_OPTION_KEYS = ("dtype", "max_batch_size", "device", "logprobs_mode", "num_threads")
_lock = threading.Lock()


@dataclass
class Completion:
    """One sampled completion, as a provider returns it."""

    text: str
    token_ids: Sequence[int]
    logprobs: Sequence[float]
    tokens: Sequence[str]
    finish_reason: str


def fill_response(model_response: Any, model: str, prompt_ids: Sequence[int], completions: Sequence[Completion]) -> Any:
    """Fill a litellm ModelResponse in the hosted_vllm shape (token ids, logprobs, prompt_token_ids)."""
    from litellm.types.utils import ChoiceLogprobs, Choices, Message, Usage

    choices: list[Any] = []
    for i, c in enumerate(completions):
        content: list[Any] = [
            {"token": piece, "logprob": lp, "bytes": None, "top_logprobs": []}
            for piece, lp in zip(c.tokens, c.logprobs, strict=True)
        ]
        choices.append(
            Choices(
                index=i,
                finish_reason=c.finish_reason,
                message=Message(role="assistant", content=c.text),
                logprobs=ChoiceLogprobs(content=content),
                provider_specific_fields={"token_ids": list(c.token_ids)},
            )
        )
    completion_tokens = sum(len(c.token_ids) for c in completions)
    model_response.choices = choices
    model_response.model = model
    model_response.usage = Usage(
        prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
        total_tokens=len(prompt_ids) + completion_tokens,
    )
    model_response.prompt_token_ids = list(prompt_ids)
    return model_response


def register_provider(name: str, handler_class: type) -> Any:
    """Register a litellm CustomLLM class under `name` (idempotent); returns the handler instance."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    with _lock:
        for item in litellm.custom_provider_map:
            if item["provider"] == name:
                return item["custom_handler"]
        handler = handler_class()
        litellm.custom_provider_map.append({"provider": name, "custom_handler": handler})
        from litellm.utils import custom_llm_setup

        custom_llm_setup()
        return handler


# ------------------------------------------------------------------------------------------- local/


def _sampling_from_litellm(optional_params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from mlpo_agents.engine import SamplingParams

    params = dict(optional_params or {})
    extra = dict(params.pop("extra_body", None) or {})
    params = {**extra, **params}
    max_tokens = params.get("max_tokens") or params.get("max_completion_tokens") or 256
    stop = params.get("stop") or ()
    sampling = SamplingParams(
        max_tokens=int(max_tokens),
        temperature=float(params["temperature"]) if params.get("temperature") is not None else 1.0,
        top_p=float(params["top_p"]) if params.get("top_p") is not None else 1.0,
        n=int(params.get("n") or 1),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        seed=int(params["seed"]) if params.get("seed") is not None else None,
    )
    options = {k: params[k] for k in _ENGINE_OPTION_KEYS if params.get(k) is not None}
    return sampling, options


def _local_response(result: Any, engine: Any, model: str, model_response: Any) -> Any:
    completions = [
        Completion(
            text=s.text, token_ids=s.token_ids, logprobs=s.logprobs, finish_reason=s.finish_reason,
            # Like vLLM: each token's own decoded text (not the byte-level piece such as 'Ġ49').
            tokens=engine.tokenizer.batch_decode([[t] for t in s.token_ids]),
        )
        for s in result.samples
    ]
    return fill_response(model_response, model, result.prompt_token_ids, completions)


def _local_provider_class() -> type:
    from litellm import CustomLLM

    from mlpo_agents.engines import get_engine, parse_local_model

    class LocalProvider(CustomLLM):
        """litellm provider ``local/<spec>[@<adapter>]`` backed by shared ``LocalEngine``s."""

        def _prepare(self, model: str, optional_params: dict, litellm_params: dict | None) -> tuple:
            spec, adapter = parse_local_model(model)
            sampling, options = _sampling_from_litellm(optional_params)
            for key in _ENGINE_OPTION_KEYS:
                if key not in options and litellm_params and litellm_params.get(key) is not None:
                    options[key] = litellm_params[key]
            return get_engine(spec, **options), adapter, sampling

        def completion(self, model, messages, *args, optional_params=None, litellm_params=None, **kwargs):  # type: ignore[override]
            engine, adapter, sampling = self._prepare(model, optional_params or {}, litellm_params)
            result = engine.generate(messages, adapter=adapter, params=sampling)
            return _local_response(result, engine, model, kwargs["model_response"])

        async def acompletion(self, model, messages, *args, optional_params=None, litellm_params=None, **kwargs):  # type: ignore[override]
            engine, adapter, sampling = self._prepare(model, optional_params or {}, litellm_params)
            result = await engine.agenerate(messages, adapter=adapter, params=sampling)
            return _local_response(result, engine, model, kwargs["model_response"])

    return LocalProvider


def register_local_provider() -> Any:
    """Register the ``local`` provider in ``litellm.custom_provider_map`` (idempotent); returns the handler."""
    return register_provider("local", _local_provider_class())
