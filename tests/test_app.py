"""The team as an OpenAI-compatible endpoint, through the official `openai` client on a loopback server:
replies and streams, errors, the API key, a client that leaves mid-episode, and the whole app loop
(chat -> feedback -> offline MLPO -> hot reload -> the served leader's version changes) on the tiny model."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from openai import OpenAI

from mlpo_agents import Team
from mlpo_agents.app import AppServer, AppSettings, check_bind, create_app
from mlpo_agents.config import ConfigError
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = TraceStore(tmp_path_factory.mktemp("app") / "traces.sqlite")
    slow = scripted_team({"leader": ScriptedModel("slow-leader", "<answer>5</answer>")}, name="slow",
                         topology="tests.test_team_api:build_slow_solo")
    teams = [Team.load("tiny", traces=store), Team.load(slow, traces=store)]
    with AppServer(create_app(teams, AppSettings(keepalive_s=0.1, max_request_bytes=50_000))) as running:
        yield running, store
    store.close()


def client(url, key="unused"):
    return OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def test_models_lists_the_teams(server):
    srv, _ = server
    assert [m.id for m in client(srv.url).models.list()] == ["tiny", "slow"]


def test_a_reply_carries_its_episode_and_n_choices_from_one_leader_group(server):
    srv, store = server
    raw = client(srv.url).chat.completions.with_raw_response.create(model="tiny", messages=QUESTION, n=2)
    reply = raw.parse()
    episode_id = raw.headers["x-episode-id"]
    assert reply.episode_id == episode_id and reply.model == "tiny"
    (episode,) = [e for e in store.episodes() if e.episode_id == episode_id]
    assert episode.status == "done" and episode.team == "tiny"
    leader = sorted(store.calls(episode_id=episode_id, role="leader"), key=lambda c: c.sample_index)
    assert [c.message.content for c in reply.choices] == [c.text for c in leader]
    assert len({c.group_id for c in leader}) == 1 and len(leader) == 2
    calls = store.calls(episode_id=episode_id)
    assert reply.usage.completion_tokens == sum(c.completion_tokens for c in calls)
    assert [t["call_id"] for t in reply.mlpo["turns"]] == [c.call_id for c in calls]


def test_streaming_sends_turns_then_the_answer(server):
    srv, store = server
    stream = client(srv.url).chat.completions.create(
        model="tiny", messages=QUESTION, stream=True, extra_body={"include_turns": True},
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    episode_id = chunks[0].episode_id
    turns = [c.model_extra["mlpo_turn"] for c in chunks if "mlpo_turn" in (c.model_extra or {})]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    (leader,) = store.calls(episode_id=episode_id, role="leader")
    assert [t["agent"] for t in turns][-1] == "leader" and len(turns) == 3
    assert text == leader.text
    first_content = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
    assert max(i for i, c in enumerate(chunks) if "mlpo_turn" in (c.model_extra or {})) < first_content
    assert chunks[-1].usage.completion_tokens == sum(c.completion_tokens for c in store.calls(episode_id=episode_id))
    assert {c.episode_id for c in chunks} == {episode_id}


def test_bad_requests_get_clear_4xx(server):
    srv, _ = server
    post = lambda body, path="/chat/completions": httpx.post(srv.url + path, content=body,  # noqa: E731
                                                              headers={"content-type": "application/json"})
    cases = [
        (post(b"{not json"), 400, "not valid JSON"),
        (post(json.dumps({"model": "nope", "messages": QUESTION})), 404, "'nope' is not a team served here"),
        (post(json.dumps({"model": "tiny", "messages": []})), 400, "messages"),
        (post(json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "two " * 5000}]})), 400,
         "does not fit the 4096-token context"),
        (post(json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 60_000}]})), 413,
         "over the limit"),
        (post(json.dumps({"model": "slow", "messages": QUESTION, "n": 2})), 400, "cannot draw 2 answers"),
        (post(json.dumps({"episode_id": "nope", "reward": 1}), "/feedback"), 404, "no episode 'nope'"),
        (post(json.dumps({"episode_id": "x"}), "/feedback"), 400, "reward"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]["message"]


def test_an_api_key_is_required_when_set_and_to_bind_beyond_loopback(server):
    _, store = server
    team = Team.load(scripted_team({"leader": ScriptedModel("keyed", "<answer>1</answer>")}, params={"peers": 0}),
                     traces=store)
    with AppServer(create_app([team], AppSettings(api_key="s3cret"))) as srv:
        refused = httpx.post(srv.url + "/chat/completions", json={"model": "scripted", "messages": QUESTION})
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        wrong = httpx.get(srv.url + "/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        reply = client(srv.url, key="s3cret").chat.completions.create(model="scripted", messages=QUESTION)
        assert reply.choices[0].message.content == "<answer>1</answer>"
    with pytest.raises(ConfigError, match="needs --api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "s3cret")
    check_bind("127.0.0.1", None)


def test_a_client_that_leaves_mid_episode_leaves_a_consistent_store(server):
    srv, store = server
    body = {"model": "slow", "messages": QUESTION, "stream": True, "include_turns": True}
    with httpx.stream("POST", srv.url + "/chat/completions", json=body, timeout=30) as response:
        episode_id = response.headers["x-episode-id"]
        for line in response.iter_lines():
            if line.startswith("event: mlpo.turn"):
                break  # the leader answered; the episode now waits: leave
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        (episode,) = [e for e in store.episodes() if e.episode_id == episode_id]
        if episode.status != "running":
            break
        time.sleep(0.1)
    assert episode.status == "interrupted"
    assert [f.error_type for f in store.failures(episode_id=episode_id)] == ["Cancelled"]
    assert len(store.calls(episode_id=episode_id)) == 1


def test_the_app_loop_feedback_offline_mlpo_hot_reload(tmp_path):
    """Chat with n=2 choices, feedback per choice, offline MLPO on the recorded groups, hot-load the adapter:
    the leader's recorded version changes."""
    from mlpo_agents.trainers.mlpo import MLPOConfig, train

    with pytest.raises(ValueError, match="reward_name='feedback': online rollouts record `correct`"):
        MLPOConfig(reward_name="feedback")
    traces = tmp_path / "app.sqlite"
    store = TraceStore(traces)
    team = Team.load("tiny", traces=store)
    with AppServer(create_app([team])) as srv:
        api = client(srv.url)
        for question in ("What is 2 + 3?", "What is 7 - 4?"):
            reply = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], n=2)
            for choice in reply.choices:  # the user liked the first answer, not the second
                done = httpx.post(srv.url + "/feedback", json={
                    "episode_id": reply.episode_id, "reward": 1.0 - choice.index, "choice": choice.index,
                    "reason": "thumbs up" if choice.index == 0 else "thumbs down"})
                assert done.status_code == 200 and done.json()["call_id"]
        assert reply.mlpo["versions"]["leader"] == "base"

        result = train(MLPOConfig(team="tiny", offline=True, traces=str(traces), reward_name="feedback",
                                  out=str(tmp_path / "mlpo"), steps=1, group_size=2, questions_per_step=2,
                                  lr=5e-2, progress=False, eval_questions=0))
        assert result.steps == 1 and (result.adapter / "adapter_config.json").is_file()
        assert result.history[-1]["batch/groups"] == 2 and result.history[-1]["grad_norm"] > 0  # a real update

        loaded = httpx.post(srv.url + "/adapters", json={"model": "tiny", "path": str(result.adapter)})
        assert loaded.status_code == 200, loaded.text
        version = loaded.json()["version"]
        after = api.chat.completions.create(model="tiny", messages=QUESTION)
        assert version == "step-1" and after.mlpo["versions"]["leader"] == version
        assert {c.version for c in store.calls(episode_id=after.episode_id, role="leader")} == {version}
        assert {c.version for c in store.calls(episode_id=after.episode_id, role="peer")} == {"base"}
    store.close()
