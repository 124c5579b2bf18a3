"""A team as an OpenAI-compatible chat model: `mlpo serve --team T --app` (FastAPI + uvicorn).

- `POST /v1/chat/completions`: `model` names a team; the last user message is the question, earlier
  messages its context. `n` asks the leader for n answers to one prompt (one GRPO group, the reply's
  choices). Non-streaming, or SSE with `stream: true`: the final answer streamed as content deltas;
  with `include_turns: true` (an extra body field) every agent's turn also comes as an `mlpo.turn` event
  (a chunk with no choices and an `mlpo_turn` field) as soon as its node finishes. The sampling
  parameters of a request (temperature, max_tokens, ...) are ignored: the team config sets them.
- `GET /v1/models`: the served teams.
- `POST /v1/feedback {episode_id, reward, reason?, choice?, name?}`: a Reward event (`choice`: on that
  choice's call, what offline MLPO trains on; no `choice`: on the episode).
- `POST /v1/adapters {model, path, role?, name?}`: hot-load a trained LoRA adapter for a team's role.

Every reply carries its episode id (an `episode_id` field and an `x-episode-id` header); every episode is
recorded in the team's trace store like `mlpo run` (see `team.py`). Errors are OpenAI-shaped
(`{"error": {"message", "type", "code"}}`). Without an API key the app only binds loopback; with one,
every `/v1` request needs `Authorization: Bearer <key>`. A streaming client that disconnects cancels its
episode, which is recorded `interrupted`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlpo_agents.config import ConfigError
from mlpo_agents.team import AgentFailure, AgentTurn, Team, TeamResult, UnknownEpisodeError, question_text

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_CHOICES = 16


class APIError(Exception):
    """An error answered to the client as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


class ChatMessage(BaseModel):
    """One chat message of a request (other OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat completion request the app reads (the rest are accepted, ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str
    """The team to ask."""
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    """Leader answers to one prompt (the reply's choices)."""
    stream_options: dict[str, Any] | None = None
    include_turns: bool = False
    """Streaming: also send every agent turn as an `mlpo.turn` event."""


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`."""

    model_config = ConfigDict(extra="forbid")

    episode_id: str
    reward: float
    reason: str | None = None
    choice: int | None = Field(None, ge=0)
    """Index of the choice the reward is for (None: the whole episode)."""
    name: str = "feedback"


class AdapterRequest(BaseModel):
    """`POST /v1/adapters`."""

    model_config = ConfigDict(extra="forbid")

    model: str
    path: str
    role: str | None = None
    name: str | None = None


@dataclass
class AppSettings:
    """How the app answers requests."""

    api_key: str | None = None
    """Bearer token every `/v1` request must carry (None: no check; then bind loopback only)."""
    max_request_bytes: int = 1 << 20
    """Larger request bodies get 413."""
    keepalive_s: float = 5.0
    """Seconds between SSE keep-alive comments while an episode runs (they also notice a gone client)."""


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if host not in LOOPBACK_HOSTS and not api_key:
        raise ConfigError(
            f"--host {host}: the app answers anyone who can reach it; binding beyond loopback needs "
            "--api-key KEY (or $MLPO_API_KEY), or keep the default --host 127.0.0.1"
        )


def create_app(teams: Sequence[Team], settings: AppSettings | None = None) -> FastAPI:
    """The FastAPI app serving `teams` (each under its name)."""
    settings = settings or AppSettings()
    by_name: dict[str, Team] = {}
    for team in teams:
        if team.name in by_name:
            raise ConfigError(f"two served teams are named {team.name!r}; give each team file its own `name`")
        by_name[team.name] = team
    if not by_name:
        raise ConfigError("serve at least one team")
    app = FastAPI(title="mlpo-agents", description="Teams of agents as OpenAI-compatible chat models")
    app.state.teams = by_name

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        body = {"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.code}}
        return JSONResponse(body, status_code=exc.status)

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        if settings.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                return await api_error(request, APIError(
                    401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                    "authentication_error", "invalid_api_key"))
        return await call_next(request)

    async def body_of(request: Request, model: type[BaseModel]) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > settings.max_request_bytes:
            raise APIError(413, f"request body of {size} bytes is over the limit of {settings.max_request_bytes}",
                           code="request_too_large")
        raw = await request.body()
        if len(raw) > settings.max_request_bytes:
            raise APIError(413, f"request body of {len(raw)} bytes is over the limit of "
                                f"{settings.max_request_bytes}", code="request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            where = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
            raise APIError(400, f"invalid request: {where}", code="invalid_request") from None

    def team_of(name: str) -> Team:
        if name not in by_name:
            raise APIError(404, f"the model {name!r} is not a team served here (served: {', '.join(by_name)}); "
                                "GET /v1/models lists them", code="model_not_found")
        return by_name[name]

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "mlpo-agents",
             "topology": team.config.topology, "versions": {r: team.version_of(r) for r in team.config.roles}}
            for name, team in by_name.items()
        ]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = await body_of(request, ChatRequest)
        team = team_of(req.model)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            question = question_text(messages)
            await asyncio.to_thread(check_fits, team, question)
            team.graph(req.n)  # a team that cannot draw n answers says so before the episode starts
        except (ValueError, ConfigError) as e:
            code = "context_length_exceeded" if isinstance(e, QuestionTooLongError) else "invalid_request"
            raise APIError(400, str(e), code=code) from None
        episode_id = _new_episode_id()
        headers = {"x-episode-id": episode_id}
        if req.stream:
            return StreamingResponse(
                _sse(team, messages, req, episode_id, settings.keepalive_s), media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )
        result = await team.ainvoke(messages, samples=req.n, episode_id=episode_id)
        if result.status == "failed":
            raise APIError(500, _failure_message(team, result), "server_error", "episode_failed")
        usage, versions = episode_usage(team, episode_id)
        body = {
            "id": f"chatcmpl-{episode_id}", "object": "chat.completion", "created": int(time.time()),
            "model": team.name, "episode_id": episode_id,
            "choices": [
                {"index": s.sample_index, "message": {"role": "assistant", "content": s.text},
                 "finish_reason": "length" if s.truncated else "stop"}
                for s in result.samples
            ],
            "usage": usage,
            "mlpo": {**_summary(result), "versions": versions},
        }
        return JSONResponse(body, headers=headers)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Any:
        req = await body_of(request, FeedbackRequest)
        for team in by_name.values():
            try:
                event = await asyncio.to_thread(team.feedback, req.episode_id, req.reward, reason=req.reason,
                                                name=req.name, sample=req.choice)
            except UnknownEpisodeError:
                continue
            except ValueError as e:
                raise APIError(400, str(e), code="invalid_feedback") from None
            return {"object": "feedback", "episode_id": req.episode_id, "name": event.name, "value": event.value,
                    "call_id": event.call_id, "model": team.name}
        raise APIError(404, f"no episode {req.episode_id!r} was recorded by the teams served here",
                       code="episode_not_found")

    @app.post("/v1/adapters")
    async def adapters(request: Request) -> Any:
        req = await body_of(request, AdapterRequest)
        team = team_of(req.model)
        try:
            version = await asyncio.to_thread(team.use_adapter, Path(req.path), role=req.role, name=req.name)
        except (ValueError, ConfigError, KeyError, OSError) as e:
            raise APIError(400, f"cannot load the adapter: {e}", code="invalid_adapter") from None
        return {"object": "adapter", "model": team.name, "role": req.role or team.answer_role, "version": version}

    return app


class QuestionTooLongError(ValueError):
    """A question that leaves no room in the context of a model of the team."""


def check_fits(team: Team, question: str) -> None:
    """Refuse a question that, with a role's answer budget, does not fit a local model's context."""
    from mlpo_agents.engines import get_engine, parse_local_model

    seen = set()
    for role, rc in team.config.roles.items():
        model = team.config.deployment(rc.model)["litellm_params"]["model"]
        if not model.startswith("local/"):
            continue  # a served model answers a too-long prompt with its own error (a failed episode)
        engine = get_engine(parse_local_model(model)[0])
        key = (id(engine), rc.sampling.max_tokens)
        if key in seen:
            continue
        seen.add(key)
        tokens = len(engine.encode_messages([{"role": "user", "content": question}]))
        if tokens + rc.sampling.max_tokens > engine.max_positions:
            raise QuestionTooLongError(
                f"the question is {tokens} tokens; with the {rc.sampling.max_tokens} tokens role {role!r} may "
                f"answer it does not fit the {engine.max_positions}-token context of {model}; shorten it"
            )


def episode_usage(team: Team, episode_id: str) -> tuple[dict[str, int], dict[str, str]]:
    """Token usage of an episode (all agents' calls) and the model version each role was served by."""
    calls = team.store.calls(episode_id=episode_id)
    prompt = sum(c.prompt_tokens for c in calls if c.sample_index == 0)  # a group shares one prompt
    completion = sum(c.completion_tokens for c in calls)
    versions = {c.role: c.version for c in calls}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}, versions


def _summary(result: TeamResult) -> dict[str, Any]:
    return {"answer": result.answer, "status": result.status, "turns": [t.as_dict() for t in result.turns],
            "failures": [f.as_dict() for f in result.failures]}


def _failure_message(team: Team, result: TeamResult) -> str:
    reasons = [f"{f.agent}: {f.message}" for f in team.store.failures(episode_id=result.episode_id)]
    return f"episode {result.episode_id} gave no answer ({'; '.join(reasons)[:500] or 'no reason recorded'})"


def _new_episode_id() -> str:
    from mlpo_agents.trace import new_id

    return new_id()


def _event(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(team: Team, messages: list[dict[str, Any]], req: ChatRequest, episode_id: str,
               keepalive_s: float) -> AsyncIterator[str]:
    """The SSE body of a streaming reply; leaving early (a gone client) cancels and records the episode."""
    base = {"id": f"chatcmpl-{episode_id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": team.name, "episode_id": episode_id}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _event({**base, "choices": choices, **extra})

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(req.n)])
    stream = team.astream(messages, samples=req.n, episode_id=episode_id)
    pending: asyncio.Future[Any] | None = None
    try:
        result: TeamResult | None = None
        while result is None:
            pending = pending or asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield ": keep-alive\n\n"
                continue
            event, pending = pending.result(), None
            if isinstance(event, TeamResult):
                result = event
            elif req.include_turns and isinstance(event, AgentTurn | AgentFailure):
                kind = "turn" if isinstance(event, AgentTurn) else "failure"
                yield _event({**base, "choices": [], f"mlpo_{kind}": event.as_dict()}, f"mlpo.{kind}")
        if result.status == "failed":
            error = {"message": _failure_message(team, result), "type": "server_error", "code": "episode_failed"}
            yield _event({"error": error, "episode_id": episode_id})
            return
        for s in result.samples:
            for piece in re.findall(r"\s*\S+\s*", s.text) or [s.text]:
                yield chunk([{"index": s.sample_index, "delta": {"content": piece}, "finish_reason": None}])
        usage, versions = episode_usage(team, episode_id)
        yield chunk([{"index": s.sample_index, "delta": {}, "finish_reason": "length" if s.truncated else "stop"}
                     for s in result.samples],
                    mlpo={"answer": result.answer, "status": result.status, "versions": versions})
        if (req.stream_options or {}).get("include_usage"):
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await stream.aclose()


# ---- running it ----------------------------------------------------------------------------------


class AppServer:
    """The app on uvicorn in a background thread (tests, benchmarks, notebooks): `with AppServer(app) as s: s.url`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        """The base URL of the OpenAI API (`.../v1`)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> AppServer:
        """Start serving; returns once the server accepts requests."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving (running episodes are cancelled and recorded `interrupted`)."""
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_app(teams: Sequence[Team], *, host: str = "127.0.0.1", port: int = 8080, settings: AppSettings | None = None) -> None:
    """Serve `teams` until Ctrl-C (refuses a non-loopback host without an API key)."""
    import uvicorn

    settings = settings or AppSettings()
    check_bind(host, settings.api_key)
    uvicorn.run(create_app(teams, settings), host=host, port=port, log_level="info")
