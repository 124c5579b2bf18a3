"""ModelClient: the one place that calls models.

Every call goes through a litellm `Router` built from the team config (retries, timeouts and fallbacks
come from `router_settings`) and is recorded as token-exact `ModelCall` events. The same response
shape is read from vLLM servers (`hosted_vllm/`, asked for token ids and logprobs) and from the
in-process engine (`local/`, which mimics it). Graph nodes reach the client through LangGraph's runtime
context; the node name and episode id are filled in from LangGraph's run context when not given.
What the Router adds to each call, and the part a team can turn off (`router_usage_tracking: false`,
about 0.3 of its 1.1-1.2 ms), is in docs/teams.md, "What the Router costs".
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Any

from mlpo_agents.config import ConfigError, TeamConfig
from mlpo_agents.trace import EventSink, Failure, ModelCall, new_id


class ModelCallError(RuntimeError):
    """A model call that failed after the Router's retries and fallbacks; already recorded as a Failure."""


class TokenDataError(RuntimeError):
    """A response without the token ids / logprobs the trace needs (the server was not asked, or dropped them)."""


@dataclass
class Sample:
    """One completion returned to a graph node (the full record is in the trace)."""

    text: str
    call_id: str
    group_id: str
    sample_index: int
    finish_reason: str
    completion_tokens: int


def _import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def drop_usage_callbacks(litellm: Any, router: Any) -> None:
    """Take `router`'s usage callbacks out of litellm's global success-callback lists (team setting
    `router_usage_tracking: false`). Each Router registers them there when built; they count tpm/rpm and
    successes per minute after every call, in a task and (the sync one) in a worker thread."""
    for callbacks in (litellm._async_success_callback, litellm.success_callback):
        litellm.logging_callback_manager.remove_callback_from_list_by_object(callbacks, router)


def _langgraph_context() -> tuple[str | None, str | None]:
    """(node name, episode id) of the LangGraph run this call happens in, if any."""
    try:
        from langgraph.config import get_config

        config = get_config()
    except (RuntimeError, ImportError):
        return None, None
    node = config.get("metadata", {}).get("langgraph_node")
    episode_id = config.get("configurable", {}).get("episode_id")
    return node, episode_id


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def parse_choice_tokens(response: Any, choice: Any) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, completion ids, logprobs) from a litellm response choice (vLLM / local engine shape)."""
    psf = _field(choice, "provider_specific_fields") or {}
    completion_ids = psf.get("token_ids") if isinstance(psf, dict) else None
    prompt_ids = _field(response, "prompt_token_ids")
    if prompt_ids is None:
        prompt_ids = (psf.get("prompt_token_ids") if isinstance(psf, dict) else None) or None
    content = _field(_field(choice, "logprobs"), "content")
    if completion_ids is None or prompt_ids is None or content is None:
        missing = [
            n for n, v in (("completion token_ids", completion_ids), ("prompt_token_ids", prompt_ids), ("logprobs", content))
            if v is None
        ]
        raise TokenDataError(
            f"response has no {', '.join(missing)}: serve with vLLM >= 0.10 (return_token_ids) or the local/ engine"
        )
    # `_field` inlined (this runs per token); a missing logprob still fails in float(None), as before.
    logprobs = [
        float(c.get("logprob") if isinstance(c, dict) else getattr(c, "logprob", None))  # type: ignore[arg-type]
        for c in content
    ]
    if len(logprobs) != len(completion_ids):
        raise TokenDataError(
            f"{len(logprobs)} logprobs for {len(completion_ids)} completion tokens: refusing to record a misaligned trace"
        )
    return list(prompt_ids), list(completion_ids), logprobs


class ModelClient:
    """Routes role calls through a litellm Router and records each sample as a ModelCall event."""

    def __init__(self, team: TeamConfig, store: EventSink | None = None, *, record_messages: bool = True):
        self.team = team
        self.store = store
        self.record_messages = record_messages
        self._litellm = _import_litellm()
        if any(d["litellm_params"]["model"].startswith("local/") for d in team.model_list):
            from mlpo_agents.providers import register_local_provider

            register_local_provider()
        settings = {"num_retries": 2, "timeout": 600, **team.router_settings}
        self.router = self._litellm.Router(model_list=[dict(d) for d in team.model_list], **settings)
        if not team.router_usage_tracking:
            drop_usage_callbacks(self._litellm, self.router)
        self._route: dict[str, str] = {}  # role -> model_name override (adapter versions)
        self._versions: dict[str, str] = {}  # model_name -> version label
        self._base_models = {d["model_name"]: self._base_model_of(d) for d in team.model_list}
        self.stats = {"calls": 0, "samples": 0, "prompt_tokens": 0, "completion_tokens": 0, "failures": 0}

    # ---- routing -------------------------------------------------------------------------------
    def with_team(self, team: TeamConfig) -> ModelClient:
        """This client running `team`: a copy of the client's team with other roles' sampling (per-run seeds,
        temperatures), params or name. The view shares the Router, the adapter routing (`use_version`, on either
        side, shows on both), the trace store and the stats; `team` must deploy the same models, since the
        Router was built from them. Nothing of this client changes."""
        if [dict(d) for d in team.model_list] != [dict(d) for d in self.team.model_list]:
            raise ConfigError(
                f"team {team.name!r} deploys other models than the client's team {self.team.name!r}; its Router "
                "cannot serve them: build a ModelClient for it"
            )
        view = copy.copy(self)
        view.team = team
        return view

    def close(self) -> None:
        """Unhook this client's Router from litellm's global callback lists: litellm keeps every Router's
        callbacks for the life of the process and runs them all on every call, so a process that builds many
        clients slows down call by call. Views (`with_team`, `recording_to`) share the Router: close the
        client that built it, once, when done with it and its views."""
        self.router.discard()

    def recording_to(self, store: EventSink | None) -> ModelClient:
        """This client recording its calls in `store` (itself when it already does): the runner gives each
        episode's calls to the store that holds the episode (through the episode's `EpisodeRecorder`), so a
        store is never left with calls whose episode is elsewhere. Shares everything else with this client,
        as `with_team` does."""
        if store is self.store:
            return self
        view = copy.copy(self)
        view.store = store
        return view

    @staticmethod
    def _base_model_of(deployment: dict[str, Any]) -> str:
        info = deployment.get("model_info") or {}
        if info.get("base_model"):
            return str(info["base_model"])
        model = deployment["litellm_params"]["model"]
        if model.startswith("local/"):
            return model.removeprefix("local/").split("@", 1)[0]
        return model

    @staticmethod
    def _version_of(deployment: dict[str, Any]) -> str:
        info = deployment.get("model_info") or {}
        if info.get("version"):
            return str(info["version"])
        model = deployment["litellm_params"]["model"]
        return model.split("@", 1)[1] if model.startswith("local/") and "@" in model else "base"

    def model_name_for(self, role: str) -> str:
        """The deployment a role is routed to now."""
        return self._route.get(role) or self.team.role(role).model

    def use_version(self, role: str, version: str, litellm_params: dict[str, Any], base_model: str | None = None) -> str:
        """Route `role` to a new deployment (e.g. a freshly trained adapter) without restarting anything.

        Local engine: `litellm_params={"model": "local/<spec>@<adapter>"}` after `engine.load_adapter`.
        vLLM: `{"model": "hosted_vllm/<lora name>", "api_base": ...}` after the server loaded the LoRA.
        """
        from litellm.types.router import Deployment, LiteLLM_Params

        name = f"{role}@{version}"
        self.router.upsert_deployment(Deployment(model_name=name, litellm_params=LiteLLM_Params(**litellm_params)))
        previous = self.team.deployment(self.team.role(role).model)
        self._base_models[name] = base_model or self._base_models[previous["model_name"]]
        self._versions[name] = version
        self._route[role] = name
        return name

    def version_of(self, role: str) -> str:
        """The model version (adapter name, `base` when none) serving a role now."""
        name = self.model_name_for(role)
        return self._versions.get(name) or self._version_of(self.team.deployment(name))

    # ---- calling -------------------------------------------------------------------------------
    async def acomplete(
        self,
        messages: list[dict[str, Any]],
        *,
        role: str,
        agent: str | None = None,
        round: int = 0,
        n: int | None = None,
        node: str | None = None,
        episode_id: str | None = None,
        parent_call_id: str | None = None,
        **overrides: Any,
    ) -> list[Sample]:
        """Sample `n` completions for `role` and record them; raises ModelCallError (recorded) on failure."""
        agent = agent or role
        role_cfg = self.team.role(agent)
        if node is None or episode_id is None:
            lg_node, lg_episode = _langgraph_context()
            node = node or lg_node or role
            episode_id = episode_id or lg_episode or "no-episode"
        if role_cfg.system_prompt and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": role_cfg.system_prompt}, *messages]
        sampling = role_cfg.sampling.as_kwargs()
        sampling.update({k: v for k, v in overrides.items() if v is not None})
        if n is not None:
            sampling["n"] = n
        model_name = self._route.get(agent) or self._route.get(role) or role_cfg.model
        start = time.perf_counter()
        try:
            response = await self.router.acompletion(
                model=model_name,
                messages=messages,
                logprobs=True,
                extra_body={"return_token_ids": True},
                **sampling,
            )
            latency = time.perf_counter() - start
            samples, events = self._record(response, messages, sampling, model_name, latency,
                                           node=node, role=role, agent=agent, round=round,
                                           episode_id=episode_id, parent_call_id=parent_call_id)
        except Exception as e:  # noqa: BLE001 - every failure is recorded, then re-raised typed
            failure = Failure(episode_id, node, role, agent, round, type(e).__name__, _short(e))
            self.stats["failures"] += 1
            if self.store is not None:
                self.store.append(failure)
            raise ModelCallError(f"{agent} ({model_name}): {failure.message}") from e
        self.stats["calls"] += 1
        self.stats["samples"] += len(events)
        self.stats["prompt_tokens"] += events[0].prompt_tokens if events else 0
        self.stats["completion_tokens"] += sum(e.completion_tokens for e in events)
        if self.store is not None:
            self.store.append(events)
        return samples

    def _record(
        self, response: Any, messages: list[dict[str, Any]], sampling: dict[str, Any], model_name: str,
        latency: float, *, node: str, role: str, agent: str, round: int, episode_id: str,
        parent_call_id: str | None,
    ) -> tuple[list[Sample], list[ModelCall]]:
        group_id = new_id()
        deployment_model = self._deployment_model(model_name)
        base_model = self._base_models.get(model_name) or deployment_model
        version = self._versions.get(model_name) or self._version_of(self.team.deployment(model_name))
        samples, events = [], []
        stored_messages = messages if self.record_messages else []
        for i, choice in enumerate(response.choices):
            prompt_ids, completion_ids, logprobs = parse_choice_tokens(response, choice)
            text = choice.message.content or ""
            call_id = new_id()
            finish = choice.finish_reason or "stop"
            events.append(
                ModelCall(
                    call_id=call_id, episode_id=episode_id, node=node, role=role, agent=agent, round=round,
                    group_id=group_id, sample_index=i, messages=stored_messages, text=text,
                    prompt_token_ids=prompt_ids, completion_token_ids=completion_ids, logprobs=logprobs,
                    finish_reason=finish, model=deployment_model, base_model=base_model, version=version,
                    sampling=sampling, latency_s=latency, prompt_tokens=len(prompt_ids),
                    completion_tokens=len(completion_ids), parent_call_id=parent_call_id,
                )
            )
            samples.append(Sample(text, call_id, group_id, i, finish, len(completion_ids)))
        return samples, events

    def _deployment_model(self, model_name: str) -> str:
        try:
            return self.team.deployment(model_name)["litellm_params"]["model"]
        except ConfigError:
            for dep in self.router.model_list:
                if dep["model_name"] == model_name:
                    return dep["litellm_params"]["model"]
            return model_name


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:limit]


def preflight(team: TeamConfig, timeout_s: float = 3.0) -> None:
    """Fail fast, with the fix, when a deployment cannot serve: an unknown local spec or a server that is down."""
    import urllib.error
    import urllib.request

    for dep in team.model_list:
        params = dep["litellm_params"]
        model = params["model"]
        if model.startswith("local/"):
            from mlpo_agents import zoo

            try:
                spec = zoo.canonical_spec(model.removeprefix("local/").split("@", 1)[0])
                if spec != zoo.TINY_TEST:
                    zoo.model_folder(spec)
            except (ValueError, zoo.ModelNotAvailableError) as e:
                raise ConfigError(f"deployment {dep['model_name']!r} ({model}): {e}") from None
        elif model.startswith("hosted_vllm/") and params.get("api_base"):
            url = params["api_base"].rstrip("/") + "/models"
            try:
                urllib.request.urlopen(url, timeout=timeout_s).close()
            except (urllib.error.URLError, OSError) as e:
                raise ConfigError(
                    f"deployment {dep['model_name']!r}: no vLLM server answers at {params['api_base']} ({e}); "
                    "start it with `mlpo serve --team <team.yaml>` or fix api_base"
                ) from None
