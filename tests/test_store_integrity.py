"""A trace store is whole on disk once written, and a store that cannot be used is refused untouched."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from mlpo_agents import cli
from mlpo_agents.runner import run_team
from mlpo_agents.tasks.base import Task
from mlpo_agents.testing import ScriptedModel, scripted_team
from mlpo_agents.trace import Episode, TraceStore
from mlpo_agents.trace_check import TraceStoreError
from tests.test_trace import make_call

TASK = Task(id="t/0", question="What is 2+2?", answer="4", kind="math", meta={})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def filled_store(path: Path, calls: int = 40) -> Path:
    store = TraceStore(path)
    store.append([Episode("e1", "unit", "t/0", "team", "leader_peers"), *(make_call("e1", i) for i in range(calls))])
    store.close()
    return path


# ---- whole on disk --------------------------------------------------------------------------------
def test_the_store_file_alone_holds_a_finished_run(tmp_path):
    team = scripted_team({"leader": ScriptedModel("whole-leader", "<answer>4</answer>")}, params={"peers": 0})
    store = TraceStore(tmp_path / "traces.sqlite")
    asyncio.run(run_team(team, [TASK], store, task_name="unit", progress=False))
    # The writer is still open (as in `mlpo run` until the process exits); a backup copies the .sqlite only.
    shutil.copy(tmp_path / "traces.sqlite", tmp_path / "copy.sqlite")
    copy = TraceStore(tmp_path / "copy.sqlite")
    assert [e.status for e in copy.episodes()] == ["done"] and len(copy.calls()) == 1


def test_a_client_bound_to_another_store_records_the_episode_calls_beside_the_episode(tmp_path):
    """Trainers evaluate through their training client into a separate evaluation store: every call of an
    evaluation episode must land in that store, and none in the training store."""
    from mlpo_agents.models import ModelClient

    team = scripted_team({"leader": ScriptedModel("bound-leader", "<answer>4</answer>")}, params={"peers": 0})
    training, evaluation = TraceStore(tmp_path / "traces.sqlite"), TraceStore(tmp_path / "eval.sqlite")
    client = ModelClient(team, training)
    asyncio.run(run_team(team, [TASK], evaluation, task_name="unit", progress=False, client=client))
    [episode] = evaluation.episodes()
    assert [c.episode_id for c in evaluation.calls()] == [episode.episode_id]
    assert training.calls() == [] and training.episodes() == []
    assert client.store is training and client.stats["calls"] == 1  # the caller's client is unchanged, stats shared


def test_close_folds_the_wal_into_the_file(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    reader = sqlite3.connect(tmp_path / "t.sqlite")  # another connection keeps SQLite from cleaning up itself
    store.append([Episode("e1", "unit", "t/0", "team", "leader_peers"), make_call("e1", 0)])
    store.close()
    wal = tmp_path / "t.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    reader.close()


def test_traces_show_warns_about_an_empty_store_without_its_wal(tmp_path, capsys):
    TraceStore(tmp_path / "empty.sqlite").close()
    assert cli.main(["traces", "show", "--traces", str(tmp_path / "empty.sqlite")]) == 0
    err = capsys.readouterr().err
    assert "holds no episodes and no empty.sqlite-wal is beside it" in err and "copy the -wal file too" in err
    assert cli.main(["traces", "export", "--traces", str(tmp_path / "empty.sqlite"),
                     "--out", str(tmp_path / "o.jsonl")]) == 0
    assert "copy the -wal file too" in capsys.readouterr().err

    filled_store(tmp_path / "full.sqlite", calls=1)
    assert cli.main(["traces", "show", "--traces", str(tmp_path / "full.sqlite")]) == 0
    assert "warning" not in capsys.readouterr().err


# ---- unusable stores are refused before anything is written ----------------------------------------
def corrupt_one_page(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) >= 6 * page, len(data)
    data[3 * page: 4 * page] = b"\xa5" * page  # one b-tree page of the calls table
    path.write_bytes(bytes(data))


def foreign_app(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO users VALUES (1, 'ada')")
    db.commit()
    db.close()


def old_store(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE episodes (episode_id TEXT PRIMARY KEY, task TEXT, status TEXT)")
    db.execute("CREATE TABLE calls (call_id TEXT PRIMARY KEY, episode_id TEXT, text TEXT)")
    db.commit()
    db.close()


def read_only(path: Path) -> None:
    filled_store(path, calls=2)
    path.chmod(0o444)


def not_sqlite(path: Path) -> None:
    path.write_text("this is not sqlite" * 100)


BAD_STORES = {
    "corrupted": (lambda p: corrupt_one_page(filled_store(p)), "is corrupted .*restore it from a backup"),
    "foreign": (foreign_app, r"is not a trace store \(it holds the tables users of another application\)"),
    "missing columns": (old_store, "not a trace store of this version: table episodes lacks the columns task_id, team"),
    "read-only": (read_only, r"is read-only; make it writable \(chmod u\+w"),
    "not sqlite": (not_sqlite, "is not a trace store .*not an SQLite file"),
}


@pytest.mark.parametrize("kind", list(BAD_STORES))
def test_an_unusable_store_is_refused_with_the_fix_and_left_untouched(tmp_path, kind):
    path = tmp_path / "traces.sqlite"
    make, message = BAD_STORES[kind]
    make(path)
    before = sha(path)
    with pytest.raises(TraceStoreError, match=message) as info:
        TraceStore(path)
    assert str(path) in str(info.value) and "--traces" in str(info.value) and "\n" not in str(info.value)
    assert sha(path) == before


@pytest.mark.parametrize("kind", list(BAD_STORES))
def test_mlpo_run_prints_one_line_and_loads_no_model(tmp_path, kind, capsys, monkeypatch):
    import mlpo_agents.models
    import mlpo_agents.team  # imported first, so it binds the real client and the patch below is undone for it too

    def no_model(*args, **kwargs):
        raise AssertionError("a model client was built before the store was checked")

    monkeypatch.setattr(mlpo_agents.models, "ModelClient", no_model)
    monkeypatch.setattr(mlpo_agents.team, "ModelClient", no_model)
    path = tmp_path / "traces.sqlite"
    BAD_STORES[kind][0](path)
    before = sha(path)
    code = cli.main(["run", "--team", "tiny", "--task", "arithmetic", "--limit", "1", "--traces", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err[-1].startswith("mlpo run: error: ") and str(path) in err[-1]
    assert not any("Traceback" in line for line in err)
    assert sha(path) == before
