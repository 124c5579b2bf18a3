"""LocalEngine in bfloat16 on tiny-test: greedy tokens equal transformers' own bf16 greedy, logprobs within
documented bf16 tolerances.

Tolerances (why they are what they are): bf16 keeps 8 mantissa bits, so a logit of magnitude ~10 is only
known to ~0.05. The engine's logprobs come from bf16 logits upcast to fp32 (log-softmax in fp32), so they
match a fresh bf16 forward over prompt + completion to within `BF16_LOGPROB_ABS` = 0.05 per token (measured
max 0.033: batch composition and KV cache vs full-sequence attention change the rounding, not the maths).
Against the fp32 model (a different rounding of every weight) tiny-test's large logits move by up to 0.5
(measured max 0.50, per-sequence mean <= 0.10), hence `BF16_VS_FP32_MAX` = 0.75 per token and
`BF16_VS_FP32_MEAN` = 0.15 per sequence. fp32 keeps its 1e-4 tolerance in test_engine.py. Greedy tokens are
compared exactly with transformers' own bf16 greedy: tiny-test's logits are far apart
(initializer_range 0.3), so rounding differences do not flip an argmax here.
"""

from __future__ import annotations

import pytest
import torch

from mlpo_agents import zoo
from mlpo_agents.engine import LocalEngine

BF16_LOGPROB_ABS = 0.05
BF16_VS_FP32_MAX = 0.75
BF16_VS_FP32_MEAN = 0.15
PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "system", "content": "You are a peer."}, {"role": "user", "content": "Solve 12 * 3."}],
    [{"role": "user", "content": "the answer is " + "two apples and three eggs " * 4}],
]


@pytest.fixture(scope="module")
def engine():
    eng = LocalEngine("tiny-test", dtype="bfloat16", max_batch_size=8)
    yield eng
    eng.close()


def _hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0, len(prompt_ids) :].tolist()


def test_bf16_engine_runs_in_bf16(engine):
    assert next(engine._base_model.parameters()).dtype == torch.bfloat16


def test_bf16_greedy_equals_transformers_bf16_greedy_batched(engine):
    model, _ = zoo.resolve("tiny-test", dtype="bfloat16")
    futures = [engine.submit(m, max_tokens=20, temperature=0) for m in PROMPTS]  # batched together
    for future in futures:
        result = future.result(timeout=60)
        want = _hf_greedy(model, result.prompt_token_ids, 20)
        got = result.samples[0].token_ids
        assert got == want[: len(got)]
        assert len(got) == 20 or result.samples[0].finish_reason == "stop"


def test_bf16_logprobs_match_fresh_bf16_forward_and_fp32(engine):
    bf16_model, _ = zoo.resolve("tiny-test", dtype="bfloat16")
    fp32_model, _ = zoo.resolve("tiny-test")
    futures = [engine.submit(m, max_tokens=16, temperature=1.0, seed=i) for i, m in enumerate(PROMPTS)]
    for future in futures:
        result = future.result(timeout=60)
        sample = result.samples[0]
        ids = torch.tensor([result.prompt_token_ids + sample.token_ids])
        start = len(result.prompt_token_ids) - 1
        with torch.inference_mode():
            fresh_bf16 = bf16_model(ids).logits.float().log_softmax(-1)[0]
            fresh_fp32 = fp32_model(ids).logits.float().log_softmax(-1)[0]
        positions = torch.arange(start, start + len(sample.token_ids))
        tokens = torch.tensor(sample.token_ids)
        got = torch.tensor(sample.logprobs)
        assert sample.logprobs == pytest.approx(fresh_bf16[positions, tokens].tolist(), abs=BF16_LOGPROB_ABS)
        vs_fp32 = (got - fresh_fp32[positions, tokens]).abs()
        assert vs_fp32.max() <= BF16_VS_FP32_MAX and vs_fp32.mean() <= BF16_VS_FP32_MEAN
