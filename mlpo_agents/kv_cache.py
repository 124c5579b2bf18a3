"""The KV cache of LocalEngine's running batch: a transformers DynamicCache whose layers grow in place.

Continuous batching keeps one cache for every row in flight. Each layer is a `GrowingLayer`: a
preallocated (B, H, capacity, D) buffer that a decode step writes into instead of re-concatenating the
whole cache. Rows are left-padded to a common width; the helpers here concatenate prefilled (and growing)
caches into one, and keep a subset of rows while trimming leading all-padding columns.
They hold no engine state: `engine.py` owns the batch (rows, attention mask, positions) and calls them.
"""

from __future__ import annotations

from typing import Any

import torch


def new_growing_cache(config: Any) -> Any:
    """An empty DynamicCache for a model `config` whose layers are all `GrowingLayer`s."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.layers = [_GrowingLayer() for _ in cache.layers]
    return cache


def concat_caches(config: Any, caches: list[Any], width: int) -> Any:
    """A growing cache holding the rows of `caches` (growing or prefilled) in order, left-padded to `width`.

    One rebuild per admission wave: merging prompts one at a time would copy the whole batch per prompt.
    """
    growing = new_growing_cache(config)
    for i, layer in enumerate(growing.layers):
        layer.reset_to([c.layers[i].keys for c in caches], [c.layers[i].values for c in caches], width)
    return growing


def keep_cache_rows(cache: Any, keep: torch.Tensor, start: int, width: int) -> None:
    """Keep rows `keep` (B',) of growing `cache` and drop its first `start` columns, leaving `width`."""
    for layer in cache.layers:
        layer.reset_to([layer.keys[keep, :, start:]], [layer.values[keep, :, start:]], width)


def left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a (B, L) attention mask with False (padding) up to (B, width)."""
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer over a preallocated buffer: appending a token writes in place instead of torch.cat."""

        chunk = 128

        def reset_to(self, keys: list[torch.Tensor], values: list[torch.Tensor], width: int) -> None:
            """Rebuild the buffer from batch blocks (B_i, H, L_i, D), each left-padded to ``width``."""
            first = keys[0]
            batch = sum(k.shape[0] for k in keys)
            capacity = width + self.chunk
            self.dtype, self.device = first.dtype, first.device
            # Uninitialised: columns past `width` are written before they are read; only padding is zeroed
            # (masked, but garbage there could be inf/nan and leak through the attention sum).
            self.key_buffer = first.new_empty(batch, first.shape[1], capacity, first.shape[3])
            self.value_buffer = first.new_empty(batch, values[0].shape[1], capacity, values[0].shape[3])
            row = 0
            for k, v in zip(keys, values, strict=True):
                rows, pad = slice(row, row + k.shape[0]), width - k.shape[2]
                self.key_buffer[rows, :, :pad] = 0
                self.value_buffer[rows, :, :pad] = 0
                self.key_buffer[rows, :, pad:width] = k
                self.value_buffer[rows, :, pad:width] = v
                row += k.shape[0]
            self.length = width
            self.keys = self.key_buffer[:, :, :width]
            self.values = self.value_buffer[:, :, :width]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.key_buffer.shape[2]:
                self.reset_to([self.keys], [self.values], self.length)  # type: ignore[list-item]
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self.keys = self.key_buffer[:, :, :end]
            self.values = self.value_buffer[:, :, :end]
            return self.keys, self.values

    return GrowingLayer


_GROWING_LAYER: type | None = None


def _GrowingLayer() -> Any:  # noqa: N802 - constructor-like factory; transformers is imported lazily
    global _GROWING_LAYER
    if _GROWING_LAYER is None:
        _GROWING_LAYER = _growing_layer_class()
    return _GROWING_LAYER()
