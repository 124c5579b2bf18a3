"""The engine's batched sampler (`mlpo_agents.sampling.sample_tokens`): the top-p path looks for the nucleus
among the top candidates instead of sorting the vocabulary, and must draw exactly what a full sort draws
(float32 logits without ties: tied probabilities may be ranked in either order by either path). Every test
runs twice: through the compiled sampler (`kernels.sample_rows`, what the engine uses where it builds) and
through the torch ops it replaces (no C++ compiler, or MLPO_ENGINE_KERNELS=0)."""

from __future__ import annotations

import pytest
import torch

from mlpo_agents import kernels
from mlpo_agents.sampling import NUCLEUS_CANDIDATES, SamplingParams, sample_tokens


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def sampler(request, monkeypatch):
    if request.param == "compiled":
        assert kernels.load() is not None
    else:
        monkeypatch.setattr(kernels, "load", lambda: None)
    return request.param


def full_sort_nucleus(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> int:
    """The reference: sort the whole vocabulary, keep the smallest prefix with top_p mass, inverse CDF."""
    probs = torch.log_softmax(logits / temperature, dim=-1).exp()
    probs, order = probs.sort(descending=True)
    cdf = probs.cumsum(0)
    probs = probs * ((cdf - probs) < top_p)
    cdf = probs.cumsum(0)
    pick = int(torch.searchsorted(cdf, (uniform * cdf[-1]).reshape(1)).clamp(max=len(cdf) - 1))
    return int(order[pick])


def batch(rows: int, vocab: int, seed: int, peaked: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2
    if peaked:  # a language model's usual shape: a few tokens hold most of the mass
        logits[:, :8] += 10 * torch.rand(rows, 8, generator=g)
    return logits


def test_top_p_draws_what_a_full_sort_draws_inside_and_past_the_candidates():
    fallbacks = 0
    for seed in range(40):
        peaked = seed % 2 == 0  # flat rows: the nucleus reaches past the top candidates (full sort)
        logits = batch(6, 3000, seed, peaked)
        for temperature, top_p in ((0.7, 0.95), (1.0, 0.5), (1.5, 0.9)):
            params = [SamplingParams(temperature=temperature, top_p=top_p)] * 6
            tokens, _ = sample_tokens(logits, params, [torch.Generator().manual_seed(seed * 10 + j) for j in range(6)])
            for j in range(6):
                uniform = torch.rand((), generator=torch.Generator().manual_seed(seed * 10 + j))
                assert int(tokens[j]) == full_sort_nucleus(logits[j], temperature, top_p, uniform)
                top = torch.softmax(logits[j] / temperature, -1).topk(NUCLEUS_CANDIDATES).values.sum()
                fallbacks += bool(top < top_p)
    assert fallbacks > 0  # the fallback path was exercised, not only the candidates


def test_a_rows_draw_does_not_depend_on_its_batch_mates_sampling_settings():
    logits = batch(4, 2000, 3, peaked=False)  # flat: which token a uniform lands on depends on the order
    mates = {
        "all nucleus": [SamplingParams(temperature=0.8, top_p=0.9)] * 4,
        "mixed": [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.8),
                  SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_p=0.5)],
    }  # fmt: skip
    drawn = {}
    for name, params in mates.items():
        tokens, logprobs = sample_tokens(logits, params, [torch.Generator().manual_seed(j) for j in range(4)])
        drawn[name] = (int(tokens[0]), float(logprobs[0]))
    assert drawn["all nucleus"] == drawn["mixed"]
    alone, _ = sample_tokens(logits[1:2], [SamplingParams(temperature=0.8)], [torch.Generator().manual_seed(1)])
    mixed, _ = sample_tokens(logits, mates["mixed"], [torch.Generator().manual_seed(j) for j in range(4)])
    assert int(mixed[1]) == int(alone[0]) and int(mixed[2]) == int(logits[2].argmax())


def test_logprobs_are_raw_unless_processed_and_match_a_log_softmax():
    logits = batch(3, 500, 5, peaked=True)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.2)]
    tokens, raw = sample_tokens(logits, params, [torch.Generator().manual_seed(j) for j in range(3)])
    expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(raw, expected, atol=1e-5)
    again, processed = sample_tokens(logits, params, [torch.Generator().manual_seed(j) for j in range(3)], True)
    assert torch.equal(again, tokens)
    for j, temperature in enumerate((1.0, 0.7, 1.2)):  # greedy rows report the raw distribution
        scaled = torch.log_softmax(logits[j] / temperature, -1)[tokens[j]]
        assert abs(float(processed[j]) - float(scaled)) < 1e-5
