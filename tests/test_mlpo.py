"""MLPO trainer on the tiny model: updates, reproducibility, resume, hot-reload, offline mode, errors, DDP.

The tiny model is random and never answers arithmetic correctly, so the rollout tests score with a
rubric whose `correct` is a deterministic pseudo-reward of the completion text (the trainer is what is
under test, not the model's skill).
"""

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlpo_agents.rewards import RewardResult
from mlpo_agents.rubric import Rubric, use_rubric
from mlpo_agents.trace import ModelCall, Reward, TraceStore
from mlpo_agents.trainers.loop import CheckpointError
from mlpo_agents.trainers.mlpo import MLPOConfig, train

ROOT = Path(__file__).resolve().parents[1]


def pseudo_score(task, completion):
    """1.0 for about half of the texts, fixed per text."""
    value = float(hashlib.sha256(completion.text.encode()).digest()[0] % 2)
    return RewardResult(value, completion.text[-20:], "correct" if value else "wrong")


PSEUDO = Rubric.for_kind("math").replace("correct", pseudo_score)
"""The arithmetic tasks' rubric with the pseudo-reward as `correct`."""


@pytest.fixture
def pseudo_reward():
    with use_rubric(PSEUDO):  # the trainer's rollouts are scored with it
        yield


def config(out, **kw):
    base = dict(
        team="tiny",
        task="arithmetic",
        out=str(out),
        steps=2,
        group_size=3,
        questions_per_step=2,
        train_questions=8,
        lr=5e-2,
        progress=False,
        concurrency=1,
        seed=3,
        easy_threshold=None,
    )
    return MLPOConfig(**{**base, **kw})


def adapter(folder):
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_is_validated():
    with pytest.raises(ValueError, match="group_size=1: GRPO needs >= 2"):
        MLPOConfig(group_size=1)
    with pytest.raises(ValueError, match="offline=True needs traces"):
        MLPOConfig(offline=True)
    with pytest.raises(ValueError, match="aggregation='mean'"):
        MLPOConfig(aggregation="mean")
    defaults = MLPOConfig()
    assert (defaults.aggregation, defaults.std_scale, defaults.clip_eps, defaults.kl_coef) == (
        "dr_grpo",
        False,
        0.2,
        0.0,
    )


def test_one_tiny_step_through_the_run_scaffold(tmp_path):
    """Default tier: one online step; a zero `max_minutes` budget makes it the last one, checkpointed with the
    typed state, and a resumed run at that step has nothing left to do."""
    from mlpo_agents.trainers.loop import Checkpointer

    small = dict(steps=3, group_size=2, questions_per_step=1, train_questions=2, save_every=5, max_minutes=0)
    result = train(config(tmp_path, **small))
    assert result.steps == 1 and result.adapter == tmp_path / "adapters" / "step-1"
    assert (result.adapter / "adapter_model.safetensors").is_file()
    assert [r["version"] for r in result.history if "version" in r] == ["step-1"]
    assert result.summary()["adapters"] == {"leader": str(result.adapter)} and result.evaluation == {}
    checkpoint = Checkpointer(tmp_path).latest()
    assert checkpoint is not None and checkpoint.step == 1
    assert checkpoint.state["cursor"] == 1 and {"easy", "pool", "eval_pool", "evaluation"} <= set(checkpoint.state)
    again = train(config(tmp_path, **{**small, "steps": 1, "resume": True}))
    assert again.steps == 1 and [r["step"] for r in again.history if "loss" in r] == [1]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """4 steps in one go, checkpoints at 2 and 4 (shared by several tests)."""
    out = tmp_path_factory.mktemp("straight")
    with use_rubric(PSEUDO):
        result = train(config(out, steps=4, save_every=2))
    return out, result


@pytest.mark.slow
def test_steps_change_the_adapter_and_record_new_versions(straight_run):
    out, result = straight_run
    weights = adapter(out / "adapters" / "step-4")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k), "LoRA B starts at 0 and moved"
    assert not same(adapter(out / "adapters" / "step-1"), weights)
    assert [row["version"] for row in result.history if "version" in row] == [
        "step-1",
        "step-2",
        "step-3",
        "step-4",
    ]
    # Hot reload: each step's rollout was served by the previous step's adapter and recorded as such.
    store = TraceStore(out / "traces.sqlite")
    versions = []
    for episode in store.episodes():
        for c in store.calls(episode_id=episode.episode_id, role="leader"):
            if c.version not in versions:
                versions.append(c.version)
    assert versions == ["base", "step-1", "step-2", "step-3"]
    peer_versions = {c.version for c in store.calls() if c.role == "peer"}
    assert peer_versions == {"base"}, "peers stay on the base weights"


@pytest.mark.slow
def test_served_adapter_matches_the_trained_weights(straight_run):
    """Logprobs the engine recorded under step-2 equal the step-2 adapter's logprobs on the same tokens."""
    from mlpo_agents.trainers.batch import traces_to_batch
    from mlpo_agents.trainers.lora import load_adapter
    from mlpo_agents.trainers.update import sequence_logprobs

    out, _ = straight_run
    store = TraceStore(out / "traces.sqlite")
    calls = [c for c in store.calls(role="leader") if c.version == "step-2"]
    batch = traces_to_batch(calls, store.rewards(), base_model="tiny-test")
    model = load_adapter("tiny-test", out / "adapters" / "step-2").eval()
    with torch.no_grad():
        logp = sequence_logprobs(model, batch)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(logp[mask], batch.old_logprobs[mask], atol=2e-4, rtol=0)


@pytest.mark.slow
def test_same_seed_same_weights_and_resume_equals_straight_run(straight_run, tmp_path, pseudo_reward):
    out, _ = straight_run
    train(config(tmp_path, steps=2, save_every=2))
    assert same(adapter(tmp_path / "adapters" / "step-2"), adapter(out / "adapters" / "step-2")), "same seed"
    resumed = train(config(tmp_path, steps=4, save_every=2, resume=True))
    assert resumed.steps == 4
    assert same(adapter(tmp_path / "adapters" / "step-4"), adapter(out / "adapters" / "step-4")), "2 + 2 == 4"
    assert [r["step"] for r in resumed.history if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_from_a_corrupted_checkpoint_is_a_clear_error(straight_run, tmp_path):
    import shutil

    out, _ = straight_run
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "step-000004" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"step-000004 is corrupted.*resume from step-000002"):
        train(config(tmp_path, steps=6, save_every=2, resume=True))
    assert (tmp_path / "checkpoints" / "step-000002" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------- offline mode


def leader_call(call_id, group, index, base_model="tiny-test"):
    return ModelCall(
        call_id=call_id,
        episode_id="e1",
        node="leader",
        role="leader",
        agent="leader",
        round=0,
        group_id=group,
        sample_index=index,
        messages=[],
        text="x",
        prompt_token_ids=[5, 6, 7],
        completion_token_ids=[8, 9],
        logprobs=[-1.0, -2.0],
        finish_reason="stop",
        model="local/tiny-test",
        base_model=base_model,
        version="base",
        sampling={"max_tokens": 8},
    )


def hand_store(path, calls, rewards):
    store = TraceStore(path)
    store.append([*calls, *rewards])
    store.close()
    return path


def test_offline_errors_are_clear(tmp_path):
    no_rewards = hand_store(tmp_path / "a.sqlite", [leader_call("a", "g", 0), leader_call("b", "g", 1)], [])
    with pytest.raises(ValueError, match=r"offline mode on .*a.sqlite: no call-level .*rewards named"):
        train(config(tmp_path / "o1", offline=True, traces=str(no_rewards)))
    singles = hand_store(
        tmp_path / "b.sqlite",
        [leader_call("a", "g1", 0), leader_call("b", "g2", 0)],
        [Reward("e1", n, 1.0, call_id=c) for c in "ab" for n in ("correct", "format")],
    )
    with pytest.raises(ValueError, match="single usable sample.*G>=2"):
        train(config(tmp_path / "o2", offline=True, traces=str(singles)))
    foreign = hand_store(
        tmp_path / "c.sqlite",
        [leader_call("a", "g", 0, "smollm2-135m"), leader_call("b", "g", 1, "smollm2-135m")],
        [Reward("e1", n, float(c == "a"), call_id=c) for c in "ab" for n in ("correct", "format")],
    )
    with pytest.raises(ValueError, match="another base model.*'smollm2-135m'.*training 'tiny-test'"):
        train(config(tmp_path / "o3", offline=True, traces=str(foreign)))
    empty = hand_store(tmp_path / "d.sqlite", [], [])
    with pytest.raises(ValueError, match="has no leader calls"):
        train(config(tmp_path / "o4", offline=True, traces=str(empty)))


@pytest.mark.slow
def test_offline_training_from_a_run_team_store(tmp_path):
    from mlpo_agents.config import load_team
    from mlpo_agents.runner import run_team
    from mlpo_agents.tasks import load_task

    team = load_team("tiny")
    team = team.model_copy(update={"params": {**team.params, "leader_samples": 3}})
    store = TraceStore(tmp_path / "recorded.sqlite")
    asyncio.run(
        run_team(
            team,
            load_task("arithmetic", split="train", limit=4),
            store,
            task_name="arithmetic",
            progress=False,
            rubric=PSEUDO,
        )
    )
    store.close()
    result = train(
        config(
            tmp_path / "run",
            offline=True,
            traces=str(tmp_path / "recorded.sqlite"),
            steps=3,
            questions_per_step=2,
            offline_epochs=2,
        )
    )
    assert [r["epoch"] for r in result.history if "epoch" in r] == [0, 0, 1]
    weights = adapter(tmp_path / "run" / "adapters" / "step-3")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


# ------------------------------------------------------------------------------------------- pool, SFT, eval


@pytest.mark.slow
def test_peer_pool_reuses_proposals_and_eval_and_sft_run(tmp_path, pseudo_reward):
    result = train(
        config(
            tmp_path,
            steps=2,
            questions_per_step=2,
            train_questions=2,
            sft_steps=2,
            sft_questions=2,
            eval_questions=2,
            pool_samples=2,
        )
    )
    rows = [r for r in result.history if "pool/hits" in r]
    assert rows[0]["pool/hits"] == 0 and rows[1]["pool/hits"] == 2 * 2, (
        "step 2 reuses both questions' 2 peers"
    )
    assert set(result.evaluation) == {"before", "after"}
    assert {"team_accuracy", "solo_accuracy", "team_correct", "solo_correct"} <= set(result.evaluation["after"])
    assert any("sft/loss" in r for r in result.history)
    store = TraceStore(tmp_path / "traces.sqlite")
    # Step 1 samples from the SFT adapter (published as step-0); its peers drew P=2 samples for the pool.
    step1 = {c.episode_id for c in store.calls(role="leader") if c.version == "step-0"}
    assert step1, "the SFT warm-up adapter served the first GRPO rollout"
    assert {c.sampling.get("n") for c in store.calls(episode_id=list(step1), role="peer")} == {2}


# ------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_process_update_keeps_ranks_identical(tmp_path):
    script = ROOT / "tests" / "ddp_update_script.py"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        str(script),
        str(tmp_path),
        "ddp",
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run(
        [sys.executable, str(script), str(tmp_path), "single"],
        check=True,
        cwd=ROOT,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = torch.load(tmp_path / "ranksingle.pt")
    assert same(rank0, rank1), "DDP all-reduce keeps the LoRA weights identical across ranks"
    for key in single:  # sharded rows + averaged gradients == the one-process step on the whole batch
        torch.testing.assert_close(rank0[key], single[key], atol=1e-4, rtol=1e-3)
    assert any(v.abs().max() > 0 for k, v in rank0.items() if "lora_B" in k)
