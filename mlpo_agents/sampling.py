"""What one request asks for and gets back from the in-process engine, and how its tokens are drawn.

`SamplingParams` (max_tokens, temperature, top_p, n, stop, seed), `Sample` and `GenerationResult` are the
engine's request and result types; `sample_tokens` is the batched sampler the engine calls once per decode
step (see `engine.py` for the logprobs convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlpo_agents import kernels


@dataclass
class SamplingParams:
    """How to sample one request."""

    max_tokens: int = 256
    """Maximum number of completion tokens per sample."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    n: int = 1
    """Number of samples sharing the prompt (prefilled once)."""
    stop: tuple[str, ...] = ()
    """Stop strings; the text is cut before the first one, token ids keep the token that completed it."""
    seed: int | None = None
    """Per-request seed: results do not depend on batch mates. None draws a fresh seed."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in (self.stop or ()) if s)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Sample:
    """One generated sample."""

    token_ids: list[int]
    """Completion token ids, including a final eos / stop-completing token."""
    logprobs: list[float]
    """Logprob of each completion token (see module docstring for the convention)."""
    text: str
    """Decoded completion without special tokens, cut before the stop string."""
    finish_reason: str
    """'stop' (eos or stop string) or 'length'."""


@dataclass
class GenerationResult:
    """Everything one request produced."""

    prompt_token_ids: list[int]
    samples: list[Sample]
    adapter: str | None
    latency_s: float = 0.0


NUCLEUS_CANDIDATES = 64
"""Most likely tokens a top-p row's nucleus is looked for among (`torch.topk`) before the row falls back to
sorting its whole vocabulary (49k entries for SmolLM2, 152k for Qwen2.5-Coder, every decode step). When the
candidates hold at least top_p of the mass the nucleus is exactly the one a full sort finds (every token past
them has at least top_p mass before it, so it is cut), and so is the distribution drawn from; the token a
given uniform lands on can differ only among tokens of equal probability, which the two orders may rank
differently (frequent with bf16 logits). Measured (`benchmarks/bench_sampler.py`, bf16, 16 requests at
T 0.7 / top-p 0.95): sampled generation 1.25x (SmolLM2) and 1.37x (Qwen2.5-Coder) the tokens/s of the full
sort, and 2 of 1985 rows needed the fallback."""


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column index (S,) drawn from unnormalised probabilities (S, N) with one uniform per row."""
    cdf = probs.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1]).to(cdf.dtype)[:, None]
    return torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1).squeeze(1)


def _nucleus(probs: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids (S,) from probabilities sorted descending (S, N) whose vocabulary ids are `order`: the
    smallest prefix with at least `top_p` mass (always the most likely token), inverse-CDF sampled."""
    keep = (probs.cumsum(dim=-1) - probs) < top_p[:, None]
    picks = _inverse_cdf(probs * keep, uniforms)
    return order.gather(1, picks[:, None]).squeeze(1)


def _top_p_tokens(scaled: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Nucleus samples (S,) from scaled log-probabilities (S, V): among the top `NUCLEUS_CANDIDATES` tokens
    of each row, or from a full sort for a row whose candidates hold less than its `top_p`."""
    k = min(NUCLEUS_CANDIDATES, scaled.shape[-1])
    top, order = scaled.topk(k, dim=-1)  # sorted descending
    probs = top.exp()
    tokens = _nucleus(probs, order, top_p, uniforms)
    short = (probs.sum(dim=-1) < top_p).nonzero().squeeze(1)  # the nucleus may reach past the candidates
    if len(short):
        full, full_order = scaled[short].exp().sort(dim=-1, descending=True)
        tokens[short] = _nucleus(full, full_order, top_p[short], uniforms[short])
    return tokens


def _draw(scaled: torch.Tensor, top_ps: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids (S,) from scaled log-probabilities (S, V): the whole vocabulary for rows with top_p 1,
    the nucleus for the others (no copy of the batch when every row takes the same path)."""
    whole = top_ps >= 1.0
    if bool(whole.all()):
        return _inverse_cdf(scaled.exp(), uniforms)
    if not bool(whole.any()):
        return _top_p_tokens(scaled, top_ps, uniforms)
    picks = torch.empty(len(top_ps), dtype=torch.long, device=scaled.device)
    rows, nucleus = whole.nonzero().squeeze(1), (~whole).nonzero().squeeze(1)
    picks[rows] = _inverse_cdf(scaled[rows].exp(), uniforms[rows])
    picks[nucleus] = _top_p_tokens(scaled[nucleus], top_ps[nucleus], uniforms[nucleus])
    return picks


def sample_tokens(
    logits: torch.Tensor,  # (B, V) float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    processed_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its logprob, batched: greedy rows (temperature 0) take the argmax, others
    inverse-CDF sampling with one uniform from the row's own generator, over the whole vocabulary or, with
    top_p < 1, over the row's nucleus; what a row draws depends on its own logits, params and generator
    only, never on its batch mates. Logprobs are raw (T = 1) unless `processed_logprobs` (then under the
    temperature-scaled distribution, top-p never included)."""
    temps = [p.temperature for p in params]
    ops = kernels.load() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if ops is not None:
        return _sample_compiled(ops, logits, params, generators, processed_logprobs)
    if not processed_logprobs and not any(temps):
        # All greedy: argmax of the logits (what transformers' greedy takes) without materialising (B, V).
        best, tokens = logits.max(dim=-1)
        return tokens, best - logits.logsumexp(dim=-1)
    device = logits.device
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=device)
    greedy = [j for j, t in enumerate(temps) if t == 0]
    if greedy:
        rows = torch.tensor(greedy, device=device)
        tokens[rows] = logits[rows].argmax(dim=-1)
    sampled = [j for j, t in enumerate(temps) if t > 0]
    scaled = None
    if sampled:
        idx = torch.tensor(sampled, device=device)
        temp = torch.tensor([temps[j] for j in sampled], device=device, dtype=logits.dtype)
        chosen = logits if len(sampled) == len(temps) else logits[idx]
        scaled = torch.log_softmax(chosen / temp[:, None], dim=-1)  # (S, V)
        uniforms = torch.stack([torch.rand((), generator=generators[j], device=device) for j in sampled])
        top_ps = torch.tensor([params[j].top_p for j in sampled], device=device, dtype=scaled.dtype)
        picks = _draw(scaled, top_ps, uniforms)
        tokens[idx] = picks
    # The chosen tokens' raw logprobs: one log-normaliser per row, never a (B, V) log-softmax.
    logprobs = logits.gather(1, tokens[:, None]).squeeze(1) - logits.logsumexp(dim=-1)
    if processed_logprobs and scaled is not None:
        logprobs[idx] = scaled.gather(1, picks[:, None]).squeeze(1)
    return tokens, logprobs


def _sample_compiled(
    ops: Any, logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
    processed_logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` through the compiled kernel (`kernels.cpp`, `sample_rows`): the same draws from the same
    uniforms (one per sampled row from its generator) in two passes over each row instead of a dozen torch ops
    over the batch (SmolLM2's ~16 rows in the team workload: 2.8 -> 0.83 ms a step); a top-p row whose candidates hold less than
    top_p is drawn again from a full sort here."""
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    uniforms = torch.tensor(
        [float(torch.rand((), generator=g)) if p.temperature > 0 else 0.0 for p, g in zip(params, generators, strict=True)],
        dtype=torch.float32,
    )
    tokens, raw, scaled, full = ops.sample_rows(logits, temps, top_ps, uniforms, NUCLEUS_CANDIDATES)
    if bool(full.any()):
        rows = full.nonzero().squeeze(1)
        again = torch.log_softmax(logits[rows] / temps[rows, None], dim=-1)
        tokens[rows] = _top_p_tokens(again, top_ps[rows], uniforms[rows])
        picked = tokens[rows, None]
        raw[rows] = (logits[rows].gather(1, picked).squeeze(1) - logits[rows].logsumexp(dim=-1))
        scaled[rows] = again.gather(1, picked).squeeze(1)
    return tokens, scaled if processed_logprobs else raw
