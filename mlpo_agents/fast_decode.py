"""LocalEngine's forwards for Llama-family models (Llama, Qwen2) without transformers' module stack.

A decode step feeds one token per row through every layer. Through transformers' modules that is ~45 small
ops and a dozen `nn.Module` calls a layer, which on a CPU cost more than the weights they read for a small
model (SmolLM2-135M bf16, one row: ~30 ms a step, of which reading the weights is ~11 ms). `FastDecoder` runs
the same arithmetic as plain function calls over the same weights, with q/k/v fused into one matmul and
gate/up into another (prepacked for oneDNN, see `packed_linear.py`), the rotary embedding applied
to q and k together, keys and values written straight into the engine's growing cache. The math is
transformers' own (same RMSNorm formula and dtype casts, same SDPA call), so its outputs match the module
path's within floating-point summation order; `tests/test_fast_decode.py` pins that.

With packed weights, prefill takes the same function with T tokens a row (a wave's left-padded
prompts: causal attention over each row's real tokens, `prefill_mask`), 1.1-1.45x faster than the modules
(SmolLM2-135M, 1-8 prompts of 66-300 tokens).

Where the compiled kernels build (`kernels.py`, `FastDecoder.kernels`), a layer's small ops are five fused calls
(`_fused_step`): RMSNorm with the residual add before it, the rotary embedding writing keys and values straight
into the cache's buffer, SiLU-gate times up, and a decode step's attention over each row's real columns only (the
batch's left padding is never read). `benchmarks/bench_decode_step.py` (SmolLM2 bf16, greedy, no padding), with
and without them (`MLPO_ENGINE_KERNELS=0`, which also turns off the compiled sampler): 18.2 / 27.4 / 31.8 ms a step
at 1 / 16 / 32 rows against 27.5 / 34.8 / 46.7; where rows are padded the attention saving grows with the padding.

Rows decoding under a LoRA adapter take the adapter's low-rank updates here too (`lora_for`, fused per linear
by `fuse_lora`): per adapter, `scale * B(A x)` is added to the rows that use it. DoRA and other peft variants, adapters on some layers
only, and other architectures keep transformers' modules (`FastDecoder.build` returns None).
`MLPO_ENGINE_FAST_DECODE=0` turns it off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlpo_agents import kernels
from mlpo_agents.packed_linear import PackedLinear, use_packed

SUPPORTED = ("llama", "qwen2")


@dataclass
class _Linear:
    """A linear layer as the fast path calls it: one oneDNN-packed weight for its fused modules, or each module's
    own weight and bias, outputs concatenated (no copy of the weights). An fp32 call of fewer than
    `FP32_PACKED_MIN_ROWS` rows takes the module weights even where a packed one exists (faster there)."""

    parts: list[tuple[torch.Tensor, torch.Tensor | None]]
    packed: Any = None
    bias: torch.Tensor | None = None  # the packed weight's (fused) bias
    widths: tuple[int, ...] = ()  # each module's share of the output

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and use_packed(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")
        if len(self.parts) == 1:
            return F.linear(x, *self.parts[0])
        return torch.cat([F.linear(x, w, b) for w, b in self.parts], dim=-1)


def _linear(modules: list[nn.Linear], pack: bool) -> _Linear:
    parts: list[tuple[torch.Tensor, torch.Tensor | None]] = [
        (m.weight.detach(), None if m.bias is None else m.bias.detach()) for m in modules
    ]
    widths = tuple(w.shape[0] for w, _ in parts)
    if len(modules) == 1:  # the engine's own packed weight, if it has one
        return _Linear(parts, getattr(modules[0], "packed_weight", None), parts[0][1], widths)
    if not pack:
        return _Linear(parts, widths=widths)
    weight = torch.cat([w for w, _ in parts]).contiguous()
    bias = None if parts[0][1] is None else torch.cat([b for _, b in parts if b is not None])
    return _Linear(parts, torch.ops.mkldnn._reorder_linear_weight(weight, 16), bias, widths)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: _Linear
    o: _Linear
    post_norm: torch.Tensor
    gate_up: _Linear
    down: _Linear


LoraUpdate = tuple[torch.Tensor, torch.Tensor, float]
"""(A (r, in), B (out, r), scale) of one adapted module, as peft holds it (`lora_for`)."""

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
"""The fast path's linears as it calls them (`_Layer`: qkv, o, gate_up, down), by the modules they fuse."""
FusedUpdate = tuple[torch.Tensor, torch.Tensor]
"""(A (R, in), B (out, R)) of one fast-path linear: its modules' A stacked, their B scaled and block-diagonal."""
FusedLora = list[tuple[FusedUpdate | None, ...]]
"""An adapter's updates for the fast path (`fuse_lora`): per layer, one per `FUSED` linear (None: not adapted)."""


class FastDecoder:
    """Forwards of one Llama-family model: decode steps, and prefill with packed weights (see module
    docstring); `build` says whether it applies."""

    def __init__(self, model: Any, pack: bool) -> None:
        config, inner = model.config, model.model
        self.model = model
        # Prefill takes this path with packed weights only: without them the fused linears' outputs are
        # concatenated, which at prefill shapes was 5-9% slower than the modules (SmolLM2 fp32, 66-300 tokens).
        self.prefills = pack
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    layer.input_layernorm.weight,
                    _linear([attn.q_proj, attn.k_proj, attn.v_proj], pack),
                    _linear([attn.o_proj], pack),
                    layer.post_attention_layernorm.weight,
                    _linear([mlp.gate_proj, mlp.up_proj], pack),
                    _linear([mlp.down_proj], pack),
                )
            )
            for module in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                if isinstance(module, PackedLinear):  # fused here: one packed copy of these weights is enough
                    del module.packed_weight
                    module.__class__ = nn.Linear  # type: ignore[assignment]
        self.norm = inner.norm.weight
        self.lm_head = _linear([model.lm_head], pack)
        self.kernels = kernels.load() if model.dtype in (torch.float32, torch.bfloat16) else None

    @classmethod
    def build(cls, model: Any, pack: bool) -> FastDecoder | None:
        """A FastDecoder for `model`, or None when it is not a plain Llama-family decoder (or turned off).
        `pack`: fuse and prepack the weights for oneDNN (the engine packed its linears)."""
        config = model.config
        if os.environ.get("MLPO_ENGINE_FAST_DECODE", "1") == "0":
            return None
        plain = (
            config.model_type in SUPPORTED
            and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "mlp_bias", False)
            and not getattr(config, "use_sliding_window", False)
            and config._attn_implementation == "sdpa"
            and all(
                kind == "full_attention"
                for kind in getattr(config, "layer_types", None) or ["full_attention"]
            )
        )
        return cls(model, pack) if plain else None

    def _rms(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm / Qwen2RMSNorm, op for op (same rounding)
        hf = h.float()
        return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype)

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache: Any,
        lora: list[tuple[torch.Tensor | None, FusedLora]] | None = None,
    ) -> torch.Tensor:
        """T tokens per row through every layer: a decode step (T = 1) or a prefill. input_ids (B, T);
        position_ids (B, T), None for 0..T-1; `mask`: bool (B, 1, T, L) over the cache's columns plus
        these T, or None for plain causal attention (a prefill into an empty cache, no padding). Writes
        the rows' keys and values into `cache`; returns the last position's logits (B, V) fp32. `lora`:
        per adapter, (row indices or None for every row, its `fuse_lora` updates)."""
        rows, tokens = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(tokens, device=input_ids.device).expand(rows, tokens)
        h = self.model.model.embed_tokens(input_ids)
        cos, sin = self.model.model.rotary_emb(h, position_ids)
        if self.kernels is not None:
            return self._fused_step(h, cos, sin, mask, cache, lora)
        heads, kv, dim = self.heads, self.kv_heads, self.head_dim
        cos, sin, half = cos[:, None], sin[:, None], dim // 2
        causal = mask is None and tokens > 1
        for i, layer in enumerate(self.layers):
            x = self._rms(h, layer.input_norm)
            qkv = _adapted(layer.qkv, x, lora, i, 0)
            t = qkv.view(rows, tokens, heads + 2 * kv, dim).transpose(1, 2)
            qk = t[:, : heads + kv]  # q and k rotated together: (B, H + KV, T, D)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            keys, values = cache.layers[i].update(qk[:, heads:], t[:, heads + kv :])
            att = F.scaled_dot_product_attention(
                qk[:, :heads],
                keys,
                values,
                attn_mask=mask,
                is_causal=causal,
                scale=self.scaling,
                enable_gqa=heads != kv,
            )
            att = att.transpose(1, 2).reshape(rows, tokens, heads * dim)
            h = h + _adapted(layer.o, att, lora, i, 1)
            x = self._rms(h, layer.post_norm)
            gate_up = _adapted(layer.gate_up, x, lora, i, 2)
            inner = gate_up.shape[-1] // 2
            y = F.silu(gate_up[..., :inner]) * gate_up[..., inner:]
            h = h + _adapted(layer.down, y, lora, i, 3)
        return self.lm_head(self._rms(h[:, -1:], self.norm))[:, -1, :].float()

    def _fused_step(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any, cache: Any, lora: Any
    ) -> torch.Tensor:
        """`step` through the compiled kernels (`kernels.py`): the same arithmetic in five fused calls a layer
        besides the linears; a decode step's attention reads each row's real columns only."""
        ops: Any = self.kernels
        eps = self.eps
        rows, tokens, _ = h.shape
        heads, kv, dim = self.heads, self.kv_heads, self.head_dim
        first = _first_real_columns(mask) if tokens == 1 and mask is not None else None
        causal = mask is None and tokens > 1
        x = ops.rms_norm(h, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            qkv = _adapted(layer.qkv, x, lora, i, 0)
            q = qkv.new_empty(rows, heads, tokens, dim)
            layer_cache = cache.layers[i]
            if hasattr(layer_cache, "reserve"):  # the engine's growing cache: k and v go straight into its buffer
                k, v = layer_cache.reserve(tokens)
                ops.rotary_split(qkv, cos, sin, heads, kv, q, k, v)
                keys, values = layer_cache.keys, layer_cache.values
            else:
                k, v = qkv.new_empty(rows, kv, tokens, dim), qkv.new_empty(rows, kv, tokens, dim)
                ops.rotary_split(qkv, cos, sin, heads, kv, q, k, v)
                keys, values = layer_cache.update(k, v)
            if first is not None:
                att = ops.decode_attention(q, keys, values, first, self.scaling)
            else:
                att = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, is_causal=causal, scale=self.scaling, enable_gqa=heads != kv
                )
                att = att.transpose(1, 2).reshape(rows, tokens, heads * dim)
            x = ops.add_rms_norm_(h, _adapted(layer.o, att, lora, i, 1), layer.post_norm, eps)
            y = ops.silu_mul(_adapted(layer.gate_up, x, lora, i, 2))
            down = _adapted(layer.down, y, lora, i, 3)
            if i + 1 < len(self.layers):
                x = ops.add_rms_norm_(h, down, self.layers[i + 1].input_norm, eps)
        last = (h[:, -1:] + down[:, -1:]).contiguous()
        return self.lm_head(ops.rms_norm(last, self.norm, eps))[:, -1, :].float()


def _first_real_columns(mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's first real column of a decode step's (B, 1, 1, L) bool mask, when every row's real columns
    run from there to the end (the engine's left-padded batch); None otherwise (attention then takes the mask)."""
    flat = mask.reshape(mask.shape[0], -1)
    if flat.dtype != torch.bool or not bool((flat[:, 1:] >= flat[:, :-1]).all() and flat[:, -1].all()):
        return None
    first = flat.shape[1] - flat.sum(-1)
    return first


def prefill_mask(mask: torch.Tensor) -> torch.Tensor:
    """The (R, 1, L, L) bool attention mask of a left-padded prefill from its (R, L) mask (True = real token):
    causal over the real tokens; a padding position attends to itself alone, so its (unused) keys and values
    stay finite, as the growing cache requires."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=mask.device)
    return (causal & mask.bool()[:, None, None, :]) | eye


def _adapted(linear: _Linear, x: torch.Tensor, lora: Any, layer: int, fused: int) -> torch.Tensor:
    """`linear(x)` (the `FUSED[fused]` modules) plus each adapter's low-rank update on its rows, as peft's
    mixed-batch forward adds it (input cast to the LoRA weights' dtype, update cast back, then added)."""
    out = linear(x)
    for rows, updates in lora or ():
        update = updates[layer][fused]
        if update is None:
            continue
        a, b = update
        xs = x if rows is None else x.index_select(0, rows)
        delta = F.linear(F.linear(xs.to(a.dtype), a), b).to(out.dtype)
        out = out + delta if rows is None else out.index_add(0, rows, delta)
    return out


def fuse_lora(updates: dict[str, list[LoraUpdate]] | None, decoder: FastDecoder) -> FusedLora | None:
    """`lora_for`'s updates as `decoder` applies them, built once per loaded adapter: one A and one B per fused
    linear (two matmuls a fused linear instead of two per module and a concatenation), the scale folded into
    B (no multiply per step); a module the adapter leaves out has zero rows in B, so its share is exactly zero.
    A and B keep their dtype (float32 from peft): in bf16 these small matmuls measured 2x slower than fp32."""
    if updates is None:
        return None
    fused: FusedLora = []
    for i, layer in enumerate(decoder.layers):
        per_linear: list[FusedUpdate | None] = []
        for names, linear in zip(FUSED, (layer.qkv, layer.o, layer.gate_up, layer.down), strict=True):
            present = [(j, updates[name][i]) for j, name in enumerate(names) if name in updates]
            if not present:
                per_linear.append(None)
                continue
            a = torch.cat([a for _, (a, _, _) in present])
            b = a.new_zeros(sum(linear.widths), a.shape[0])
            offsets = [sum(linear.widths[:j]) for j in range(len(names) + 1)]
            col = 0
            for j, (_, part_b, scale) in present:
                rank = part_b.shape[1]
                b[offsets[j] : offsets[j + 1], col : col + rank] = part_b * scale
                col += rank
            per_linear.append((a, b))
        fused.append(tuple(per_linear))
    return fused


def lora_for(peft_model: Any, adapter: str, layers: int) -> dict[str, list[LoraUpdate]] | None:
    """The LoRA updates of `adapter` in `peft_model`, by module name, one per layer; None when the fast path
    cannot apply it (DoRA, a LoRA bias, a module other than the seven linears, some layers only)."""
    found: dict[str, dict[int, LoraUpdate]] = {}
    for path, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter not in lora_a:
            continue
        parts = path.split(".")
        name = parts[-1]
        if name not in LINEARS or "layers" not in parts:
            return None
        if module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
            return None
        index = int(parts[parts.index("layers") + 1])
        a, b = lora_a[adapter].weight, module.lora_B[adapter].weight
        found.setdefault(name, {})[index] = (a.detach(), b.detach(), float(module.scaling[adapter]))
    updates = {
        name: [by_layer[i] for i in range(layers)]
        for name, by_layer in found.items()
        if len(by_layer) == layers
    }
    return updates if len(updates) == len(found) else None


def lora_rows(adapters: list[str | None], updates: dict[str, Any], device: torch.device) -> Any:
    """The `lora` argument of `FastDecoder.step` for a batch whose row i uses adapter `adapters[i]` (None: the
    base model); `updates` holds `fuse_lora`'s answer per loaded adapter. False when an adapter in the batch
    cannot take the fast path."""
    names = set(adapters)
    if names == {None}:
        return None
    batch = []
    for name in sorted(n for n in names if n is not None):
        if updates.get(name) is None:
            return False
        rows = (
            None
            if len(names) == 1
            else torch.tensor([i for i, a in enumerate(adapters) if a == name], device=device)
        )
        batch.append((rows, updates[name]))
    return batch
