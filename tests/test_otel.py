"""OpenTelemetry export (mlpo_agents/otel.py): spans of a real SQLite store in memory, in an OTLP-JSON lines
file and over OTLP/HTTP to a local collector stand-in."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the `otel` extra (in `dev`) is not installed")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from mlpo_agents import otel  # noqa: E402
from mlpo_agents.cli import main  # noqa: E402
from mlpo_agents.trace import Episode, Failure, ModelCall, Reward, TraceStore  # noqa: E402

SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "n": 2, "seed": 3, "stop": ["</answer>"]}


def call(episode_id: str, call_id: str, agent: str, round_: int, created_at: float, **kw) -> ModelCall:
    fields = dict(
        call_id=call_id, episode_id=episode_id, node=agent.split("-")[0], role=agent.split("-")[0], agent=agent,
        round=round_, group_id=f"g-{call_id}", sample_index=0,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+2?"}],
        text=f"{agent} says 4", prompt_token_ids=[1, 2, 3], completion_token_ids=[4, 5], logprobs=[-0.5, -0.25],
        finish_reason="stop", model="local/tiny-test", base_model="tiny-test", version="step-2",
        sampling=dict(SAMPLING), latency_s=0.5, prompt_tokens=3, completion_tokens=2, created_at=created_at,
    )
    return ModelCall(**{**fields, **kw})


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "runs" / "traces.sqlite"
    with TraceStore(path) as store:
        store.append([
            Episode("e1", "arithmetic", "arithmetic/test/0", "team-a", "leader_peers", status="done", final_answer="4",
                    started_at=100.0, finished_at=103.5, meta={"fingerprint": "abc"}),
            call("e1", "c1", "peer-1", 0, 101.0),
            call("e1", "c2", "leader", 1, 102.5, parent_call_id="c1", sample_index=1, group_id="g-x",
                 model="hosted_vllm/leader", finish_reason="length", prompt_tokens=7, completion_tokens=9),
            Reward("e1", "correct", 1.0, meta={"reason": "right", "extracted": "4"}, created_at=103.6),
            Reward("e1", "format", 0.5, call_id="c2", meta={"reason": "closed block"}, created_at=103.7),
            Episode("e2", "arithmetic", "arithmetic/test/1", "team-a", "leader_peers", status="failed",
                    started_at=200.0, finished_at=None),
            call("e2", "c3", "peer-1", 0, 201.0),
            Failure("e2", "peer", "peer", "peer-2", 0, "Timeout", "peer-2 took too long", created_at=201.2),
        ])
    return path


def spans_of(path: Path, **kw):
    exporter = InMemorySpanExporter()
    with TraceStore(path) as store:
        episodes, spans = otel.export(store, exporter, **kw)
    assert (episodes, spans) == (len(kw.get("episodes") or ["e1", "e2"]), len(exporter.get_finished_spans()))
    return {s.attributes.get("mlpo.call_id") or s.attributes["mlpo.episode_id"]: s for s in exporter.get_finished_spans()}


def test_spans_tree_genai_attributes_rewards_and_recorded_times(store_path):
    spans = spans_of(store_path)
    assert sorted(spans) == ["c1", "c2", "c3", "e1", "e2"]
    e1, c1, c2, e2, c3 = (spans[k] for k in ("e1", "c1", "c2", "e2", "c3"))
    # one trace per episode: the root has no parent, every call is its child
    assert e1.parent is None and e2.parent is None
    for child, root in ((c1, e1), (c2, e1), (c3, e2)):
        assert child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
    assert e1.context.trace_id != e2.context.trace_id
    assert e1.name == "invoke_workflow team-a" and e1.kind == SpanKind.INTERNAL
    assert c1.name == "chat local/tiny-test" and c1.kind == SpanKind.INTERNAL  # in-process engine
    assert c2.name == "chat hosted_vllm/leader" and c2.kind == SpanKind.CLIENT
    root = dict(e1.attributes)
    assert root | {
        "gen_ai.operation.name": "invoke_workflow", "gen_ai.workflow.name": "team-a", "mlpo.task": "arithmetic",
        "mlpo.task_id": "arithmetic/test/0", "mlpo.team": "team-a", "mlpo.topology": "leader_peers",
        "mlpo.status": "done", "mlpo.reward.correct": 1.0, "mlpo.meta.fingerprint": "abc", "mlpo.calls": 2,
        "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 11,
    } == root
    assert "mlpo.reward.format" not in root  # a call's reward stays on the call
    attrs = dict(c2.attributes)
    assert attrs | {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "hosted_vllm", "gen_ai.system": "hosted_vllm",
        "gen_ai.request.model": "hosted_vllm/leader", "gen_ai.response.model": "tiny-test",
        "gen_ai.request.temperature": 0.7, "gen_ai.request.top_p": 0.9, "gen_ai.request.max_tokens": 64,
        "gen_ai.request.seed": 3, "gen_ai.request.choice.count": 2, "gen_ai.request.stop_sequences": ["</answer>"],
        "gen_ai.response.finish_reasons": ["length"], "gen_ai.usage.input_tokens": 7,
        "gen_ai.usage.output_tokens": 9, "gen_ai.agent.name": "leader", "gen_ai.conversation.id": "e1",
        "mlpo.role": "leader", "mlpo.node": "leader", "mlpo.round": 1, "mlpo.sample_index": 1,
        "mlpo.group_id": "g-x", "mlpo.model.version": "step-2", "mlpo.model.base": "tiny-test",
        "mlpo.parent_call_id": "c1", "mlpo.reward.format": 0.5,
    } == attrs
    assert isinstance(attrs["gen_ai.request.temperature"], float) and isinstance(attrs["gen_ai.request.max_tokens"], int)
    assert "mlpo.reward.format" not in c1.attributes
    # rewards as GenAI evaluation events, with the checker's reason
    (ev,) = c2.events
    assert ev.name == "gen_ai.evaluation.result" and ev.timestamp == 103_700_000_000
    assert dict(ev.attributes) == {"gen_ai.evaluation.name": "format", "gen_ai.evaluation.score.value": 0.5,
                                   "gen_ai.evaluation.explanation": "closed block"}
    assert [dict(e.attributes)["mlpo.reward.extracted"] for e in e1.events] == ["4"]
    # the parent call (MALT trees, refinement chains) is a link: it ended before this call began
    assert [(link.context.span_id, dict(link.attributes)) for link in c2.links] == [
        (c1.context.span_id, {"mlpo.link": "parent_call"})]
    # recorded times: a call ends at created_at and began latency_s before; an episode spans started..finished
    assert (c2.start_time, c2.end_time) == (102_000_000_000, 102_500_000_000)
    assert (e1.start_time, e1.end_time) == (100_000_000_000, 103_500_000_000)
    assert (e2.start_time, e2.end_time) == (200_000_000_000, 201_000_000_000)  # unfinished: ends at its last call
    # a failed episode: error status, error.type and its failures as exception events
    assert e2.status.status_code == StatusCode.ERROR and e2.attributes["error.type"] == "Timeout"
    assert e1.status.status_code == StatusCode.UNSET
    (failure,) = e2.events
    assert failure.name == "exception" and failure.attributes["exception.type"] == "Timeout"
    assert failure.attributes["mlpo.agent"] == "peer-2"
    # no prompt or completion text unless asked
    for span in spans.values():
        assert not any(k.startswith(("gen_ai.input", "gen_ai.output")) for k in span.attributes)
        assert "says 4" not in repr(dict(span.attributes)) and "2+2" not in repr(dict(span.attributes))


def test_ids_are_derived_so_exporting_again_is_idempotent(store_path):
    first, again = spans_of(store_path), spans_of(store_path)
    for key, span in first.items():
        assert (span.context.trace_id, span.context.span_id) == (again[key].context.trace_id, again[key].context.span_id)
        assert span.attributes == again[key].attributes and span.start_time == again[key].start_time
    assert first["e1"].context.trace_id == otel.trace_id("e1")
    assert first["e1"].context.span_id == otel.span_id("episode", "e1")
    assert first["c2"].context.span_id == otel.span_id("call", "c2")
    ids = [s.context.span_id for s in first.values()]
    assert len(set(ids)) == len(ids) and first["e1"].context.span_id != first["e1"].context.trace_id >> 64
    only = spans_of(store_path, episodes=["e2"])
    assert sorted(only) == ["c3", "e2"] and only["c3"].context.span_id == first["c3"].context.span_id


def test_content_only_when_asked_in_the_current_genai_convention(store_path):
    spans = spans_of(store_path, content=True)
    c1 = spans["c1"]
    want_in = [{"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
               {"role": "user", "parts": [{"type": "text", "content": "What is 2+2?"}]}]
    want_out = [{"role": "assistant", "parts": [{"type": "text", "content": "peer-1 says 4"}], "finish_reason": "stop"}]
    assert json.loads(c1.attributes["gen_ai.input.messages"]) == want_in
    assert json.loads(c1.attributes["gen_ai.output.messages"]) == want_out
    (details,) = [e for e in c1.events if e.name == "gen_ai.client.inference.operation.details"]
    assert json.loads(details.attributes["gen_ai.input.messages"]) == want_in
    assert json.loads(details.attributes["gen_ai.output.messages"]) == want_out
    assert details.timestamp == c1.end_time
    assert json.loads(spans["e1"].attributes["gen_ai.output.messages"])[0]["parts"][0]["content"] == "4"


def test_jsonl_file_of_otlp_json_reads_back(store_path, tmp_path, capsys):
    out = tmp_path / "spans" / "spans.jsonl"
    assert main(["traces", "export-otel", "--traces", str(store_path), "--out", str(out)]) == 0
    assert f"exported 2 episodes (5 spans) to {out}" in capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2  # one OTLP request per episode
    (resource_spans,) = lines[0]["resourceSpans"]
    service = {a["key"]: a["value"] for a in resource_spans["resource"]["attributes"]}["service.name"]
    assert service == {"stringValue": "mlpo-agents"}
    (scope,) = resource_spans["scopeSpans"]
    assert scope["scope"]["name"] == "mlpo_agents.otel"
    root, c1, c2 = scope["spans"]
    assert root["name"] == "invoke_workflow team-a" and "parentSpanId" not in root
    assert root["traceId"] == f"{otel.trace_id('e1'):032x}" == c1["traceId"]  # hex, as OTLP/JSON wants
    assert root["spanId"] == f"{otel.span_id('episode', 'e1'):016x}" == c1["parentSpanId"] == c2["parentSpanId"]
    assert (c2["startTimeUnixNano"], c2["endTimeUnixNano"], c2["kind"]) == ("102000000000", "102500000000", 3)
    attrs = {a["key"]: a["value"] for a in c2["attributes"]}
    assert attrs["gen_ai.usage.output_tokens"] == {"intValue": "9"}
    assert attrs["gen_ai.request.temperature"] == {"doubleValue": 0.7}
    assert attrs["gen_ai.response.finish_reasons"] == {"arrayValue": {"values": [{"stringValue": "length"}]}}
    assert c2["links"][0]["spanId"] == c1["spanId"]
    assert lines[1]["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["status"]["code"] == 2  # ERROR
    # exporting again replaces the file with the same spans (only the resource's service.instance.id is new)
    assert main(["traces", "export-otel", "--traces", str(store_path), "--out", str(out), "--episode", "e1"]) == 0
    (again,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert again["resourceSpans"][0]["scopeSpans"] == lines[0]["resourceSpans"][0]["scopeSpans"]


class Collector:
    """A stand-in OTLP/HTTP collector on 127.0.0.1 that records the requests it is sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.requests.append((self.path, self.headers["Content-Type"], body))
                self.send_response(400 if self.path.startswith("/refuse") else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_otlp_http_export_reaches_a_local_collector(store_path, capsys):
    with Collector() as collector:
        assert main(["traces", "export-otel", "--traces", str(store_path), "--endpoint", collector.url,
                     "--content"]) == 0
    assert f"exported 2 episodes (5 spans) to {collector.url}" in capsys.readouterr().out
    (path, content_type, body), = collector.requests
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert sorted(s.name for s in spans) == ["chat hosted_vllm/leader", "chat local/tiny-test", "chat local/tiny-test",
                                             "invoke_workflow team-a", "invoke_workflow team-a"]
    by_name = {s.name: s for s in spans}
    root = by_name["invoke_workflow team-a"]
    assert int.from_bytes(root.trace_id, "big") in (otel.trace_id("e1"), otel.trace_id("e2"))
    leader = by_name["chat hosted_vllm/leader"]
    assert leader.parent_span_id == otel.span_id("episode", "e1").to_bytes(8, "big")
    attrs = {a.key: a.value for a in leader.attributes}
    assert attrs["gen_ai.agent.name"].string_value == "leader" and attrs["mlpo.reward.format"].double_value == 0.5
    assert json.loads(attrs["gen_ai.output.messages"].string_value)[0]["parts"][0]["content"] == "leader says 4"


def test_bad_input_and_failures_are_one_line_with_the_fix(store_path, tmp_path, capsys, monkeypatch):
    def fails(*argv: str) -> str:
        assert main(["traces", "export-otel", "--traces", str(store_path), *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    assert "--endpoint http://127.0.0.1:4318" in fails() and "--out" in fails()
    assert "one destination" in fails("--out", str(tmp_path / "a.jsonl"), "--endpoint", "http://127.0.0.1:9")
    assert "give an OTLP/HTTP URL" in fails("--endpoint", "127.0.0.1:4318")
    assert "'zz'" in fails("--out", str(tmp_path / "b.jsonl"), "--episode", "e1", "zz")
    assert not (tmp_path / "b.jsonl").exists()
    with Collector() as collector:  # a collector that refuses the request
        err = fails("--endpoint", f"{collector.url}/refuse")
    assert "failed" in err and collector.requests[0][0] == "/refuse"
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    assert "pip install 'mlpo-agents[otel]'" in fails("--out", str(tmp_path / "c.jsonl"))


def test_show_takes_several_episode_prefixes(store_path, capsys):
    assert main(["traces", "show", "--traces", str(store_path), "--episode", "e1", "e2"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["peer-1", "leader", "peer-1"]
