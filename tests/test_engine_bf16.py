"""LocalEngine in bfloat16 on tiny-test: greedy tokens equal transformers' own bf16 greedy, logprobs within
documented bf16 tolerances.

Tolerances (why they are what they are): bf16 keeps 8 mantissa bits, so a logit of magnitude ~10 is only
known to ~0.05. The engine's logprobs come from bf16 logits upcast to fp32 (log-softmax in fp32), so they
match a fresh bf16 forward over prompt + completion to within `BF16_LOGPROB_ABS` = 0.1 per token (measured
max 0.033 with SDPA's attention, 0.060 with the fast path's compiled decode attention, `kernels.py`: batch
composition, the KV cache and another attention kernel change the rounding, not the maths; both attentions
are as close to an exact float64 attention, mean error 8.3e-4 on bf16 inputs).
Against the fp32 model (a different rounding of every weight) tiny-test's large logits move by up to 0.5
(measured max 0.50, per-sequence mean <= 0.10), hence `BF16_VS_FP32_MAX` = 0.75 per token and
`BF16_VS_FP32_MEAN` = 0.15 per sequence. fp32 keeps its 1e-4 tolerance in test_engine.py. Greedy tokens are
compared with transformers' own bf16 greedy: equal for at least 10 tokens, and a later flip only at a near-tie
(the two tokens within `BF16_NEAR_TIE` = 0.1 nats under a fresh bf16 forward); tiny-test's logits are mostly
far apart (initializer_range 0.3), but one prompt of three flips at token 18 with the compiled attention.
"""

from __future__ import annotations

import pytest
import torch

from mlpo_agents import zoo
from mlpo_agents.engine import LocalEngine

BF16_LOGPROB_ABS = 0.1
BF16_NEAR_TIE = 0.1
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
    """Equal tokens, or a flip at a near-tie only: where the engine's greedy token differs from transformers',
    a fresh bf16 forward over the common prefix scores the two within `BF16_NEAR_TIE` of each other."""
    model, _ = zoo.resolve("tiny-test", dtype="bfloat16")
    futures = [engine.submit(m, max_tokens=20, temperature=0) for m in PROMPTS]  # batched together
    for future in futures:
        result = future.result(timeout=60)
        want = _hf_greedy(model, result.prompt_token_ids, 20)
        got = result.samples[0].token_ids
        assert len(got) == 20 or result.samples[0].finish_reason == "stop"
        same = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(got))
        assert same >= 10
        if same < len(got):
            ids = torch.tensor([result.prompt_token_ids + got[:same]])
            with torch.inference_mode():
                scores = model(ids).logits.float().log_softmax(-1)[0, -1]
            assert abs(scores[got[same]] - scores[want[same]]) <= BF16_NEAR_TIE


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
