"""The engine's in-place KV cache (`kv_cache.py`) against a plain per-row reference.

Every operation the engine performs (rebuild, rows joining in place with a wider prompt, rows joining when
there is no room, decode steps past the buffer's right room, finished rows replaced by the last ones and
padding columns trimmed) must leave each row's real keys/values exactly as a per-row list would hold them,
right-aligned in the view, and every column of the view finite. Memory outside the view is poisoned with
NaN after each step, so an operation that exposes a column it never wrote fails here.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from mlpo_agents.kv_cache import (
    RIGHT_ROOM,
    append_cache_rows,
    concat_caches,
    fill_order,
    keep_cache_rows,
)

CONFIG = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=8)
HEADS, DIM = 2, 4


def prefilled(lengths: list[int], rng: torch.Generator) -> tuple[DynamicCache, list[list[torch.Tensor]]]:
    """A prefilled block of rows with `lengths` real tokens (left-padded with garbage) and each row's real K/V."""
    width = max(lengths)
    cache = DynamicCache(config=CONFIG)
    real: list[list[torch.Tensor]] = [[] for _ in lengths]
    for layer in range(CONFIG.num_hidden_layers):
        keys = torch.randn(len(lengths), HEADS, width, DIM, generator=rng)
        values = torch.randn(len(lengths), HEADS, width, DIM, generator=rng)
        for row, n in enumerate(lengths):
            keys[row, :, : width - n] = 7.0  # padding of a prefill: finite, masked, not the caller's concern
            real[row].append(torch.cat([keys[row, :, width - n :], values[row, :, width - n :]]))
        cache.update(keys, values, layer)
    return cache, real


def poison(cache) -> None:
    """NaN everywhere in the buffers outside the view, as uninitialised memory could be."""
    for layer in cache.layers:
        for buffer in (layer.key_buffer, layer.value_buffer):
            inside = buffer[: layer.rows, :, layer.start : layer.length].clone()
            buffer.fill_(float("nan"))
            buffer[: layer.rows, :, layer.start : layer.length] = inside


def check(cache, reference: list[list[torch.Tensor]]) -> None:
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape[0] == len(reference)
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
        for row, per_layer in enumerate(reference):
            n = per_layer[i].shape[1]
            got = torch.cat([layer.keys[row, :, -n:], layer.values[row, :, -n:]])
            assert torch.equal(got, per_layer[i]), f"row {row} layer {i}"


def test_fill_order_moves_only_survivors_into_holes():
    assert fill_order(6, {1, 4}) == [0, 5, 2, 3]
    assert fill_order(3, {0, 1, 2}) == []
    assert fill_order(4, {3}) == [0, 1, 2]
    order = fill_order(8, {0, 2, 7})
    assert sorted(order) == [1, 3, 4, 5, 6] and all(order[j] == j or order[j] >= len(order) for j in range(5))


@pytest.mark.parametrize("seed", range(4))
def test_random_batch_life_matches_per_row_reference(seed):
    rng, draw = torch.Generator().manual_seed(seed), random.Random(seed)
    block, reference = prefilled([5, 9, 3], rng)
    cache = concat_caches(CONFIG, [block], 9, rows=6)
    width = 9
    poison(cache)
    check(cache, reference)
    rebuilt = appended = 0
    for _ in range(3 * RIGHT_ROOM):
        action = draw.random()
        if action < 0.08 and len(reference) < 10:  # rows join, sometimes with a longer prompt
            lengths = [draw.randint(1, width + 40) for _ in range(draw.randint(1, 3))]
            block, real = prefilled(lengths, rng)
            width = max(width, *lengths)
            if append_cache_rows(cache, [block], width):
                appended += 1
            else:
                cache = concat_caches(CONFIG, [cache, block], width, rows=6)
                rebuilt += 1
            reference += real
        elif action < 0.16 and len(reference) > 1:  # rows finish; the padding they leave is trimmed
            finished = set(draw.sample(range(len(reference)), draw.randint(1, len(reference) - 1)))
            order = fill_order(len(reference), finished)
            reference = [reference[i] for i in order]
            new_width = max(r[0].shape[1] for r in reference)
            keep_cache_rows(cache, order, width - new_width)
            width = new_width
        else:  # a decode step
            for i, layer in enumerate(cache.layers):
                keys = torch.randn(len(reference), HEADS, 1, DIM, generator=rng)
                values = torch.randn(len(reference), HEADS, 1, DIM, generator=rng)
                layer.update(keys, values)
                for row in range(len(reference)):
                    reference[row][i] = torch.cat(
                        [reference[row][i], torch.cat([keys[row], values[row]])], dim=1
                    )
            width += 1
        assert cache.layers[0].keys.shape[2] == width
        poison(cache)
        check(cache, reference)
    assert appended and rebuilt  # both join paths ran


def test_append_refuses_without_room_and_changes_nothing():
    rng = torch.Generator().manual_seed(0)
    block, reference = prefilled([4, 4], rng)
    cache = concat_caches(CONFIG, [block], 4, rows=2)
    before = cache.layers[0].keys.clone()
    extra, _ = prefilled([3], rng)
    assert not append_cache_rows(cache, [extra], 4)  # no spare row
    assert torch.equal(cache.layers[0].keys, before)
    check(cache, reference)
