"""Prefill of one admission wave of LocalEngine: a few left-padded forwards instead of one per request.

Requests that arrive together are prefilled together. Identical prompts with the same adapter (peers of
one question sending the same prompt with different seeds) take one prefill row whose KV cache is repeated,
as the `n` samples of one request already are; sampling stays per request. The distinct prompts are sorted
by length and split into forwards (`plan_forwards`), each row with its own adapter. A block is left-padded
the way the running batch is (`kv_cache.py`): a (R, L) bool mask and positions counted from each row's first
real token, so it merges into the batch like any other. If a batched forward raises, its prompts are
prefilled one by one, so only the prompt that fails alone fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# The padding rule. Distinct prompts are sorted longest first and packed greedily: a prompt joins the
# current forward while its padded size (rows x longest prompt) stays within MAX_PADDED_RATIO x its real
# tokens and within MAX_FORWARD_TOKENS. On CPU a forward of more than a few dozen tokens is compute-bound,
# so its cost grows with its padded tokens: 1.25 caps the wasted work at 20% of any forward, while prompts
# of similar length (the usual wave: one question asked of several peers) still share one forward. The
# token cap bounds a prefill's peak memory (eager attention holds rows x heads x L^2 scores) near that of
# a few long prompts; a forward that big is compute-bound already, so a larger one would not be faster.
MAX_PADDED_RATIO = 1.25
MAX_FORWARD_TOKENS = 4096
PAD_TOKEN_ID = 0
"""Any id in the vocabulary: padding positions are masked out of attention."""


@dataclass
class WavePrompt:
    """One admitted request as the prefill sees it."""

    token_ids: list[int]
    """The prompt's token ids."""
    adapter: str | None
    """The LoRA adapter of its rows (None = the base model)."""
    rows: int
    """Batch rows it takes (its n samples), all sharing its prefill."""


@dataclass
class PrefilledBlock:
    """Prefilled rows, ready to merge into the running batch."""

    members: list[int]
    """Wave indices of its prompts in row order; prompt i takes `wave[i].rows` consecutive rows."""
    cache: Any
    """DynamicCache of (R, H, L, D) layers, rows left-padded to L."""
    mask: torch.Tensor
    """(R, L) bool, True = real token."""
    logits: torch.Tensor
    """(R, V) float32 logits after each row's last prompt token (its first sample)."""


@dataclass
class WavePrefill:
    """What `prefill_wave` returns."""

    blocks: list[PrefilledBlock]
    """One per successful forward."""
    failures: dict[int, Exception]
    """Wave index -> the error its prefill raised when run alone."""


def plan_forwards(lengths: list[int]) -> list[list[int]]:
    """Split prompts of `lengths` into forwards (lists of indices, longest first) under the padding rule."""
    forwards: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if forwards:
            padded = lengths[forwards[-1][0]] * (len(forwards[-1]) + 1)
            if padded <= MAX_PADDED_RATIO * (real + lengths[i]) and padded <= MAX_FORWARD_TOKENS:
                forwards[-1].append(i)
                real += lengths[i]
                continue
        forwards.append([i])
        real = lengths[i]
    return forwards


def prefill_wave(
    wave: list[WavePrompt],
    forward: Callable[..., torch.Tensor],
    config: Any,
    device: torch.device,
    stats: dict[str, int],
) -> WavePrefill:
    """Prefill `wave`, one row per distinct (prompt, adapter); counts forwards and real tokens in `stats`.

    `forward(input_ids, attention_mask, position_ids, cache, adapters)` is the engine's forward: it fills
    `cache` and returns the last position's logits (B, V).
    """
    distinct: dict[tuple[tuple[int, ...], str | None], list[int]] = {}
    for i, prompt in enumerate(wave):
        distinct.setdefault((tuple(prompt.token_ids), prompt.adapter), []).append(i)
    groups = list(distinct.values())  # wave indices sharing one prefill row
    plan = plan_forwards([len(wave[group[0]].token_ids) for group in groups])
    pending = [[groups[j] for j in forward_groups] for forward_groups in plan]
    result = WavePrefill([], {})
    while pending:
        chunk = pending.pop(0)
        try:
            result.blocks.append(_prefill_forward(wave, chunk, forward, config, device, stats))
        except Exception as exc:
            if len(chunk) > 1:  # retry its prompts alone: only the one that raises alone fails
                pending.extend([group] for group in chunk)
            else:
                result.failures.update(dict.fromkeys(chunk[0], exc))
    return result


def _prefill_forward(
    wave: list[WavePrompt],
    chunk: list[list[int]],
    forward: Callable[..., torch.Tensor],
    config: Any,
    device: torch.device,
    stats: dict[str, int],
) -> PrefilledBlock:
    """One forward over the distinct prompts of `chunk`, then each row repeated for the requests sharing it."""
    from transformers import DynamicCache

    prompts = [wave[group[0]].token_ids for group in chunk]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[PAD_TOKEN_ID] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
    adapters = [wave[group[0]].adapter for group in chunk]
    cache = DynamicCache(config=config)
    if bool(mask.all()):  # no padding: the plain causal forward
        logits = forward(input_ids, None, None, cache, adapters)
    else:
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (R, L), 0 on the padding
        logits = forward(input_ids, mask.to(torch.long), positions, cache, adapters)
    stats["prefill_forwards"] += 1
    stats["prefill_tokens"] += sum(len(p) for p in prompts)
    members = [i for group in chunk for i in group]
    rows = [k for k, group in enumerate(chunk) for i in group for _ in range(wave[i].rows)]
    index = torch.tensor(rows, device=device)
    if len(rows) > len(chunk):
        cache.batch_select_indices(index)
    return PrefilledBlock(members, cache, mask[index], logits[index])
