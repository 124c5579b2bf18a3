"""The KV cache of LocalEngine's running batch: a transformers DynamicCache whose layers change in place.

Continuous batching keeps one cache for every row in flight, rows left-padded to a common width. Each layer
is a `GrowingLayer`: a preallocated (rows, H, columns, D) buffer of which the batch is a view
`buffer[:n, :, start:length]`. The buffer keeps room on three sides, so the batch's usual changes copy
nothing but what changed:
- a decode step writes its token into the column after the view (room right: `RIGHT_ROOM` columns);
- rows that join are written into spare rows below the view, the view widening to the left if their prompt
  is longer (room left: `LEFT_ROOM` columns, row capacity: the engine's batch size);
- rows that finish are replaced by the last rows of the batch (one row copy per finished row), and leading
  all-padding columns are dropped by moving the view's start.
Only when the room runs out is the buffer rebuilt (`concat_caches`), with fresh room on every side.
Every column inside the view holds finite values: padding is masked out of attention, but inf/nan there
would still leak through the attention sum.
They hold no engine state: `engine.py` owns the batch (rows, attention mask, positions) and calls them.
"""

from __future__ import annotations

from typing import Any

import torch

from mlpo_agents import kernels

LEFT_ROOM = 256
"""Free columns left of the view after a rebuild: a prompt up to this much longer than the batch joins in place."""
RIGHT_ROOM = 128
"""Free columns right of the view after a rebuild: decode steps before the next rebuild."""


def new_growing_cache(config: Any) -> Any:
    """An empty DynamicCache for a model `config` whose layers are all `GrowingLayer`s."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.layers = [_GrowingLayer() for _ in cache.layers]
    return cache


def concat_caches(config: Any, caches: list[Any], width: int, rows: int = 0) -> Any:
    """A growing cache holding the rows of `caches` (growing or prefilled) in order, left-padded to `width`,
    with room for `rows` rows in all (at least the rows given)."""
    growing = new_growing_cache(config)
    for i, layer in enumerate(growing.layers):
        layer.reset_to([c.layers[i].keys for c in caches], [c.layers[i].values for c in caches], width, rows)
    return growing


def append_cache_rows(cache: Any, caches: list[Any], width: int) -> bool:
    """Append the rows of prefilled `caches` to growing `cache` in place, the batch left-padded to `width`.

    Returns False, changing nothing, when the buffer has no room for them (the caller rebuilds instead).
    """
    rows = sum(c.layers[0].keys.shape[0] for c in caches)
    if not all(layer.has_room(rows, width) for layer in cache.layers):
        return False
    for i, layer in enumerate(cache.layers):
        layer.append_rows([c.layers[i].keys for c in caches], [c.layers[i].values for c in caches], width)
    return True


def keep_cache_rows(cache: Any, order: list[int], trim: int) -> None:
    """Row j of growing `cache` becomes its row `order[j]`, in place (the moved rows gathered first, then
    written); the first `trim` columns are dropped."""
    ops = kernels.load()
    moved = [row for row, source in enumerate(order) if row != source]
    if ops is None or not moved:
        for layer in cache.layers:
            layer.keep_rows(order, trim)
        return
    first = cache.layers[0]
    buffers = [buffer for layer in cache.layers for buffer in (layer.key_buffer, layer.value_buffer)]
    ops.copy_rows(buffers, moved, [order[row] for row in moved], first.start + trim, first.length)
    for layer in cache.layers:
        layer.keep_rows(order, trim, copied=True)


def fill_order(rows: int, finished: set[int]) -> list[int]:
    """The row order after `finished` rows leave a batch of `rows`: survivors stay, the last survivors fill the
    holes, so only as many rows move as finished before the batch's end."""
    kept = rows - len(finished)
    order = list(range(kept))
    tail = [i for i in range(kept, rows) if i not in finished]
    holes = [i for i in range(kept) if i in finished]
    for hole, row in zip(holes, tail, strict=True):
        order[hole] = row
    return order


def left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a (B, L) attention mask with False (padding) up to (B, width)."""
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer over a preallocated buffer; the batch is the view `buffer[:n, :, start:length]`."""

        def reset_to(self, keys: list[torch.Tensor], values: list[torch.Tensor], width: int, rows: int = 0) -> None:
            """Rebuild the buffer from batch blocks (B_i, H, L_i, D), each left-padded to `width`."""
            first = keys[0]
            batch = sum(k.shape[0] for k in keys)
            capacity = LEFT_ROOM + width + RIGHT_ROOM
            self.dtype, self.device = first.dtype, first.device
            # Uninitialised: columns are written (or zeroed) before the view reaches them.
            shape = (max(batch, rows), first.shape[1], capacity, first.shape[3])
            self.key_buffer = first.new_empty(shape)
            self.value_buffer = first.new_empty(*shape[:3], values[0].shape[3])
            self.rows, self.start, self.length = 0, LEFT_ROOM, LEFT_ROOM + width
            self._write_rows(keys, values)
            self.is_initialized = True

        def has_room(self, rows: int, width: int) -> bool:
            return self.rows + rows <= self.key_buffer.shape[0] and self.length - width >= 0

        def append_rows(self, keys: list[torch.Tensor], values: list[torch.Tensor], width: int) -> None:
            """Write blocks (B_i, H, L_i, D) into spare rows, the view widened to `width` if it is narrower."""
            start = min(self.start, self.length - width)
            if start < self.start:  # the view widens: the old rows' new columns are padding
                self.key_buffer[: self.rows, :, start : self.start] = 0
                self.value_buffer[: self.rows, :, start : self.start] = 0
                self.start = start
            self._write_rows(keys, values)

        def _write_rows(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
            """Blocks into the rows after the view's last, right-aligned at `length`, padding zeroed."""
            for k, v in zip(keys, values, strict=True):
                rows, pad = slice(self.rows, self.rows + k.shape[0]), self.length - k.shape[2]
                self.key_buffer[rows, :, self.start : pad] = 0
                self.value_buffer[rows, :, self.start : pad] = 0
                self.key_buffer[rows, :, pad : self.length] = k
                self.value_buffer[rows, :, pad : self.length] = v
                self.rows += k.shape[0]
            self._view()

        def keep_rows(self, order: list[int], trim: int, copied: bool = False) -> None:
            """`keep_cache_rows` for this layer; `copied`: the rows were already moved (one kernel call for
            every layer)."""
            self.start += trim
            moved = [row for row, source in enumerate(order) if row != source]
            if moved and not copied:  # one gather, then one scatter, per buffer
                columns, device = slice(self.start, self.length), self.key_buffer.device
                rows, sources = (
                    torch.tensor(moved, device=device),
                    torch.tensor([order[r] for r in moved], device=device),
                )
                for buffer in (self.key_buffer, self.value_buffer):
                    buffer[:, :, columns].index_copy_(0, rows, buffer[sources, :, columns])
            self.rows = len(order)
            self._view()

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            keys, values = self.reserve(key_states.shape[-2])
            keys.copy_(key_states)
            values.copy_(value_states)
            return self.keys, self.values

        def reserve(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
            """The view widened by `tokens` columns on the right; returns those columns of the keys and values
            (B, H, tokens, D), for the caller to write."""
            end = self.length + tokens
            if end > self.key_buffer.shape[2]:  # no room right: rebuild with fresh room
                keys, values = self.keys, self.values  # views that keep the old buffer alive while it is copied
                self.reset_to([keys], [values], keys.shape[2], self.key_buffer.shape[0])  # type: ignore[list-item,union-attr]
                end = self.length + tokens
            columns = slice(self.length, end)
            self.length = end
            self._view()
            return self.key_buffer[: self.rows, :, columns], self.value_buffer[: self.rows, :, columns]

        def _view(self) -> None:
            self.keys = self.key_buffer[: self.rows, :, self.start : self.length]
            self.values = self.value_buffer[: self.rows, :, self.start : self.length]

    return GrowingLayer


_GROWING_LAYER: type | None = None


def _GrowingLayer() -> Any:  # noqa: N802 - constructor-like factory; transformers is imported lazily
    global _GROWING_LAYER
    if _GROWING_LAYER is None:
        _GROWING_LAYER = _growing_layer_class()
    return _GROWING_LAYER()
