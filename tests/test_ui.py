"""`mlpo ui`: the JSON endpoints return what the store holds, read-only; bad input is one line; and
(`browser` tier) a real headless chromium shows an episode's calls and rewards as the store has them."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest

from mlpo_agents.cli import main
from mlpo_agents.trace import Episode, Failure, ModelCall, Reward, TraceStore
from mlpo_agents.trace_check import TraceStoreError
from mlpo_agents.ui import Viewer, make_server, open_read_only
from tests import pg_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
LEADER_TEXT = "The answer is <answer>4</answer>"


def tiny_ids(text: str) -> list[int]:
    from mlpo_agents.zoo import build_tiny_tokenizer

    return build_tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def call(episode_id: str, call_id: str, agent: str, round_: int, ids: list[int], **kw) -> ModelCall:
    role = agent.split("-")[0]
    fields = dict(
        call_id=call_id, episode_id=episode_id, node=role, role=role, agent=agent, round=round_, group_id=f"g-{call_id}",
        sample_index=0, messages=[{"role": "user", "content": f"What is 2+2? ({agent} asks)"}], text=f"{agent} says 4",
        prompt_token_ids=[1, 2, 3], completion_token_ids=ids, logprobs=[-0.25 * (i + 1) for i in range(len(ids))],
        finish_reason="stop", model="local/x", base_model="no-such-local-model", version="base",
        sampling={"temperature": 0.7}, latency_s=0.5, prompt_tokens=3, completion_tokens=len(ids),
    )
    return ModelCall(**{**fields, **kw})


def fill_store(path: Path) -> None:
    """Two episodes: e1 (peer, then a leader on tiny-test whose tokens decode; rewards) and e2 (a failure)."""
    leader_ids = tiny_ids(LEADER_TEXT)
    with TraceStore(path) as store:
        store.append([
            Episode("e1", "arithmetic", "arithmetic/test/0", "team-a", "leader_peers", status="done", final_answer="4",
                    started_at=100.0, finished_at=103.5),
            call("e1", "c1", "peer-1", 0, [11, 12, 13]),
            call("e1", "c2", "leader", 1, leader_ids, base_model="tiny-test", version="step-2", text=LEADER_TEXT,
                 messages=[{"role": "system", "content": "lead"}, {"role": "user", "content": "peer-1 said 4"}]),
            Reward("e1", "correct", 1.0, meta={"reason": "right", "extracted": "4"}),
            Reward("e1", "format", 0.5, call_id="c2", meta={"reason": "closed block"}),
            Episode("e2", "arithmetic", "arithmetic/test/1", "team-a", "leader_peers", status="degraded",
                    final_answer="5", started_at=200.0, finished_at=201.0),
            call("e2", "c3", "peer-1", 0, [21, 22]),
            Failure("e2", "peer", "peer", "peer-2", 0, "Timeout", "peer-2 took too long"),
            Reward("e2", "correct", 0.0, meta={"reason": "wrong", "extracted": "5"}),
        ])


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "runs" / "traces.sqlite"
    fill_store(path)
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "train"
    folder.mkdir()
    rows = [{"step": 1, "time": 1.0, "loss": 0.5, "version": "step-1"}, {"step": 2, "loss": 0.25, "reward/mean": 0.75}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    (folder / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\nnot-really")
    return folder


def serve(url: str | Path, run_dirs=()):
    """Start a server on a free loopback port in a thread; returns (base url, stop)."""
    store = open_read_only(url)
    server = make_server(Viewer(store, run_dirs), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        store.close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop


@pytest.fixture
def base(store_path, run_dir):
    url, stop = serve(store_path, [run_dir])
    yield url
    stop()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str) -> dict:
    status, body = get(url)
    assert status == 200, body
    return json.loads(body)


def expected_episode(store_path: Path, episode_id: str) -> dict:
    with TraceStore(store_path) as store:
        calls = [{k: v for k, v in asdict(c).items() if k != "prompt_token_ids"} for c in store.calls(episode_id=episode_id)]
        return {"episode": asdict(next(e for e in store.episodes() if e.episode_id == episode_id)), "calls": calls,
                "rewards": [asdict(r) for r in store.rewards(episode_id=episode_id)],
                "failures": [asdict(f) for f in store.failures(episode_id=episode_id)]}


def test_episode_endpoint_returns_the_store_token_exact(base, store_path):
    from mlpo_agents.zoo import build_tiny_tokenizer

    want = expected_episode(store_path, "e1")
    got = get_json(f"{base}/api/episode/e1")
    texts = [c.pop("token_texts") for c in got["calls"]]
    assert got == want
    assert texts[0] is None  # no tokenizer for this base model on this machine: the page shows ids
    tok = build_tiny_tokenizer()
    assert texts[1] == [tok.decode([i]) for i in want["calls"][1]["completion_token_ids"]]
    assert "".join(texts[1]) == LEADER_TEXT
    e2 = get_json(f"{base}/api/episode/e2")
    assert e2["failures"] == expected_episode(store_path, "e2")["failures"]
    assert get(f"{base}/api/episode/nope")[0] == 404


def test_episodes_list_totals_and_filters(base):
    rows = {e["episode_id"]: e for e in get_json(f"{base}/api/episodes")["episodes"]}
    assert list(rows) == ["e2", "e1"]  # newest first
    e1 = rows["e1"]
    assert (e1["status"], e1["calls"], e1["versions"], e1["failures"]) == ("done", 2, ["base", "step-2"], 0)
    assert e1["prompt_tokens"] == 6 and e1["completion_tokens"] == 3 + len(tiny_ids(LEADER_TEXT))
    assert e1["rewards"] == {"correct": 1.0} and e1["wall_s"] == 3.5 and e1["call_s"] == 1.0
    assert rows["e2"]["failures"] == 1 and rows["e2"]["rewards"] == {"correct": 0.0}
    ids = lambda query: [e["episode_id"] for e in get_json(f"{base}/api/episodes?{query}")["episodes"]]  # noqa: E731
    assert ids("status=degraded") == ["e2"]
    assert ids("version=step-2") == ["e1"]
    assert ids("team=team-a&task=arithmetic") == ["e2", "e1"] and ids("team=other") == []
    assert ids("q=test/1") == ["e2"] and ids("limit=1") == ["e2"]


def test_runs_curves_and_page(base, run_dir):
    runs = get_json(f"{base}/api/runs")
    (group,) = runs["groups"]
    assert group == {"team": "team-a", "task": "arithmetic", "episodes": 2, "status": {"done": 1, "degraded": 1},
                     "accuracy": 0.5, "versions": ["base", "step-2"], "completion_tokens": 5 + len(tiny_ids(LEADER_TEXT))}
    (folder,) = runs["run_dirs"]
    assert folder["name"] == "train" and folder["steps"] == 2 and folder["png"] and folder["last"]["loss"] == 0.25
    curves = get_json(f"{base}/api/curves?run=train")
    assert curves["series"] == {"loss": [[1, 0.5], [2, 0.25]], "reward/mean": [[2, 0.75]]}  # partial line skipped
    assert get(f"{base}/api/curves/train.png") == (200, (run_dir / "curves.png").read_bytes())
    assert get(f"{base}/api/curves?run=../etc")[0] == 404
    status, page = get(f"{base}/")
    assert status == 200 and b"/api/episodes" in page
    for attribute in (b'src="http', b"src='http", b'href="http', b"@import", b"url(http"):
        assert attribute not in page  # nothing fetched from the network
    assert get(f"{base}/api/runs", {"Host": "attacker.example"})[0] == 403  # DNS rebinding


def test_reads_only_and_follows_a_writer(store_path, run_dir):
    digest = hashlib.sha256(store_path.read_bytes()).hexdigest()
    url, stop = serve(store_path, [run_dir])
    try:
        for path in ("/", "/api/runs", "/api/episodes", "/api/episode/e1", "/api/curves?run=train"):
            assert get(url + path)[0] == 200
        with pytest.raises(TraceStoreError, match="read-only"):
            open_read_only(store_path).append(Episode("x", "t", "t/0", "team", "topo"))
        assert hashlib.sha256(store_path.read_bytes()).hexdigest() == digest  # the viewer wrote nothing
        with TraceStore(store_path) as writer:  # a run still writing: the next poll shows its new episode
            writer.append(Episode("e3", "arithmetic", "arithmetic/test/2", "team-a", "leader_peers", started_at=300.0))
            assert [e["episode_id"] for e in get_json(f"{url}/api/episodes")["episodes"]][0] == "e3"
            assert get_json(f"{url}/api/episode/e3")["episode"]["status"] == "running"
    finally:
        stop()


def fails(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line_with_the_fix(capsys, tmp_path, store_path):
    missing = tmp_path / "nope.sqlite"
    line = fails(capsys, "ui", "--traces", str(missing))
    assert f"no trace store at {missing}" in line and "mlpo run" in line and not missing.exists()
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (x)")
    assert "is not a trace store" in fails(capsys, "ui", "--traces", str(other))
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a database at all" * 20)
    assert "is not a trace store" in fails(capsys, "ui", "--traces", str(text))
    assert "--run-dir" in fails(capsys, "ui", "--traces", str(store_path), "--run-dir", str(tmp_path / "no-run"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line = fails(capsys, "ui", "--traces", str(store_path), "--port", str(taken.getsockname()[1]))
    assert "pass another --port" in line


@pytest.fixture(scope="module")
def pg_admin_url():
    if not pg_server.available():
        if os.environ.get("CI"):
            pytest.fail("CI must test the Postgres trace store: install postgresql and psycopg (make setup)")
        pytest.skip("PostgreSQL server binaries or psycopg not installed")
    with pg_server.postgres_server() as url:
        yield url


def test_postgres_store_read_only(pg_admin_url, tmp_path):
    import psycopg

    from mlpo_agents.trace import open_store

    urls = {}
    for name in ("ui_traces", "ui_empty"):
        with psycopg.connect(pg_admin_url, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        urls[name] = pg_admin_url.rsplit("/", 1)[0] + "/" + name
    fill_store(tmp_path / "t.sqlite")
    with TraceStore(tmp_path / "t.sqlite") as source, open_store(urls["ui_traces"]) as pg:
        for kind in (source.episodes(), source.calls(), source.rewards(), source.failures()):
            pg.append(kind)
    url, stop = serve(urls["ui_traces"])
    try:
        got = get_json(f"{url}/api/episode/e1")
        for c in got["calls"]:
            c.pop("token_texts")
        assert got == expected_episode(tmp_path / "t.sqlite", "e1")
    finally:
        stop()
    with pytest.raises(TraceStoreError, match="is not a trace store"):
        open_read_only(urls["ui_empty"])
    with psycopg.connect(urls["ui_empty"]) as db:  # refused without creating the tables
        assert db.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'").fetchone()[0] == 0


# ---- browser tier --------------------------------------------------------------------------------------
@pytest.fixture
def browser(monkeypatch):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {', '.join(missing)} missing (make setup-browser, make setup)")
        pytest.skip(f"{', '.join(missing)} not installed (make setup-browser)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="mlpo-chromium-")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.mark.browser
def test_page_shows_an_episode_as_the_store_has_it(browser, base, store_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(base + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-episode='e1']"))
    assert [r.get_attribute("data-episode") for r in browser.find_elements(By.CSS_SELECTOR, "tr[data-episode]")] == ["e2", "e1"]
    browser.find_element(By.CSS_SELECTOR, "tr[data-episode='e1']").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".call")) == 2)
    want = expected_episode(store_path, "e1")
    cards = browser.find_elements(By.CSS_SELECTOR, ".call")
    assert [c.get_attribute("data-call") for c in cards] == [c["call_id"] for c in want["calls"]]
    for card, c in zip(cards, want["calls"], strict=True):
        assert card.find_element(By.CSS_SELECTOR, ".head b").text == c["agent"]
        tokens = card.find_elements(By.CSS_SELECTOR, ".tokens span")
        assert [t.get_attribute("title").split()[1] for t in tokens] == [str(i) for i in c["completion_token_ids"]]
        assert [float(t.get_attribute("title").split()[3]) for t in tokens] == pytest.approx(c["logprobs"], abs=1e-4)
    assert cards[1].find_element(By.CSS_SELECTOR, ".tokens").get_attribute("textContent") == LEADER_TEXT
    rewards = lambda css: [r.get_attribute("textContent") for r in browser.find_elements(By.CSS_SELECTOR, css)]  # noqa: E731
    assert rewards(".call[data-call='c2'] .side .reward") == ["format 0.500 closed block"]
    assert rewards(".call[data-call='c1'] .side .reward") == []
    assert rewards("#episode-rewards .reward") == ["correct 1 right “4”"]
    assert [h.text for h in browser.find_elements(By.CSS_SELECTOR, ".round h3")] == ["Round 0", "Round 1"]
    browser.find_element(By.CSS_SELECTOR, "tr[data-episode='e2']").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".failure"))
    assert "peer-2 r0 Timeout: peer-2 took too long" in browser.find_element(By.CSS_SELECTOR, ".failure").text
