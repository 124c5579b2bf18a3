"""TraceStore: round trips, exports, resume bookkeeping, atomic batches."""

from __future__ import annotations

import itertools
import json
import os

import pyarrow.parquet as pq
import pytest

from mlpo_agents.trace import Episode, Failure, ModelCall, Reward, TraceStore, group_events, open_store
from tests import pg_server

_db_numbers = itertools.count()


@pytest.fixture(scope="session")
def pg_admin_url():
    if not pg_server.available():
        if os.environ.get("CI"):
            pytest.fail("CI must test the Postgres trace store: install postgresql and psycopg (make setup)")
        pytest.skip("PostgreSQL server binaries or psycopg not installed")
    with pg_server.postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def open_fresh(request, tmp_path):
    """Opens the same store again by name: a SQLite file, or a fresh Postgres database."""
    if request.param == "sqlite":
        return lambda: TraceStore(tmp_path / "t.sqlite")
    import psycopg

    admin = request.getfixturevalue("pg_admin_url")
    name = f"traces_{next(_db_numbers)}"
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    url = admin.rsplit("/", 1)[0] + "/" + name
    return lambda: open_store(url)


def make_call(episode_id: str, i: int, group: str = "g1") -> ModelCall:
    return ModelCall(
        call_id=f"c{i}", episode_id=episode_id, node="leader", role="leader", agent="leader", round=0,
        group_id=group, sample_index=i, messages=[{"role": "user", "content": "2+2?"}], text=f"<answer>{i}</answer>",
        prompt_token_ids=[1, 2, 3, 70000], completion_token_ids=[5, 6, 2**31 - 1], logprobs=[-0.25, -1.5, -3.125],
        finish_reason="stop", model="local/tiny-test", base_model="tiny-test", version="base",
        sampling={"temperature": 0.7, "n": 2}, latency_s=0.1, prompt_tokens=4, completion_tokens=3,
    )


def test_round_trip_keeps_token_ids_and_logprobs_exact(open_fresh):
    store = open_fresh()
    store.append([Episode("e1", "gsm8k", "gsm8k/test/0", "default", "leader_peers"), make_call("e1", 0), make_call("e1", 1)])
    store.append([Reward("e1", "correct", 1.0, call_id="c0"), Failure("e1", "peer", "peer", "peer-2", 0, "Timeout", "slow")])
    store.close()

    store = open_fresh()
    calls = store.calls(episode_id="e1")
    assert [c.call_id for c in calls] == ["c0", "c1"]
    assert calls[0].prompt_token_ids == [1, 2, 3, 70000]
    assert calls[0].completion_token_ids == [5, 6, 2**31 - 1]
    assert calls[0].logprobs == [-0.25, -1.5, -3.125]  # exactly representable in float32
    assert calls[0].messages == [{"role": "user", "content": "2+2?"}] and calls[0].sampling["n"] == 2
    assert store.rewards(episode_id="e1")[0].call_id == "c0"
    assert store.failures()[0].agent == "peer-2"
    assert list(group_events(calls)) == ["g1"]


def test_episode_status_updates_and_resume_set(open_fresh):
    store = open_fresh()
    ep = Episode("e1", "gsm8k", "row-1", "default", "leader_peers")
    store.append(ep)
    store.append(Episode("e2", "gsm8k", "row-2", "default", "leader_peers"))
    assert store.finished_task_ids("gsm8k", "default") == set()
    ep.status, ep.final_answer = "degraded", "4"
    store.append(ep)
    assert store.finished_task_ids("gsm8k", "default") == {"row-1"}
    assert store.finished_task_ids("gsm8k", "other-team") == set()
    assert [e.status for e in store.episodes()] == ["degraded", "running"]


def test_a_failing_batch_writes_nothing(open_fresh):
    store = open_fresh()
    store.append(make_call("e1", 0))
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        store.append([make_call("e1", 1), make_call("e1", 0)])  # duplicate call_id aborts the batch
    assert [c.call_id for c in store.calls()] == ["c0"]


def test_a_failing_single_event_writes_nothing_and_the_store_goes_on(open_fresh):
    store = open_fresh()
    store.append(make_call("e1", 0))
    with pytest.raises(Exception, match="(?i)unique|duplicate"):
        store.append(make_call("e1", 0))  # one event is written on its own, without a batch around it
    store.append(make_call("e1", 1))
    assert [c.call_id for c in store.calls()] == ["c0", "c1"]


def test_export_jsonl_and_parquet(open_fresh, tmp_path):
    store = open_fresh()
    store.append([Episode("e1", "arithmetic", "a/0", "tiny", "leader_peers"), make_call("e1", 0),
                  Reward("e1", "correct", 0.0)])
    n = store.export_jsonl(tmp_path / "out.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == 3 and [row["kind"] for row in lines] == ["episodes", "calls", "rewards"]
    assert lines[1]["completion_token_ids"] == [5, 6, 2**31 - 1]
    paths = store.export_parquet(tmp_path / "pq")
    calls = pq.read_table(tmp_path / "pq" / "calls.parquet").to_pylist()
    assert len(paths) == 4 and calls[0]["logprobs"] == [-0.25, -1.5, -3.125]


def test_not_a_database_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_text("this is not sqlite" * 100)
    with pytest.raises(ValueError, match="is not a trace store .*not an SQLite file"):
        TraceStore(bad)


def test_postgres_that_is_down_gives_a_clear_error():
    pytest.importorskip("psycopg")
    with pytest.raises(ValueError, match="cannot connect to the trace store.*is the server up"):
        open_store("postgresql://postgres@127.0.0.1:9/none?connect_timeout=2")


def test_resume_marks_running_episodes_interrupted(open_fresh):
    store = open_fresh()
    store.append([Episode("e1", "unit", "r1", "team", "lp"), Episode("e2", "unit", "r2", "team", "lp"),
                  Episode("e3", "unit", "r3", "other-team", "lp")])
    assert store.mark_interrupted("unit", "team", keep=["e2"]) == 1
    assert [e.status for e in store.episodes()] == ["interrupted", "running", "running"]
    assert store.unfinished_episodes("unit", "team") == {"r1": "e1", "r2": "e2"}  # a checkpoint can still continue
    assert store.finished_task_ids("unit", "team") == set()
    store.checkpoint()


def test_postgres_tables_missing_columns_are_refused(pg_admin_url):
    import psycopg

    from mlpo_agents.trace_check import TraceStoreError

    name = f"traces_{next(_db_numbers)}"
    with psycopg.connect(pg_admin_url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    url = pg_admin_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE TABLE episodes (episode_id TEXT PRIMARY KEY, status TEXT)")
    with pytest.raises(TraceStoreError, match=f"{name} is not a trace store of this version: table episodes lacks"):
        open_store(url)
    with psycopg.connect(url) as db:  # refused before anything was created
        assert [r[0] for r in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")] == ["episodes"]
