"""The adapter lifecycle (`mlpo_agents.adapters`) on the tiny in-process model: save / load metadata, the
base-model check, hot-loading into the engine serving a role, and seeded runs without a team swap."""

from __future__ import annotations

import asyncio
import json

import pytest

from mlpo_agents import Team, adapters
from mlpo_agents.adapters import ADAPTER_META_FILE, AdapterMismatchError, hot_load
from mlpo_agents.config import ConfigError, load_team
from mlpo_agents.models import ModelClient
from mlpo_agents.trace import TraceStore

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture
def store(tmp_path):
    s = TraceStore(tmp_path / "traces.sqlite")
    yield s
    s.close()


@pytest.fixture
def team():
    return load_team("tiny")


def saved(folder, base_model="tiny-test", **meta):
    from mlpo_agents.trainers.lora import LoraSettings, attach_lora

    return adapters.save(attach_lora("tiny-test", LoraSettings(r=2, alpha=4)), folder, base_model, meta=meta)


def foreign(folder, base_model="smollm2-135m"):
    meta = json.loads((folder / ADAPTER_META_FILE).read_text())
    (folder / ADAPTER_META_FILE).write_text(json.dumps({**meta, "base_model": base_model}))
    return folder


def ask(client, role="leader", **overrides):
    return asyncio.run(client.acomplete(QUESTION, role=role, max_tokens=2, episode_id="e", **overrides))


def test_save_and_load_keep_the_base_model_and_the_extra_metadata(tmp_path):
    folder = saved(tmp_path / "a", step=3)
    meta = adapters.load(folder)
    assert meta["base_model"] == "tiny-test" and meta["step"] == 3 and meta["format"] == "peft-lora"
    assert adapters.check_base_model(folder, "tiny-test") == "tiny-test"
    with pytest.raises(FileNotFoundError, match=ADAPTER_META_FILE):
        adapters.load(tmp_path)


def test_hot_load_routes_the_role_and_records_the_version_in_the_trace(tmp_path, team, store):
    client = ModelClient(team, store)
    name = hot_load(client, "leader", saved(tmp_path / "step-1"))
    assert name == "step-1" and client.version_of("leader") == "step-1" and client.version_of("peer") == "base"
    ask(client)
    ask(client, role="peer")
    versions = {c.role: (c.version, c.base_model) for c in store.calls()}
    assert versions == {"leader": ("step-1", "tiny-test"), "peer": ("base", "tiny-test")}
    assert hot_load(client, "leader", tmp_path / "step-1", "renamed") == "renamed"
    assert client.version_of("leader") == "renamed"


def test_an_adapter_of_another_base_model_is_refused_with_both_names(tmp_path, team, store):
    folder = foreign(saved(tmp_path / "other"))
    client = ModelClient(team, store)
    with pytest.raises(AdapterMismatchError) as refused:
        hot_load(client, "leader", folder)
    message = str(refused.value)
    assert "\n" not in message and "'smollm2-135m'" in message and "'tiny-test'" in message
    assert client.version_of("leader") == "base"  # nothing was routed

    served = Team.load(team, traces=store)
    with pytest.raises(AdapterMismatchError, match="trained on base model 'smollm2-135m', not 'tiny-test'"):
        served.use_adapter(folder)
    assert served.version_of() == "base"


def test_seeded_sampling_needs_no_team_swap(tmp_path, team, store):
    """A per-run team (seeded sampling) runs through a view of the client: the client keeps its team, and
    adapters routed on either side serve both."""
    from mlpo_agents.graphs.nodes import question_seed
    from mlpo_agents.tasks import load_task
    from mlpo_agents.trainers.common import run_episodes
    from mlpo_agents.trainers.run import seeded_team

    client = ModelClient(team, store)
    seeded = seeded_team(team, 1234, roles=["leader"])
    view = client.with_team(seeded)
    assert view.team is seeded and client.team is team
    hot_load(client, "leader", saved(tmp_path / "v1"))
    assert view.version_of("leader") == "v1"  # routing is shared

    tasks = load_task("arithmetic", split="train", limit=1, seed=0)
    run_episodes(client, seeded.model_copy(update={"params": {"peers": 0, "rounds": 1}}), tasks, store,
                 task_name="arithmetic", concurrency=1, progress=False)  # fmt: skip
    assert client.team is team
    leader = [c for c in store.calls() if c.role == "leader"]
    # The leader samples with its seed mixed with the question (graphs.nodes.call_seed), from the adapter.
    expected_seed = question_seed(1234, "leader", tasks[0].id)
    assert leader and {(c.version, c.sampling.get("seed")) for c in leader} == {("v1", expected_seed)}

    other = team.model_copy(update={"model_list": [{"model_name": "tiny", "litellm_params": {"model": "local/x"}}]})
    with pytest.raises(ConfigError, match="deploys other models"):
        client.with_team(other)
