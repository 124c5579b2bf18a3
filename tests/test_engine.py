"""LocalEngine on tiny-test: continuous batching matches one-at-a-time, logprobs, sampling, adapters, litellm."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch

from mlpo_agents import zoo
from mlpo_agents.engine import LocalEngine
from mlpo_agents.engines import get_engine, parse_local_model
from mlpo_agents.providers import register_local_provider

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


def _make_adapter(path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    base = zoo.build_tiny_test()[0]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(path)


def test_adapters_switch_outputs_and_base_is_unchanged(tmp_path):
    eng = LocalEngine("tiny-test", max_batch_size=8)
    try:
        base_before = eng.generate(PROMPTS[1], max_tokens=16, temperature=0).samples[0].token_ids
        _make_adapter(tmp_path / "a1", seed=1)
        _make_adapter(tmp_path / "a2", seed=2)
        eng.load_adapter("a1", tmp_path / "a1")
        eng.load_adapter("a2", tmp_path / "a2")
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
        model, _ = zoo.resolve("tiny-test")
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
    _make_adapter(tmp_path / "v1", seed=3)
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
