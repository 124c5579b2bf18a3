"""`mlpo eval`: outputs on the tiny model, resume counted from the trace store, Wilson CI, bad names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlpo_agents.cli import main
from mlpo_agents.report import wilson_interval
from mlpo_agents.tasks import load_task
from mlpo_agents.testing import ScriptedModel, register_scripted_provider
from mlpo_agents.trace import TraceStore
from tests._commands import DATA  # noqa: E402 - $MLPO_DATA_DIR, else ../shared/data

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark folder {DATA} not found")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def eval_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["eval", "--runs-dir", str(tmp_path), "--name", "e", "--data-dir", str(DATA), "--quiet", *extra]


def cells(tmp_path: Path) -> dict[tuple[str, str], dict]:
    report = json.loads((tmp_path / "e" / "results.json").read_text())
    return {(c["team"], c["task"]): c for c in report["cells"]}


def test_wilson_interval_matches_hand_computed_values():
    # 7/10, z = 1.96: centre = (0.7 + z²/20) / (1 + z²/10) = 0.64449,
    # half = z·sqrt(0.7·0.3/10 + z²/400) / (1 + z²/10) = 0.24772  ->  [0.3968, 0.8922]
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.39677, abs=1e-4) and high == pytest.approx(0.89222, abs=1e-4)
    assert wilson_interval(0, 3) == pytest.approx((0.0, 0.56151), abs=1e-4)  # 0/3: [0, z²/(n+z²)]
    assert wilson_interval(1, 1)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)


@needs_data
def test_eval_two_teams_two_tasks_on_tiny_writes_results_and_plots(tmp_path, capsys):
    args = [
        "--teams",
        "tiny,tiny_debate",
        "--tasks",
        "arithmetic,bbh:navigate",
        "--limit",
        "2",
        "--max-tokens",
        "4",
    ]
    assert main(eval_args(tmp_path, *args)) == 0

    out = tmp_path / "e"
    for name in ("results.json", "results.md", "accuracy.png", "accuracy_vs_tokens.png", "traces.sqlite"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:8] == PNG_MAGIC
    found = cells(tmp_path)
    assert set(found) == {(t, k) for t in ("tiny", "tiny_debate") for k in ("arithmetic", "bbh:navigate")}
    for cell in found.values():
        assert cell["n"] == 2 and cell["failed"] == 0
        assert 0.0 <= cell["ci_low"] <= cell["accuracy"] <= cell["ci_high"] <= 1.0
        assert 0 < cell["completion_tokens_per_q"] <= 4 * cell["calls_per_q"]
    assert (
        found["tiny", "arithmetic"]["calls_per_q"] == 3.0 and found["tiny", "arithmetic"]["answered"] <= 2
    )  # leader + 2 peers, one round
    assert found["tiny_debate", "arithmetic"]["calls_per_q"] == 4.0  # 2 debaters x 2 rounds
    table = (out / "results.md").read_text()
    assert "| tiny_debate | bbh:navigate | 2 |" in table and "95% CI" in table
    assert "| Team | Task |" in capsys.readouterr().out
    store = TraceStore(out / "traces.sqlite")
    assert {e.task for e in store.episodes()} == {"arithmetic", "bbh:navigate"}
    assert {e.team for e in store.episodes()} == {"tiny", "tiny_debate"}


FAILING = {"on": True}


@needs_data
def test_resume_skips_finished_rows_and_the_table_still_counts_them(tmp_path):
    rows = load_task("arithmetic", data_dir=DATA, limit=4, seed=0)
    gold = {t.question: t.answer for t in rows}
    broken, wrong = rows[3].question, rows[2].question

    def reply(messages):
        text = messages[-1]["content"]
        question = next((q for q in gold if q in text), None)
        if question is None:  # a gsm8k question
            return "<answer>0</answer>"
        if question == broken and FAILING["on"]:
            raise RuntimeError("scripted outage")
        return f"<answer>{'-1' if question == wrong else gold[question]}</answer>"

    register_scripted_provider()
    bot = ScriptedModel("eval-bot", reply)
    team = tmp_path / "bot.yaml"
    team.write_text(
        "name: bot\ntopology: leader_peers\nparams: {peers: 0, rounds: 1}\n"
        "model_list: [{model_name: bot, litellm_params: {model: scripted/eval-bot}}]\n"
        "router_settings: {num_retries: 0, timeout: 30}\n"
        "roles: {leader: {model: bot, trainable: true, sampling: {temperature: 0.0}}}\n"
    )
    args = ["--teams", str(team), "--limit", "4", "--no-plots"]
    assert main(eval_args(tmp_path, *args, "--tasks", "arithmetic")) == 0
    first = cells(tmp_path)["bot", "arithmetic"]
    # The outage leaves the leader without an answer: a failed episode, out of the accuracy denominator
    # and flagged as such.
    assert (first["n"], first["correct"], first["degraded"], first["failed"]) == (3, 2.0, 0, 1)

    FAILING["on"] = False
    calls_before = len(bot.seen)
    assert main(eval_args(tmp_path, *args, "--tasks", "arithmetic,gsm8k", "--resume")) == 0
    new_prompts = [m[-1]["content"] for m in bot.seen[calls_before:]]
    # Resume retries the failed row and runs gsm8k; the finished arithmetic rows are not asked again.
    assert len(new_prompts) == 5
    assert [q for q in gold if any(q in p for p in new_prompts)] == [broken]
    second = cells(tmp_path)
    assert (second["bot", "arithmetic"]["n"], second["bot", "arithmetic"]["correct"]) == (4, 3.0)
    assert second["bot", "gsm8k"]["n"] == 4
    assert len(TraceStore(tmp_path / "e" / "traces.sqlite").episodes(task="arithmetic")) == 5
    assert (
        second["bot", "arithmetic"]["answered"] == 4
        and "| bot | arithmetic | 4 | 0.750 |" in (tmp_path / "e" / "results.md").read_text()
    )

    # Without --resume an existing run is not silently mixed into.
    assert main(eval_args(tmp_path, *args, "--tasks", "arithmetic")) == 2


@needs_data
def test_bad_task_name_lists_the_valid_names_before_running_anything(tmp_path, capsys):
    assert main(eval_args(tmp_path, "--teams", "tiny", "--tasks", "gsm8k,gsm9k")) == 2
    err = capsys.readouterr().err
    assert "unknown task 'gsm9k'" in err and "gsm8k" in err and "arithmetic" in err and "mmlu" in err
    assert not (tmp_path / "e").exists()

    assert main(eval_args(tmp_path, "--teams", "tiny,nosuchteam", "--tasks", "gsm8k")) == 2
    assert "built-in teams:" in capsys.readouterr().err


def test_adapter_serves_the_trainable_role_and_renames_the_team(tmp_path):
    from mlpo_agents.evaluate import adapter_label
    from mlpo_agents.trainers.lora import LoraSettings, attach_lora, save_adapter

    folder = save_adapter(
        attach_lora("tiny-test", LoraSettings(r=2, alpha=4)), tmp_path / "trained" / "adapter"
    )
    args = ["--teams", "tiny", "--tasks", "arithmetic", "--limit", "1", "--max-tokens", "2", "--no-plots"]
    assert main(eval_args(tmp_path, *args, "--adapter", str(folder))) == 0

    label = adapter_label(folder)
    assert label == "trained-adapter" and set(cells(tmp_path)) == {("tiny+trained-adapter", "arithmetic")}
    calls = TraceStore(tmp_path / "e" / "traces.sqlite").calls()
    assert {c.version for c in calls if c.role == "leader"} == {label}
    assert {c.version for c in calls if c.role == "peer"} == {"base"}  # frozen peers keep the base weights
