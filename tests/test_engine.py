"""LocalEngine on tiny-test: continuous batching matches one-at-a-time, logprobs, sampling, adapters, litellm,
batched prefill of an admission wave.

Tolerance: fp32 logprobs are compared with abs=1e-4 throughout. Batching (in decode, and in a left-padded
prefill forward) changes matmul shapes, hence the summation order, so fp32 results may differ in the last
bits (measured ~1e-5 on tiny-test); greedy and seeded tokens must be equal exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time

import pytest
import torch

from mlpo_agents import zoo
from mlpo_agents.engine import LocalEngine
from mlpo_agents.engines import get_engine, parse_local_model
from mlpo_agents.prefill import MAX_FORWARD_TOKENS, plan_forwards
from mlpo_agents.providers import register_local_provider
from mlpo_agents.testing import save_tiny_adapter

PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [
        {"role": "system", "content": "You are a peer."},
        {"role": "user", "content": "Solve 12 * 3 step by step."},
    ],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "the answer is " + "two apples and three eggs " * 6}],
    [{"role": "user", "content": "0123456789 " * 3}],
    [{"role": "assistant", "content": "<answer>42</answer>"}, {"role": "user", "content": "verify"}],
]


@pytest.fixture(scope="module")
def engine():
    eng = LocalEngine("tiny-test", max_batch_size=8)
    yield eng
    eng.close()


def _fresh_logprobs(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.inference_mode():
        logp = model(ids).logits.float().log_softmax(-1)[0]
    start = len(prompt_ids) - 1
    return [logp[start + t, tok].item() for t, tok in enumerate(completion_ids)]


def test_batched_greedy_equals_one_at_a_time(engine):
    singles = [engine.generate(m, max_tokens=24, temperature=0) for m in PROMPTS]
    # Half arrive at once, the rest while the first batch is decoding (they join mid-batch).
    futures = [engine.submit(m, max_tokens=24, temperature=0) for m in PROMPTS[:3]]
    for m in PROMPTS[3:]:
        time.sleep(0.01)
        futures.append(engine.submit(m, max_tokens=24, temperature=0))
    batched = [f.result(timeout=60) for f in futures]
    for single, batch in zip(singles, batched, strict=True):
        assert batch.prompt_token_ids == single.prompt_token_ids
        assert batch.samples[0].token_ids == single.samples[0].token_ids
        assert batch.samples[0].logprobs == pytest.approx(single.samples[0].logprobs, abs=1e-4)


def test_mid_batch_join_with_different_lengths(engine):
    # A long request is running; short ones join and leave while it continues.
    long = engine.submit(PROMPTS[3], max_tokens=60, temperature=0)
    time.sleep(0.02)
    short = [engine.submit(m, max_tokens=5 + 3 * i, temperature=0) for i, m in enumerate(PROMPTS[:3])]
    results = [f.result(timeout=60) for f in [long, *short]]
    expected = [engine.generate(PROMPTS[3], max_tokens=60, temperature=0)]
    expected += [engine.generate(m, max_tokens=5 + 3 * i, temperature=0) for i, m in enumerate(PROMPTS[:3])]
    for got, want in zip(results, expected, strict=True):
        assert got.samples[0].token_ids == want.samples[0].token_ids


def test_logprobs_match_fresh_forward(engine):
    model, _ = zoo.resolve("tiny-test")
    futures = [engine.submit(m, max_tokens=16, temperature=1.0, seed=i) for i, m in enumerate(PROMPTS)]
    for f in futures:
        result = f.result(timeout=60)
        sample = result.samples[0]
        assert len(sample.logprobs) == len(sample.token_ids)
        fresh = _fresh_logprobs(model, result.prompt_token_ids, sample.token_ids)
        assert sample.logprobs == pytest.approx(fresh, abs=1e-4)


def test_n_samples_share_prompt_and_seed_reproducible(engine):
    first = engine.generate(PROMPTS[1], n=4, max_tokens=12, temperature=1.0, seed=7)
    # Same seed with different batch mates running alongside.
    noise = [engine.submit(m, max_tokens=20, temperature=0.7, seed=3) for m in PROMPTS]
    second = engine.generate(PROMPTS[1], n=4, max_tokens=12, temperature=1.0, seed=7)
    [f.result(timeout=60) for f in noise]
    assert len(first.samples) == 4
    assert [s.token_ids for s in first.samples] == [s.token_ids for s in second.samples]
    assert len({tuple(s.token_ids) for s in first.samples}) > 1  # samples differ from each other
    other = engine.generate(PROMPTS[1], n=4, max_tokens=12, temperature=1.0, seed=8)
    assert [s.token_ids for s in other.samples] != [s.token_ids for s in first.samples]
    nucleus = engine.generate(PROMPTS[1], n=2, max_tokens=8, temperature=1.0, top_p=0.5, seed=7)
    assert all(len(s.token_ids) == 8 for s in nucleus.samples)


def test_stop_strings_and_max_tokens(engine):
    free = engine.generate(PROMPTS[0], max_tokens=30, temperature=0).samples[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    # Stop on a piece of text the greedy completion is known to contain.
    stop = free.text[6:9]
    assert stop.strip()
    stopped = engine.generate(PROMPTS[0], max_tokens=30, temperature=0, stop=[stop]).samples[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < 30


def test_eos_finishes_with_stop(engine):
    eos = engine.tokenizer.eos_token_id
    # Force eos by biasing: feed a prompt and check the eos bookkeeping directly via a tiny max_tokens run.
    assert eos in engine.eos_token_ids
    result = engine.generate(prompt_token_ids=[1, 5, 6], max_tokens=3, temperature=0)
    assert result.prompt_token_ids == [1, 5, 6]


def test_adapters_switch_outputs_and_base_is_unchanged(tmp_path):
    model, _ = zoo.resolve("tiny-test")  # the zoo model, whose weights the engine shares
    frozen_by_others = [p.requires_grad for p in model.parameters()]  # a trainer in this process freezes them
    flags = [i % 2 == 0 for i, p in enumerate(model.parameters())]
    for param, flag in zip(model.parameters(), flags, strict=True):
        param.requires_grad_(flag)
    eng = LocalEngine("tiny-test", max_batch_size=8)
    try:
        base_before = eng.generate(PROMPTS[1], max_tokens=16, temperature=0).samples[0].token_ids
        save_tiny_adapter(tmp_path / "a1", seed=1)
        save_tiny_adapter(tmp_path / "a2", seed=2)
        eng.load_adapter("a1", tmp_path / "a1")
        eng.load_adapter("a2", tmp_path / "a2")
        # peft's layers wrap the engine's own modules over the same weights: no copy of the base model,
        # and the zoo model's parameters are left as they were (not frozen by peft).
        q_proj = eng._lora.peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert q_proj.base_layer.weight is model.model.layers[0].self_attn.q_proj.weight
        assert [p.requires_grad for p in model.parameters()] == flags
        solo = {
            name: eng.generate(PROMPTS[1], max_tokens=16, temperature=0, adapter=name).samples[0].token_ids
            for name in (None, "a1", "a2")
        }
        assert solo[None] == base_before
        assert solo["a1"] != base_before and solo["a2"] != solo["a1"]
        # Mixed adapters in one batch give the same tokens as alone.
        futures = {
            n: eng.submit(PROMPTS[1], max_tokens=16, temperature=0, adapter=n) for n in (None, "a1", "a2")
        }
        assert {n: f.result(timeout=60).samples[0].token_ids for n, f in futures.items()} == solo
        # The shared zoo model was not modified by peft.
        assert not any("lora" in name for name, _ in model.named_modules())
        eng.unload_adapter("a1")
        assert "a1" not in eng.adapters
        with pytest.raises(KeyError):
            eng.submit(PROMPTS[1], adapter="a1")
        assert (
            eng.generate(PROMPTS[1], max_tokens=16, temperature=0, adapter="a2").samples[0].token_ids
            == solo["a2"]
        )
        eng.unload_adapter("a2")
        assert eng.generate(PROMPTS[1], max_tokens=16, temperature=0).samples[0].token_ids == base_before
    finally:
        eng.close()
        for param, flag in zip(model.parameters(), frozen_by_others, strict=True):
            param.requires_grad_(flag)


def test_agenerate_does_not_block_event_loop(engine):
    async def main():
        ticks = 0
        stop = threading.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        results = await asyncio.gather(*[engine.agenerate(m, max_tokens=20, temperature=0) for m in PROMPTS])
        stop.set()
        await task
        return ticks, results

    ticks, results = asyncio.run(main())
    assert ticks > 3 and len(results) == len(PROMPTS)


def test_parse_local_model():
    assert parse_local_model("local/tiny-test@v3") == ("tiny-test", "v3")
    assert parse_local_model("tiny-test") == ("tiny-test", None)


def test_litellm_router_returns_vllm_shape(tmp_path):
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    register_local_provider()
    register_local_provider()  # idempotent
    import litellm

    assert sum(1 for p in litellm.custom_provider_map if p["provider"] == "local") == 1
    engine = get_engine("tiny-test")
    save_tiny_adapter(tmp_path / "v1", seed=3)
    engine.load_adapter("v1", tmp_path / "v1")
    router = litellm.Router(
        model_list=[
            {"model_name": "leader", "litellm_params": {"model": "local/tiny-test", "max_batch_size": 16}},
            {"model_name": "leader-v1", "litellm_params": {"model": "local/tiny-test@v1"}},
        ]
    )
    messages = PROMPTS[1]

    async def main():
        return await asyncio.gather(
            router.acompletion(
                model="leader", messages=messages, max_tokens=10, temperature=0, n=2, logprobs=True
            ),
            router.acompletion(model="leader-v1", messages=messages, max_tokens=10, temperature=0),
        )

    base, tuned = asyncio.run(main())
    direct = engine.generate(messages, max_tokens=10, temperature=0)
    assert base.prompt_token_ids == direct.prompt_token_ids
    assert len(base.choices) == 2
    for choice in base.choices:
        token_ids = choice.provider_specific_fields["token_ids"]
        assert token_ids == direct.samples[0].token_ids
        content = choice.logprobs["content"]
        assert [c["logprob"] for c in content] == pytest.approx(direct.samples[0].logprobs, abs=1e-5)
        assert all(c["bytes"] is None and c["top_logprobs"] == [] for c in content)
        assert "".join(c["token"] for c in content) == engine.tokenizer.decode(token_ids)
        assert choice.message.content == direct.samples[0].text
        assert choice.finish_reason == "length"
    assert base.usage.prompt_tokens == len(direct.prompt_token_ids)
    assert base.usage.completion_tokens == 20
    assert tuned.choices[0].provider_specific_fields["token_ids"] != direct.samples[0].token_ids
    sync = litellm.completion(model="local/tiny-test", messages=messages, max_tokens=10, temperature=0)
    assert sync.choices[0].provider_specific_fields["token_ids"] == direct.samples[0].token_ids
    assert sync.prompt_token_ids == direct.prompt_token_ids
    engine.unload_adapter("v1")


def test_failed_prefill_fails_that_request_only(engine):
    """A prompt whose prefill raises (token ids outside the vocabulary) fails alone and is not retried;
    requests beside it still complete."""
    vocab = engine._base_model.config.vocab_size
    bad = engine.submit(prompt_token_ids=[1, vocab + 10], max_tokens=4, temperature=0)
    good = engine.submit(PROMPTS[0], max_tokens=4, temperature=0)
    with pytest.raises(IndexError):  # the embedding lookup's own error, at once (not a timeout)
        bad.result(timeout=60)
    assert good.result(timeout=60).samples[0].token_ids
    assert engine.generate(PROMPTS[2], max_tokens=4, temperature=0).samples[0].token_ids


@contextlib.contextmanager
def _one_wave(engine):
    """Requests submitted inside the block are admitted in one wave: meanwhile the worker is held inside a
    command, past draining its queue, and drains them all at once when released."""
    entered, release = threading.Event(), threading.Event()

    def hold(*args):
        entered.set()
        release.wait(60)

    engine._lora.load = hold
    holder = threading.Thread(target=engine._run_command, args=("load", ("hold", "")))
    holder.start()
    assert entered.wait(60)
    try:
        yield
    finally:
        release.set()
        holder.join(60)
        del engine._lora.load


def _stats_delta(engine, before):
    return {key: engine.stats[key] - before[key] for key in before}


def test_plan_forwards_bounds_padding():
    # Longest first; 50 still fits (4 x 100 = 400 <= 1.25 x 320), the 10s would pad 500 for 330 real.
    assert plan_forwards([10, 100, 50, 90, 10, 80]) == [[1, 3, 5, 2], [0, 4]]
    assert plan_forwards([100, 60]) == [[0, 1]]  # padded 200 = 1.25 x 160 real: the bound itself
    assert plan_forwards([100, 59]) == [[0], [1]]
    assert plan_forwards([7]) == [[0]]
    # The token cap splits even equal lengths.
    assert plan_forwards([MAX_FORWARD_TOKENS // 2 + 1] * 2) == [[0], [1]]


def test_wave_prefill_greedy_equals_one_at_a_time(engine):
    """One wave of prompts of different lengths, prefilled in a few left-padded forwards, gives the tokens
    and logprobs (first token's included: it comes from the batched prefill) of one request at a time."""
    singles = [engine.generate(m, max_tokens=20, temperature=0) for m in PROMPTS]
    lengths = [len(s.prompt_token_ids) for s in singles]
    plan = plan_forwards(lengths)
    assert any(len({lengths[i] for i in forward}) > 1 for forward in plan)  # some forward has padding
    before = dict(engine.stats)
    with _one_wave(engine):
        futures = [engine.submit(m, max_tokens=20, temperature=0) for m in PROMPTS]
    batched = [f.result(timeout=60) for f in futures]
    assert _stats_delta(engine, before) == {"prefill_forwards": len(plan), "prefill_tokens": sum(lengths)}
    for single, batch in zip(singles, batched, strict=True):
        assert batch.samples[0].token_ids == single.samples[0].token_ids
        assert batch.samples[0].logprobs[0] == pytest.approx(single.samples[0].logprobs[0], abs=1e-4)
        assert batch.samples[0].logprobs == pytest.approx(single.samples[0].logprobs, abs=1e-4)


def test_wave_prefill_sampled_equals_one_at_a_time(engine):
    """Seeded sampling (temperature 1, top-p) is unchanged by a batched prefill: same tokens, logprobs 1e-4."""
    kwargs = dict(max_tokens=12, temperature=1.0, top_p=0.9)
    singles = [engine.generate(m, seed=i, **kwargs) for i, m in enumerate(PROMPTS)]
    with _one_wave(engine):
        futures = [engine.submit(m, seed=i, **kwargs) for i, m in enumerate(PROMPTS)]
    for single, future in zip(singles, futures, strict=True):
        batch = future.result(timeout=60)
        assert batch.samples[0].token_ids == single.samples[0].token_ids
        assert batch.samples[0].logprobs == pytest.approx(single.samples[0].logprobs, abs=1e-4)


def test_identical_prompts_prefilled_once_sampled_per_seed(engine):
    """Three peers send one prompt with different seeds (plus a request with n=2): one prefill forward of the
    prompt's tokens, and each request samples what it samples alone."""
    kwargs = dict(max_tokens=12, temperature=1.0)
    alone = [engine.generate(PROMPTS[1], seed=seed, **kwargs) for seed in (1, 2, 3)]
    alone.append(engine.generate(PROMPTS[1], seed=4, n=2, **kwargs))
    before = dict(engine.stats)
    with _one_wave(engine):
        futures = [engine.submit(PROMPTS[1], seed=seed, **kwargs) for seed in (1, 2, 3)]
        futures.append(engine.submit(PROMPTS[1], seed=4, n=2, **kwargs))
    together = [f.result(timeout=60) for f in futures]
    prompt_len = len(alone[0].prompt_token_ids)
    assert _stats_delta(engine, before) == {"prefill_forwards": 1, "prefill_tokens": prompt_len}
    for one, both in zip(alone, together, strict=True):
        assert [s.token_ids for s in both.samples] == [s.token_ids for s in one.samples]
        for s_both, s_one in zip(both.samples, one.samples, strict=True):
            assert s_both.logprobs == pytest.approx(s_one.logprobs, abs=1e-4)
    assert len({tuple(r.samples[0].token_ids) for r in together}) > 1  # the seeds still matter


def test_mixed_adapters_in_one_prefill(tmp_path):
    """One prefill forward over rows with different adapters: each row gets its own adapter's output, and an
    identical prompt under another adapter is not shared."""
    eng = LocalEngine("tiny-test", max_batch_size=8)
    try:
        save_tiny_adapter(tmp_path / "a1", seed=1)
        save_tiny_adapter(tmp_path / "a2", seed=2)
        eng.load_adapter("a1", tmp_path / "a1")
        eng.load_adapter("a2", tmp_path / "a2")
        wave = [(PROMPTS[1], None), (PROMPTS[1], "a1"), (PROMPTS[1], "a2"), (PROMPTS[4], "a1")]
        solo = [eng.generate(m, max_tokens=16, temperature=0, adapter=a) for m, a in wave]
        assert len({tuple(r.samples[0].token_ids) for r in solo[:3]}) == 3  # the adapters change the output
        before = dict(eng.stats)
        with _one_wave(eng):
            futures = [eng.submit(m, max_tokens=16, temperature=0, adapter=a) for m, a in wave]
        together = [f.result(timeout=60) for f in futures]
        lengths = [len(r.prompt_token_ids) for r in solo]
        assert plan_forwards(lengths) == [[0, 1, 2, 3]]  # all four rows share one forward
        assert _stats_delta(eng, before) == {"prefill_forwards": 1, "prefill_tokens": sum(lengths)}
        for one, both in zip(solo, together, strict=True):
            assert both.samples[0].token_ids == one.samples[0].token_ids
            assert both.samples[0].logprobs == pytest.approx(one.samples[0].logprobs, abs=1e-4)
    finally:
        eng.close()


def test_failed_batched_prefill_falls_back_to_one_by_one(engine):
    """A bad prompt in a batched prefill forward: the forward is retried prompt by prompt, only the bad
    prompt fails, the others give their one-at-a-time output."""
    good = [engine.generate(m, max_tokens=8, temperature=0) for m in (PROMPTS[1], PROMPTS[4])]
    good_ids = [r.prompt_token_ids for r in good]
    bad_ids = list(good_ids[0])
    bad_ids[5] = engine._base_model.config.vocab_size + 10
    lengths = [len(ids) for ids in (bad_ids, *good_ids)]
    assert len(plan_forwards(lengths)) == 1  # the three would share one forward
    before = dict(engine.stats)
    with _one_wave(engine):
        bad = engine.submit(prompt_token_ids=bad_ids, max_tokens=8, temperature=0)
        futures = [engine.submit(prompt_token_ids=ids, max_tokens=8, temperature=0) for ids in good_ids]
    with pytest.raises(IndexError):
        bad.result(timeout=60)
    for one, future in zip(good, futures, strict=True):
        assert future.result(timeout=60).samples[0].token_ids == one.samples[0].token_ids
    assert _stats_delta(engine, before)["prefill_forwards"] == 2  # the failed forwards count nothing


def test_a_learning_runs_engine_dtype_is_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    from mlpo_agents import engines

    monkeypatch.setattr(engines, "fastest_cpu_dtype", lambda: "bfloat16")
    out = tmp_path / "run"
    assert engines.run_dtype("auto", out, resume=False) == "bfloat16"  # the CPU's fastest, recorded
    assert json.loads((out / "engine.json").read_text()) == {"dtype": "bfloat16"}
    monkeypatch.setattr(engines, "fastest_cpu_dtype", lambda: "float32")  # e.g. resumed on another machine
    assert engines.run_dtype("auto", out, resume=True) == "bfloat16"  # the first stage's
    assert engines.run_dtype("float32", out, resume=True) == "float32"  # asked for: taken as asked, recorded
    assert engines.run_dtype("auto", out, resume=True) == "float32"
    old = tmp_path / "old"  # a run from before the record: its engine ran the default fp32
    old.mkdir()
    (old / "config.json").write_text("{}")
    monkeypatch.setattr(engines, "fastest_cpu_dtype", lambda: "bfloat16")
    assert engines.run_dtype("auto", old, resume=True) == "float32"
    assert engines.run_dtype("auto", tmp_path / "fresh", resume=True) == "bfloat16"  # nothing to resume yet
