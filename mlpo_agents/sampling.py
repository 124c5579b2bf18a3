"""What one request asks for and gets back from the in-process engine, and how its tokens are drawn.

`SamplingParams` (max_tokens, temperature, top_p, n, stop, seed), `Sample` and `GenerationResult` are the
engine's request and result types; `sample_tokens` is the batched sampler the engine calls once per decode
step (see `engine.py` for the logprobs convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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


def sample_tokens(
    logits: torch.Tensor,  # (B, V) float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    processed_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its logprob, batched: greedy rows (temperature 0) take the argmax, others
    inverse-CDF sampling with one uniform from the row's own generator (so a row's draw does not depend
    on its batch mates), with top-p truncation when asked. Logprobs are raw (T = 1) unless
    `processed_logprobs` (then under the temperature-scaled distribution, top-p never included)."""
    temps = [p.temperature for p in params]
    if not processed_logprobs and not any(temps):
        # All greedy: argmax of the logits (what transformers' greedy takes) without materialising (B, V).
        best, tokens = logits.max(dim=-1)
        return tokens, best - logits.logsumexp(dim=-1)
    raw_logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    tokens = raw_logprobs.argmax(dim=-1)  # (B,)
    chosen_logprobs = raw_logprobs
    sampled = [j for j, t in enumerate(temps) if t > 0]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        temp = torch.tensor([temps[j] for j in sampled], device=logits.device, dtype=logits.dtype)
        scaled = torch.log_softmax(logits[idx] / temp[:, None], dim=-1)  # (S, V)
        probs = scaled.exp()
        top_ps = [params[j].top_p for j in sampled]
        uniforms = torch.stack(
            [torch.rand((), generator=generators[j], device=logits.device) for j in sampled]
        )
        if all(p >= 1.0 for p in top_ps):
            order = None
            cdf = probs.cumsum(dim=-1)
        else:
            probs, order = probs.sort(dim=-1, descending=True)
            cdf = probs.cumsum(dim=-1)
            top_p = torch.tensor(top_ps, device=logits.device, dtype=probs.dtype)
            keep = (cdf - probs) < top_p[:, None]  # always keeps the most likely token
            probs = probs * keep
            cdf = probs.cumsum(dim=-1)
        target = (uniforms * cdf[:, -1]).to(cdf.dtype)[:, None]
        picks = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1).squeeze(1)  # (S,)
        if order is not None:
            picks = order.gather(1, picks[:, None]).squeeze(1)
        tokens[idx] = picks
        if processed_logprobs:
            chosen_logprobs = raw_logprobs.clone()
            chosen_logprobs[idx] = scaled
    return tokens, chosen_logprobs.gather(1, tokens[:, None]).squeeze(1)
