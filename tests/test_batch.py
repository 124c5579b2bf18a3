"""traces_to_batch on hand-built ModelCall/Reward events."""

import pytest
import torch

from mlpo_agents.trace import ModelCall, Reward, TraceStore
from mlpo_agents.trainers.batch import TraceMismatchError, load_events, traces_to_batch
from mlpo_agents.trainers.losses import grpo_loss

BASE = "tiny-base"


def call(
    call_id,
    *,
    group="g1",
    index=0,
    role="leader",
    prompt=(5, 6, 7),
    completion=(8, 9),
    logprobs=None,
    finish="stop",
    base_model=BASE,
    episode="e1",
    text="x",
):
    completion = list(completion)
    if logprobs is None:
        logprobs = [-0.1 * (i + 1) for i in range(len(completion))]
    return ModelCall(
        call_id=call_id,
        episode_id=episode,
        node=role,
        role=role,
        agent=role,
        round=0,
        group_id=group,
        sample_index=index,
        messages=[],
        text=text,
        prompt_token_ids=list(prompt),
        completion_token_ids=completion,
        logprobs=list(logprobs),
        finish_reason=finish,
        model="local/tiny",
        base_model=base_model,
        version="base",
    )


def correct(call_id, value, episode="e1", name="correct"):
    return Reward(episode_id=episode, name=name, value=value, call_id=call_id)


def test_layout_masks_and_logprob_alignment():
    calls = [
        call("a", index=0, prompt=(1, 2, 3), completion=(4, 5), logprobs=(-0.5, -0.25)),
        call("b", index=1, prompt=(1, 2, 3), completion=(6, 7, 8, 9), logprobs=(-1.0, -2.0, -3.0, -4.0)),
        call("peer", role="peer-1", group="gp", prompt=(1,), completion=(2, 3, 4, 5, 6, 7, 8)),
    ]
    batch = traces_to_batch(calls, [correct("a", 1.0), correct("b", 0.0)], base_model=BASE, pad_token_id=0)
    assert batch.call_ids == ["a", "b"]
    # width = 3 + 4 = 7 (the peer's call is not a row); right padding with pad id 0
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 0, 0], [1, 2, 3, 6, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    # 1 exactly on the leader's completion tokens
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]]
    # logprob of token t at position t
    assert batch.old_logprobs.tolist() == [[0, 0, 0, -0.5, -0.25, 0, 0], [0, 0, 0, -1.0, -2.0, -3.0, -4.0]]
    assert batch.prompt_lengths.tolist() == [3, 3] and batch.completion_lengths.tolist() == [2, 4]
    # rewards 1, 0 -> mean 0.5 -> advantages +0.5, -0.5
    assert batch.rewards.tolist() == [1.0, 0.0] and batch.advantages.tolist() == [0.5, -0.5]
    assert batch.stats.other_role == 1 and batch.stats.rows == 2 and batch.stats.dropped == 0


def test_groups_ordered_by_sample_index_and_identical_rewards_give_zero_advantage():
    calls = [
        call("a1", group="A", index=1),
        call("b0", group="B", index=0, episode="e2"),
        call("a0", group="A", index=0),
        call("b1", group="B", index=1, episode="e2"),
        call("b2", group="B", index=2, episode="e2"),
    ]
    rewards = [correct("a0", 1.0), correct("a1", 1.0)]
    rewards += [correct("b0", 1.0, "e2"), correct("b1", 0.0, "e2"), correct("b2", 0.0, "e2")]
    batch = traces_to_batch(calls, rewards, base_model=BASE)
    assert batch.call_ids == ["a0", "a1", "b0", "b1", "b2"]
    assert batch.group_ids == ["A", "B"] and batch.group_index.tolist() == [0, 0, 1, 1, 1]
    # group A: both 1 -> 0, 0; group B: mean 1/3 -> 2/3, -1/3, -1/3
    assert torch.allclose(batch.advantages, torch.tensor([0.0, 0.0, 2 / 3, -1 / 3, -1 / 3]))
    assert batch.stats.zero_advantage_groups == 1 and batch.stats.groups == 2


def test_std_scale_and_weighted_reward_names():
    calls = [call("a", index=0), call("b", index=1), call("c", index=2)]
    rewards = [correct("a", 1.0), correct("b", 0.0), correct("c", 0.0)]
    rewards += [correct(c, v, name="format") for c, v in (("a", 1.0), ("b", 1.0), ("c", 0.0))]
    batch = traces_to_batch(
        calls, rewards, base_model=BASE, reward_names=("correct", "format"), reward_weights={"format": 0.5}
    )
    # 1 + 0.5, 0 + 0.5, 0 + 0 = 1.5, 0.5, 0; mean 2/3 -> 5/6, -1/6, -2/3
    assert torch.allclose(batch.rewards, torch.tensor([1.5, 0.5, 0.0]))
    assert torch.allclose(batch.advantages, torch.tensor([5 / 6, -1 / 6, -2 / 3]))
    scaled = traces_to_batch(
        calls,
        rewards,
        base_model=BASE,
        reward_names=("correct", "format"),
        reward_weights=[1.0, 0.5],
        std_scale=True,
    )
    # squares 25/36 + 1/36 + 16/36 = 42/36, /2 = 7/12, std = 0.7637626; divided by std + 1e-4 (TRL's eps)
    std = 0.7637626 + 1e-4
    expected = torch.tensor([5 / 6, -1 / 6, -2 / 3]) / std
    assert torch.allclose(scaled.advantages, expected, atol=1e-6)


def test_foreign_base_model_is_refused_with_a_clear_message():
    calls = [call("a", index=0), call("b", index=1, base_model="other/model-7b")]
    with pytest.raises(TraceMismatchError, match=r"other/model-7b.*training 'tiny-base'") as err:
        traces_to_batch(calls, [correct("a", 1.0), correct("b", 0.0)], base_model=BASE)
    assert isinstance(err.value, ValueError)


def test_frozen_peers_of_another_model_are_fine():
    calls = [call("a", index=0), call("b", index=1), call("p", role="peer-1", group="p", base_model="gpt-x")]
    batch = traces_to_batch(calls, [correct("a", 1.0), correct("b", 0.0)], base_model=BASE)
    assert len(batch) == 2


def test_unusable_calls_are_counted_not_silently_dropped():
    calls = [
        call("ok0", index=0),
        call("ok1", index=1),
        call("noids", index=2, prompt=(), completion=(), logprobs=()),
        call("badlp", index=3, completion=(8, 9, 10), logprobs=(-0.1, -0.2)),
        call("cut", index=4, finish="length"),
        call("norew", index=5),
        call("alone", group="g2", index=0),
        call("long", index=6, completion=tuple(range(20))),
    ]
    rewards = [correct(c, 1.0) for c in ("ok0", "noids", "badlp", "cut", "alone", "long")]
    rewards.append(correct("ok1", 0.0))
    batch = traces_to_batch(calls, rewards, base_model=BASE, keep_truncated=False, max_len=10)
    assert batch.call_ids == ["ok0", "ok1"]
    s = batch.stats
    assert s.skipped == {
        "no_token_ids": ["noids"],
        "logprob_mismatch": ["badlp"],
        "truncated": ["cut"],
        "no_reward": ["norew"],
        "too_long": ["long"],
        "singleton_group": ["alone"],
    }
    assert s.dropped == 6 and s.truncated == 1 and s.calls_seen == 8
    assert s.as_dict()["skipped_no_token_ids"] == 1


def test_truncated_calls_are_kept_by_default_and_counted():
    calls = [call("a", index=0, finish="length"), call("b", index=1)]
    batch = traces_to_batch(calls, [correct("a", 0.0), correct("b", 1.0)], base_model=BASE)
    assert batch.call_ids == ["a", "b"] and batch.stats.truncated == 1 and batch.stats.dropped == 0


def test_empty_completion_is_a_valid_sample_with_no_trained_tokens():
    calls = [call("a", index=0, completion=(), text=""), call("b", index=1)]
    batch = traces_to_batch(calls, [correct("a", 0.0), correct("b", 1.0)], base_model=BASE)
    assert batch.completion_mask[0].sum() == 0 and batch.advantages.tolist() == [-0.5, 0.5]


def test_no_rewards_and_singleton_groups_raise():
    calls = [call("a", index=0), call("b", index=1)]
    with pytest.raises(ValueError, match=r"no call-level \(call_id set\) rewards named"):
        traces_to_batch(calls, [], base_model=BASE)
    with pytest.raises(ValueError, match=r"no call-level \(call_id set\) rewards named"):
        traces_to_batch(calls, [Reward("e1", "correct", 1.0)], base_model=BASE)
    singles = [call("a", group="g1"), call("b", group="g2")]
    with pytest.raises(ValueError, match="G>=2 samples per context; run with leader sampling n>=2"):
        traces_to_batch(singles, [correct("a", 1.0), correct("b", 0.0)], base_model=BASE)
    with pytest.raises(ValueError, match="roles present"):
        traces_to_batch([call("p", role="peer-1")], [correct("p", 1.0)], base_model=BASE)


def test_episode_level_rewards_for_joint_actions():
    # MAGRPO-style: one joint reward per episode; the i-th sample of a group is in episode e{i}
    calls = [call(f"c{i}", index=i, episode=f"e{i}") for i in range(3)]
    rewards = [Reward(f"e{i}", "correct", v) for i, v in enumerate((3.0, 0.0, 0.0))]
    rewards.append(correct("c0", 0.0, "e0"))  # a call-level reward is ignored in episode mode
    batch = traces_to_batch(calls, rewards, base_model=BASE, reward_source="episode")
    assert batch.advantages.tolist() == [2.0, -1.0, -1.0]


def test_batch_feeds_grpo_loss_and_select_trims_padding():
    calls = [
        call("a", index=0, completion=(4,), logprobs=(-0.7,)),
        call("b", index=1, completion=(4, 5, 6), logprobs=(-0.1, -0.2, -0.3)),
    ]
    batch = traces_to_batch(calls, [correct("a", 1.0), correct("b", 0.0)], base_model=BASE)
    # at ratio 1 the token-mean loss is -sum(A * tokens) / N = -(0.5 * 1 - 0.5 * 3) / 4 = 0.25
    loss, _ = grpo_loss(batch.old_logprobs, batch.old_logprobs, batch.advantages, batch.completion_mask)
    assert loss.item() == pytest.approx(0.25)
    first = batch.select([0])
    assert first.input_ids.tolist() == [[5, 6, 7, 4]] and first.call_ids == ["a"]
    assert batch.to("cpu").input_ids.equal(batch.input_ids)


def test_load_events_from_store(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite")
    store.append([call("a", index=0), call("b", index=1), correct("a", 1.0), correct("b", 0.0)])
    calls, rewards = load_events(store, episode_ids=["e1"], roles=["leader"])
    batch = traces_to_batch(calls, rewards, base_model=BASE)
    assert batch.call_ids == ["a", "b"]
    # float32 round trip in the store: -0.1 is stored as float32
    assert torch.allclose(batch.old_logprobs[0, 3:5], torch.tensor([-0.1, -0.2]))
    store.close()


def test_old_logprobs_align_with_token_logprobs_of_the_sampling_model():
    # Sample with the tiny model one token at a time (log-softmax of the last position), record the
    # calls like an engine would, then check token_logprobs on the padded batch reproduces them.
    from mlpo_agents import zoo
    from mlpo_agents.trainers.losses import token_logprobs

    model, tokenizer = zoo.resolve("tiny-test")
    gen = torch.Generator().manual_seed(0)
    prompt = tokenizer("What is 3 + 4?")["input_ids"]
    calls = []
    with torch.no_grad():
        for i, n_tokens in enumerate((3, 6)):
            ids, lps = list(prompt), []
            for _ in range(n_tokens):
                last = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
                tok = int(torch.multinomial(last.exp(), 1, generator=gen))
                ids.append(tok)
                lps.append(float(last[tok]))
            calls.append(call(f"s{i}", index=i, prompt=prompt, completion=ids[len(prompt) :], logprobs=lps))
        batch = traces_to_batch(calls, [correct("s0", 1.0), correct("s1", 0.0)], base_model=BASE)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = token_logprobs(logits, batch.input_ids)
    on = batch.completion_mask.bool()
    assert torch.allclose(logp[on], batch.old_logprobs[on], atol=1e-4)
    assert batch.completion_mask.sum().item() == 9


def test_runner_traces_become_a_batch(tmp_path):
    # Contract with the runner: leader samples share a group, each carries call-level "correct"/"format".
    import asyncio
    import itertools

    from mlpo_agents.runner import run_team
    from mlpo_agents.tasks.base import Task
    from mlpo_agents.testing import ScriptedModel, scripted_team

    replies = itertools.cycle(["so <answer>4</answer>", "hmm <answer>5</answer>", "no answer"])
    leader = ScriptedModel("tb-leader", lambda messages: next(replies))
    peer = ScriptedModel("tb-peer", "I think <answer>5</answer>", base_model="some-frozen-api")
    team = scripted_team(
        {"leader": leader, "peer": peer}, params={"peers": 2, "rounds": 1, "leader_samples": 3}
    )
    store = TraceStore(tmp_path / "t.sqlite")
    task = Task(id="t/0", question="What is 2+2?", answer="4", kind="math", meta={})
    asyncio.run(run_team(team, [task], store, task_name="unit", progress=False))

    batch = traces_to_batch(*load_events(store), base_model="scripted")
    assert len(batch) == 3 and batch.stats.groups == 1 and batch.stats.other_role == 2
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(batch.advantages, torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    assert torch.all(batch.old_logprobs[batch.completion_mask.bool()] == -0.5)
    with pytest.raises(TraceMismatchError):
        traces_to_batch(*load_events(store), base_model="smollm2-135m")
    store.close()


def test_temperatures_carry_each_calls_sampling_temperature():
    """Row b's temperature is the one its call sampled at; greedy (0) and unrecorded count as 1, counted."""
    calls = [call("a", index=0), call("b", index=1), call("c", index=2), call("d", index=3)]
    for c, sampling in zip(
        calls, ({"temperature": 0.7}, {"temperature": 0.0}, {}, {"temperature": 1.3}), strict=True
    ):
        c.sampling = sampling
    rewards = [correct(c.call_id, v) for c, v in zip(calls, (1.0, 0.0, 1.0, 0.0), strict=True)]
    batch = traces_to_batch(calls, rewards, base_model=BASE)
    assert torch.allclose(batch.temperatures, torch.tensor([0.7, 1.0, 1.0, 1.3]))
    assert batch.stats.greedy_rows == 1 and batch.stats.as_dict()["greedy_rows"] == 1
    assert not batch.old_logprobs_tempered  # the engine's raw logprobs
    sub = batch.select([3, 0])
    assert torch.allclose(sub.temperatures, torch.tensor([1.3, 0.7]))
