"""Replay raw vLLM 0.32 responses (tests/fixtures/vllm/*.json) through litellm's hosted_vllm provider.

A loopback HTTP server answers with the saved JSON; litellm parses it as it would a live server's.
This pins the field paths the trace reads, so a litellm upgrade that drops one fails here, fast and
without vLLM:

- completion token ids: ``choice.provider_specific_fields["token_ids"]``
- prompt token ids:     ``response.prompt_token_ids``
- per-token logprobs:   ``choice.logprobs["content"][i]["logprob"]``

and checks that the request litellm sends still carries ``logprobs`` and ``return_token_ids``.
Regenerate the fixtures with ``MLPO_UPDATE_VLLM_FIXTURES=1 pytest -m vllm tests/test_vllm.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
CASES = sorted(p.stem for p in FIXTURES.glob("chat_*.json"))


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


class _ReplayServer:
    """Answers every POST with one saved response body and remembers the request bodies."""

    def __init__(self, body: dict):
        self.body = json.dumps(body).encode()
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append(
                    {"path": self.path, "body": json.loads(self.rfile.read(length) or b"{}")}
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> _ReplayServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm as module

    return module


def _replay(litellm, name: str):
    fixture = load_fixture(name)
    request = fixture["request"]
    with _ReplayServer(fixture["response"]) as server:
        response = asyncio.run(
            litellm.acompletion(
                model=f"hosted_vllm/{request['model']}",
                api_base=server.api_base,
                messages=request["messages"],
                max_tokens=request["max_tokens"],
                temperature=request["temperature"],
                n=request.get("n", 1),
                logprobs=True,
                extra_body={"return_token_ids": True},
                num_retries=0,
            )
        )
    return fixture, response, server.requests


def test_fixtures_exist():
    assert {"chat_greedy", "chat_n2_sampled"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_litellm_keeps_token_ids_and_logprobs(litellm, name):
    fixture, response, _ = _replay(litellm, name)
    raw = fixture["response"]
    assert len(response.choices) == len(raw["choices"])
    assert response.prompt_token_ids == raw["prompt_token_ids"]
    for choice, raw_choice in zip(response.choices, raw["choices"], strict=True):
        assert choice.provider_specific_fields["token_ids"] == raw_choice["token_ids"]
        content = choice.logprobs["content"]
        assert [c["logprob"] for c in content] == [c["logprob"] for c in raw_choice["logprobs"]["content"]]
        assert len(content) == len(raw_choice["token_ids"])
        assert choice.message.content == raw_choice["message"]["content"]
        assert choice.finish_reason == raw_choice["finish_reason"]
    assert response.usage.prompt_tokens == len(raw["prompt_token_ids"])
    assert response.usage.completion_tokens == sum(len(c["token_ids"]) for c in raw["choices"])


@pytest.mark.parametrize("name", CASES)
def test_litellm_sends_token_id_flags(litellm, name):
    _, _, requests = _replay(litellm, name)
    assert len(requests) == 1
    sent = requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["logprobs"] is True
    assert sent["body"]["return_token_ids"] is True
    assert sent["body"].get("stream") in (None, False)


@pytest.mark.parametrize("name", CASES)
def test_model_client_parser_reads_replayed_response(litellm, name):
    from mlpo_agents.models import parse_choice_tokens

    fixture, response, _ = _replay(litellm, name)
    raw = fixture["response"]
    for choice, raw_choice in zip(response.choices, raw["choices"], strict=True):
        prompt_ids, completion_ids, logprobs = parse_choice_tokens(response, choice)
        assert prompt_ids == raw["prompt_token_ids"]
        assert completion_ids == raw_choice["token_ids"]
        assert logprobs == [c["logprob"] for c in raw_choice["logprobs"]["content"]]


# ---- vllm_server.py and serve.py error paths, with a fake interpreter standing in for the vllm venv ----


def fake_venv(tmp_path: Path, script: str) -> Path:
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n" + script)
    python.chmod(0o755)
    return tmp_path / "venv"


def test_missing_vllm_venv_says_how_to_install(tmp_path, monkeypatch):
    from mlpo_agents import serve, vllm_server

    monkeypatch.setenv("MLPO_VLLM_VENV", str(tmp_path / "nope"))
    with pytest.raises(vllm_server.VLLMNotInstalledError, match="scripts/install_vllm_cpu.sh"):
        vllm_server.VLLMServer(tmp_path, "m").start()
    with pytest.raises(vllm_server.VLLMNotInstalledError, match="install_vllm_cpu.sh"):
        serve.serve_team(None)  # checked before the team is even looked at


def test_server_exiting_during_startup_is_one_line_with_log_and_last_line(tmp_path):
    from mlpo_agents import vllm_server

    venv = fake_venv(
        tmp_path, 'echo "loading $*"\necho "ValueError: head size 48 is not supported" >&2\nexit 3\n'
    )
    server = vllm_server.VLLMServer(tmp_path, "m", venv=venv, log_path=tmp_path / "m.log", enable_lora=True)
    assert "--enable-lora" in server.command() and "--max-lora-rank" in server.command()
    assert server.environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert server.environment()["VLLM_CPU_KVCACHE_SPACE"] == "1"
    with pytest.raises(vllm_server.VLLMServerError) as err:
        server.start().wait_healthy(timeout=30)
    message = str(err.value)
    assert "\n" not in message and "exited with code 3" in message
    assert str(tmp_path / "m.log") in message and message.endswith(
        "ValueError: head size 48 is not supported"
    )


def test_startup_timeout_shows_the_log_tail_and_kills_the_process_group(tmp_path):
    from mlpo_agents import vllm_server

    venv = fake_venv(tmp_path, 'echo "still loading"\nsleep 300 &\nwait\n')
    server = vllm_server.VLLMServer(tmp_path, "m", venv=venv, log_path=tmp_path / "m.log")
    with pytest.raises(vllm_server.VLLMServerError, match="not healthy after 1s") as err:
        server.start().wait_healthy(timeout=1.0, poll_s=0.1)
    assert "still loading" in str(err.value)
    assert not server.is_running()
    assert live_processes_in_group(server.pid) == []  # the background `sleep` child is gone too


def live_processes_in_group(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (killed children may wait a moment to be reaped)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_serve_subcommand_parses_into_serve_main():
    import argparse

    from mlpo_agents import serve

    parser = argparse.ArgumentParser(prog="mlpo")
    serve.add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--team", "tiny", "--no-lora", "--out", "routed.yaml"])
    assert args.func is serve.serve_main
    assert (args.team, args.lora, args.out, args.max_lora_rank, args.timeout) == (
        "tiny",
        False,
        "routed.yaml",
        16,
        600.0,
    )


def test_serve_team_picks_local_and_loopback_vllm_deployments_only():
    from mlpo_agents import serve
    from mlpo_agents.config import ConfigError

    def dep(model, **params):
        info = params.pop("model_info", None)
        return {"model_name": "m", "litellm_params": {"model": model, **params}, "model_info": info}

    assert serve._servable(dep("local/tiny-test")) == ("tiny-test", None)
    loopback = dep(
        "hosted_vllm/smollm2-135m", api_base="http://127.0.0.1:1/v1", model_info={"base_model": "smollm2"}
    )
    assert serve._servable(loopback) == ("smollm2", 1)
    assert (
        serve._servable(
            dep("hosted_vllm/x", api_base="http://10.1.2.3:8000/v1", model_info={"base_model": "x"})
        )
        is None
    )
    assert serve._servable(dep("hosted_vllm/x", api_base="http://127.0.0.1:8000/v1")) is None  # no base_model
    assert serve._servable(dep("openai/gpt-4o-mini")) is None
    with pytest.raises(ConfigError, match="load_lora"):
        serve._servable(dep("local/tiny-test@v3"))


def test_served_team_finds_the_server_behind_a_role(tmp_path):
    from mlpo_agents import serve, vllm_server
    from mlpo_agents.config import ConfigError, load_team

    team = load_team("tiny")
    server = vllm_server.VLLMServer(tmp_path, "tiny-test", port=1)
    served = serve.ServedTeam([server], team, {"tiny": server})
    assert served.server_for("leader") is server and served.server_for("peer-2") is server
    with pytest.raises(ConfigError, match="not served by vLLM"):
        serve.ServedTeam([], team, {}).server_for("leader")
