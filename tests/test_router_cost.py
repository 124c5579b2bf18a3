"""Per-call cost switches: `router_usage_tracking: false` drops only its Router's usage callbacks, refuses the
settings that read them, and records exactly the calls the default Router records. No timings here
(benchmarks/bench_overhead.py measures them)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from mlpo_agents.config import ConfigError
from mlpo_agents.graphs.nodes import fan_out, round_loop
from mlpo_agents.models import ModelClient
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import TraceStore

TASK = Task(id="t/0", question="What is 2+2?", answer="4", kind="math", meta={})
VARYING = {"call_id", "episode_id", "group_id", "parent_call_id", "created_at", "latency_s"}


def untracked(team, **settings):
    return team.model_copy(update={"router_usage_tracking": False,
                                   "router_settings": {**team.router_settings, **settings}})


def registered(router) -> dict[str, int]:
    """How many of `router`'s callbacks each of litellm's global callback lists holds."""
    import litellm  # after ModelClient set up litellm (its bundled cost map, no download)

    names = ("success_callback", "_async_success_callback", "failure_callback", "_async_failure_callback")
    return {n: sum(getattr(cb, "__self__", None) is router for cb in getattr(litellm, n)) for n in names}


def team_with(**fields):
    team = scripted_team({"leader": ScriptedModel("cost-leader", "<answer>4</answer>")}, params={"peers": 0})
    data = team.model_dump()
    data.update(fields)
    return data


def test_usage_tracking_off_drops_only_that_routers_success_callbacks():
    team = scripted_team({"leader": ScriptedModel("cost-a", "<answer>4</answer>")}, params={"peers": 0})
    tracked = ModelClient(team).router
    lean = ModelClient(untracked(team, disable_cooldowns=True)).router
    assert registered(tracked) == {"success_callback": 1, "_async_success_callback": 1,
                                   "failure_callback": 1, "_async_failure_callback": 1}
    # Failures still reach the lean Router (its retries and failure bookkeeping are unchanged).
    assert registered(lean) == {"success_callback": 0, "_async_success_callback": 0,
                                "failure_callback": 1, "_async_failure_callback": 1}


@pytest.mark.parametrize("fields, fix", [
    ({"router_usage_tracking": False}, "disable_cooldowns: true"),
    ({"router_usage_tracking": False, "router_settings": {"disable_cooldowns": True,
                                                          "routing_strategy": "usage-based-routing-v2"}},
     "simple-shuffle"),
])
def test_usage_tracking_off_is_refused_where_the_router_reads_the_counts(fields, fix):
    from mlpo_agents.config import parse_team

    with pytest.raises(ConfigError, match=fix):
        parse_team(team_with(**fields), "unit")


def test_usage_tracking_off_is_refused_with_rate_limits():
    from mlpo_agents.config import parse_team

    data = team_with(router_usage_tracking=False, router_settings={"disable_cooldowns": True})
    data["model_list"][0]["litellm_params"]["rpm"] = 60
    with pytest.raises(ConfigError, match="tpm/rpm"):
        parse_team(data, "unit")


def rows(path) -> dict[str, list[dict]]:
    db = sqlite3.connect(path)
    out = {}
    for table in ("calls", "rewards", "episodes"):
        cursor = db.execute(f"SELECT * FROM {table} ORDER BY rowid")
        names = [d[0] for d in cursor.description]
        out[table] = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
    db.close()
    return out


def test_the_lean_router_records_the_same_bytes(tmp_path):
    peer, leader = ScriptedModel("same-peer", "2+2 = <answer>4</answer>"), ScriptedModel("same-leader", "<answer>4</answer>")
    team = scripted_team({"leader": leader, "peer": peer}, params={"peers": 2, "rounds": 2})
    recorded = {}
    for name, t in (("default", team), ("lean", untracked(team, disable_cooldowns=True))):
        store = TraceStore(tmp_path / f"{name}.sqlite")
        asyncio.run(run_team(t, [TASK], store, task_name="unit", client=ModelClient(t, store), progress=False,
                             concurrency=1))
        store.close()
        recorded[name] = rows(tmp_path / f"{name}.sqlite")
    varying = VARYING | {"id", "started_at", "finished_at"}
    default, lean = ({k: [{c: v for c, v in r.items() if c not in varying} for r in t] for k, t in rec.items()}
                     for rec in (recorded["default"], recorded["lean"]))
    for rec in (default, lean):  # parallel peers answer in either order
        rec["calls"].sort(key=lambda r: (r["round"], r["agent"], r["sample_index"]))
    assert len(default["calls"]) == 6 and default == lean  # token ids, logprobs, messages, rewards: same bytes


def test_async_round_loop_takes_a_sync_or_async_next_step():
    state = {"round": 0, "question": "q", "turns": []}
    assert asyncio.run(round_loop(1, lambda s: "again")(state)) == "again"
    sends = asyncio.run(round_loop(1, fan_out("peer", ["peer-1", "peer-2"]))(state))
    assert [s.arg["agent"] for s in sends] == ["peer-1", "peer-2"]
    assert asyncio.run(round_loop(1, "again")({"round": 1})) == "__end__"


def test_clients_built_for_a_run_or_a_team_leave_no_callbacks_behind(tmp_path):
    """litellm keeps every Router's callbacks for the life of the process and runs them all on every call:
    a run that builds its own client, and a Team that built one, unhook theirs when done."""
    import litellm

    from mlpo_agents.team import Team

    names = ("success_callback", "_async_success_callback", "failure_callback", "_async_failure_callback")

    def sizes():
        return {n: len(getattr(litellm, n)) for n in names}

    team = scripted_team({"leader": ScriptedModel("leak-leader", "<answer>4</answer>")}, params={"peers": 0})
    store = TraceStore(tmp_path / "t.sqlite")
    ModelClient(team, store).close()  # litellm set up (its lists exist) before counting
    before = sizes()
    for _ in range(3):
        asyncio.run(run_team(team, [TASK], store, task_name="unit", progress=False))
    assert sizes() == before
    client = ModelClient(team, store)
    assert registered(client.router)["_async_success_callback"] == 1
    client.close()
    assert sizes() == before and sum(registered(client.router).values()) == 0
    owner = Team(team, TraceStore(tmp_path / "u.sqlite"))
    assert sizes() != before
    owner.close()
    assert sizes() == before
