"""OpenTelemetry export of a trace store: episodes and model calls as spans in the GenAI semantic conventions.

One trace per episode: a root span `invoke_workflow <team>` (task, row, team, topology, status, episode
rewards, failures) and a child span `chat <model>` per recorded call (one per sample) with the GenAI
attributes, `mlpo.*` ones (role, round, group, sample index, model version) and its rewards. Times are the
recorded ones (a call ends at its `created_at` and began `latency_s` before). Ids are hashes of the episode
and call ids, so exporting again sends the same spans. Text only with `content=True`. Spans go to an
OTLP/HTTP endpoint the user names or to a file of OTLP-JSON lines; nothing is sent anywhere by default.
Needs the `otel` extra: `pip install 'mlpo-agents[otel]'`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mlpo_agents.trace import Episode, Failure, ModelCall, Reward, TraceStore

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

INSTALL = "pip install 'mlpo-agents[otel]'"
SCOPE = "mlpo_agents.otel"
SERVICE = "mlpo-agents"
CHUNK, BATCH = 200, 512
"""Episodes read from the store at a time; spans gathered before an OTLP request is sent."""


class OtelError(ValueError):
    """The export cannot run or did not arrive (a ValueError: `mlpo` prints it as one line)."""


def require_sdk() -> None:
    """Fail with the install command when the opentelemetry packages are missing."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401  (and the SDK)
    except ImportError:
        raise OtelError(f"OpenTelemetry export needs the opentelemetry packages: {INSTALL}") from None


def _hash_id(kind: str, key: str, nbytes: int) -> int:
    value = int.from_bytes(hashlib.sha256(f"mlpo:{kind}:{key}".encode()).digest()[:nbytes], "big")
    return value or 1  # all-zero ids are invalid in OTel


def trace_id(episode_id: str) -> int:
    """The 128-bit trace id of an episode: the same on every export."""
    return _hash_id("trace", episode_id, 16)


def span_id(kind: str, key: str) -> int:
    """The 64-bit span id of an episode (`kind` "episode") or a call (`kind` "call")."""
    return _hash_id(kind, key, 8)


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def provider_of(model: str) -> str:
    """`gen_ai.provider.name`: the litellm route prefix of a deployment (`local`, `hosted_vllm`, `openai`)."""
    return model.split("/", 1)[0] if "/" in model else "unknown"


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None and v != ""}


def _parts(content: Any) -> list[dict[str, Any]]:
    """A message's content as GenAI message parts (text; other content as its JSON)."""
    return [{"type": "text", "content": content if isinstance(content, str) else json.dumps(content)}]


def _reward_event(r: Reward) -> Any:
    from opentelemetry.sdk.trace import Event

    return Event("gen_ai.evaluation.result", _clean({
        "gen_ai.evaluation.name": r.name, "gen_ai.evaluation.score.value": float(r.value),
        "gen_ai.evaluation.explanation": r.meta.get("reason"), "mlpo.reward.extracted": r.meta.get("extracted"),
        "mlpo.reward.failed": r.meta.get("failed"),
    }), timestamp=_ns(r.created_at))


def _rewards(rewards: Sequence[Reward]) -> dict[str, float]:
    return {f"mlpo.reward.{r.name}": float(r.value) for r in rewards}


def call_span(c: ModelCall, rewards: Sequence[Reward], *, content: bool, resource: Resource) -> ReadableSpan:
    """The `chat <model>` span of one recorded call (child of its episode's span)."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

    tid = trace_id(c.episode_id)
    s, provider = c.sampling, provider_of(c.model)

    def number(key: str, kind: type) -> Any:
        return kind(s[key]) if isinstance(s.get(key), int | float) else None

    attrs = _clean({
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.system": provider,
        "gen_ai.request.model": c.model, "gen_ai.response.model": c.base_model, "gen_ai.response.id": c.call_id,
        "gen_ai.request.temperature": number("temperature", float), "gen_ai.request.top_p": number("top_p", float),
        "gen_ai.request.max_tokens": number("max_tokens", int), "gen_ai.request.seed": number("seed", int),
        "gen_ai.request.choice.count": s["n"] if isinstance(s.get("n"), int) and s["n"] != 1 else None,
        "gen_ai.request.stop_sequences": [s["stop"]] if isinstance(s.get("stop"), str) else s.get("stop") or None,
        "gen_ai.response.finish_reasons": [c.finish_reason],
        "gen_ai.usage.input_tokens": c.prompt_tokens, "gen_ai.usage.output_tokens": c.completion_tokens,
        "gen_ai.agent.name": c.agent, "gen_ai.conversation.id": c.episode_id,
        "mlpo.episode_id": c.episode_id, "mlpo.call_id": c.call_id, "mlpo.node": c.node, "mlpo.role": c.role,
        "mlpo.agent": c.agent, "mlpo.round": c.round, "mlpo.group_id": c.group_id, "mlpo.sample_index": c.sample_index,
        "mlpo.model.version": c.version, "mlpo.model.base": c.base_model, "mlpo.parent_call_id": c.parent_call_id,
        "mlpo.latency_s": c.latency_s, **_rewards(rewards),
    })
    events = [_reward_event(r) for r in rewards]
    if content:
        messages = {
            "gen_ai.input.messages": json.dumps([{"role": m.get("role", "user"), "parts": _parts(m.get("content"))}
                                                 for m in c.messages]),
            "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": _parts(c.text),
                                                   "finish_reason": c.finish_reason}]),
        }
        attrs.update(messages)
        events.append(Event("gen_ai.client.inference.operation.details",
                            {"gen_ai.operation.name": "chat", **messages}, timestamp=_ns(c.created_at)))
    links = []
    if c.parent_call_id:  # the call whose output this prompt builds on: a link, it ended before this began
        links.append(Link(SpanContext(tid, span_id("call", c.parent_call_id), False, TraceFlags(1)),
                          {"mlpo.link": "parent_call"}))
    return ReadableSpan(
        name=f"chat {c.model}", context=SpanContext(tid, span_id("call", c.call_id), False, TraceFlags(1)),
        parent=SpanContext(tid, span_id("episode", c.episode_id), False, TraceFlags(1)), resource=resource,
        attributes=attrs, events=events, links=links,
        kind=SpanKind.INTERNAL if provider == "local" else SpanKind.CLIENT,  # local: the engine is in-process
        instrumentation_scope=InstrumentationScope(SCOPE),
        start_time=_ns(c.created_at - c.latency_s), end_time=_ns(c.created_at),
    )


def episode_spans(episode: Episode, calls: Sequence[ModelCall], rewards: Sequence[Reward],
                  failures: Sequence[Failure] = (), *, content: bool = False,
                  resource: Resource | None = None) -> list[ReadableSpan]:
    """One episode as spans: its `invoke_workflow <team>` root span first, then one span per call."""
    require_sdk()
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    resource = resource if resource is not None else default_resource()
    by_call: dict[str | None, list[Reward]] = {}
    for r in rewards:
        by_call.setdefault(r.call_id, []).append(r)
    children = [call_span(c, by_call.get(c.call_id, []), content=content, resource=resource) for c in calls]
    own = by_call.get(None, [])
    end = episode.finished_at or max([c.created_at for c in calls], default=episode.started_at)
    events = [_reward_event(r) for r in own]
    events += [Event("exception", {"exception.type": f.error_type, "exception.message": f.message,
                                   "mlpo.node": f.node, "mlpo.role": f.role, "mlpo.agent": f.agent,
                                   "mlpo.round": f.round}, timestamp=_ns(f.created_at)) for f in failures]
    meta = {f"mlpo.meta.{k}": v for k, v in episode.meta.items() if isinstance(v, str | int | float | bool)}
    failed = episode.status == "failed"
    attrs = _clean({
        "gen_ai.operation.name": "invoke_workflow", "gen_ai.workflow.name": episode.team,
        "gen_ai.conversation.id": episode.episode_id,
        "error.type": (failures[-1].error_type if failures else "_OTHER") if failed else None,
        "mlpo.episode_id": episode.episode_id, "mlpo.task": episode.task, "mlpo.task_id": episode.task_id,
        "mlpo.team": episode.team, "mlpo.topology": episode.topology, "mlpo.status": episode.status,
        "mlpo.calls": len(calls), "mlpo.failures": len(failures),
        "gen_ai.usage.input_tokens": sum(c.prompt_tokens for c in calls),
        "gen_ai.usage.output_tokens": sum(c.completion_tokens for c in calls),
        **meta, **_rewards(own),
    })
    if content and episode.final_answer is not None:
        attrs["gen_ai.output.messages"] = json.dumps([{"role": "assistant", "parts": _parts(episode.final_answer)}])
    rid = SpanContext(trace_id(episode.episode_id), span_id("episode", episode.episode_id), False, TraceFlags(1))
    root = ReadableSpan(
        name=f"invoke_workflow {episode.team}", context=rid, parent=None, resource=resource, attributes=attrs, events=events, kind=SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, f"episode {episode.status}") if failed else Status(StatusCode.UNSET),
        instrumentation_scope=InstrumentationScope(SCOPE),
        start_time=_ns(episode.started_at), end_time=_ns(max(end, episode.started_at)),
    )
    return [root, *children]


def default_resource() -> Resource:
    """The OTel resource from the environment (`OTEL_SERVICE_NAME`, ...), service `mlpo-agents` by default."""
    from opentelemetry.sdk.resources import Resource

    env = Resource.create()
    if str(env.attributes.get("service.name", "")).startswith("unknown_service"):
        env = env.merge(Resource({"service.name": SERVICE}))
    return env


def select_episodes(store: TraceStore, prefixes: Sequence[str] | None = None) -> list[Episode]:
    """The store's episodes, or those whose id starts with one of `prefixes` (each must match one)."""
    episodes = store.episodes()
    if not prefixes:
        return episodes
    for p in prefixes:
        if not any(e.episode_id.startswith(p) for e in episodes):
            raise OtelError(f"no episode id in {store.where} starts with {p!r}; `mlpo traces show` lists them")
    return [e for e in episodes if e.episode_id.startswith(tuple(prefixes))]


def store_spans(store: TraceStore, *, episodes: Sequence[str] | None = None,
                content: bool = False) -> Iterator[list[ReadableSpan]]:
    """The spans of each selected episode of a store, one list per episode, in store order."""
    require_sdk()
    resource, chosen = default_resource(), select_episodes(store, episodes)
    for i in range(0, len(chosen), CHUNK):
        part = chosen[i:i + CHUNK]
        ids = [e.episode_id for e in part]
        calls, rewards, failures = store.calls(episode_id=ids), store.rewards(episode_id=ids), store.failures(episode_id=ids)
        for e in part:
            yield episode_spans(e, [c for c in calls if c.episode_id == e.episode_id],
                                [r for r in rewards if r.episode_id == e.episode_id],
                                [f for f in failures if f.episode_id == e.episode_id], content=content, resource=resource)


def otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """Spans as one OTLP-JSON `ExportTraceServiceRequest` (ids in hex, enums as numbers, as OTLP/JSON says)."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    def hex_ids(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: base64.b64decode(v).hex() if k in ("traceId", "spanId", "parentSpanId") else hex_ids(v)
                    for k, v in value.items()}
        return [hex_ids(v) for v in value] if isinstance(value, list) else value

    return hex_ids(MessageToDict(encode_spans(spans), use_integers_for_enums=True))


def otlp_exporter(endpoint: str, *, timeout: float = 10.0) -> SpanExporter:
    """An OTLP/HTTP (protobuf) exporter to `endpoint`; a bare `http://host:4318` gets the `/v1/traces` path."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise OtelError(f"--endpoint {endpoint!r}: give an OTLP/HTTP URL, e.g. --endpoint http://127.0.0.1:4318")
    if url.path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint, timeout=timeout)


def export(store: TraceStore, exporter: SpanExporter, *, episodes: Sequence[str] | None = None,
           content: bool = False, where: str = "the exporter") -> tuple[int, int]:
    """Send a store's episodes to `exporter` (about BATCH spans a request); returns (episodes, spans) sent."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    sizes: list[int] = []  # spans of each episode sent
    batch: list[ReadableSpan] = []

    def flush() -> None:
        if batch and exporter.export(batch) != SpanExportResult.SUCCESS:
            raise OtelError(f"sending {len(batch)} spans to {where} failed (is an OTLP/HTTP collector listening "
                            "there?); exporting again resends the same spans")
        batch.clear()

    try:
        for spans in store_spans(store, episodes=episodes, content=content):
            batch.extend(spans)
            sizes.append(len(spans))
            if len(batch) >= BATCH:
                flush()
        flush()
    finally:
        exporter.shutdown()
    return len(sizes), sum(sizes)


def export_store(store: TraceStore, *, endpoint: str | None = None, out: str | Path | None = None,
                 content: bool = False, episodes: Sequence[str] | None = None,
                 timeout: float = 10.0) -> tuple[int, int]:
    """`mlpo traces export-otel`: to an OTLP/HTTP `endpoint` or an OTLP-JSON lines `out` file; (episodes, spans)."""
    if (endpoint is None) == (out is None):
        raise OtelError("give one destination: --endpoint http://127.0.0.1:4318 (an OTLP/HTTP collector) or "
                        "--out spans.jsonl (an OTLP-JSON lines file)")
    require_sdk()
    if endpoint is not None:
        return export(store, otlp_exporter(endpoint, timeout=timeout), episodes=episodes, content=content,
                      where=endpoint)
    select_episodes(store, episodes)  # a bad --episode fails before the file is replaced
    Path(out or "").parent.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []  # spans of each episode written
    with open(out or "", "w", encoding="utf-8") as f:  # one line per episode: what `otlpjsonfile` reads
        for trace in store_spans(store, episodes=episodes, content=content):
            f.write(json.dumps(otlp_json(trace)) + "\n")
            sizes.append(len(trace))
    return len(sizes), sum(sizes)
