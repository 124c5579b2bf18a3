"""Decode steps through oneDNN-prepacked weights: LocalEngine's linear layers on a CPU.

An `nn.Linear` on a CPU hands its (N, K) weight to oneDNN (bf16) or MKL (fp32) on every call, which reorders it
into the blocked layout its kernels read, or takes a path built for large batches; for the few rows of a decode
step that is work worth skipping. `pack_linears` reorders each weight once (`torch.ops.mkldnn._reorder_linear_weight`)
and turns the layer into a `PackedLinear`, which runs single-token inputs (decode steps) on the packed weight and
everything else (prefill, training, gradients) exactly as `nn.Linear` does.

bf16, measured on 2 cores with AMX: a whole decode step 1.18x faster (SmolLM2-135M, 2 rows: 35.6 -> 30.1 ms) to
1.27x (Qwen2.5-Coder-0.5B, 16 rows: 85.3 -> 67.2 ms), equal outputs at the shapes measured. Prefill shapes are
left alone: there the plain call was as fast or faster (0.65x-1.45x).

fp32 (`FP32_PACKED_MIN_ROWS`): from 4 rows on, MKL's plain fp32 call takes twice the time of 3 rows while the packed
one barely moves: at Qwen2.5-0.5B's shapes the packed call is 1.3-2.6x faster for 4-32 rows (its 151936-wide
lm_head at 4 rows: 59.1 -> 22.7 ms) and 1.01-1.14x at prefill shapes (128-512 rows); for 1-3 rows MKL's
matrix-vector path takes 6-45% less time, so those keep the plain call. Outputs differ from the plain call by
summation order only (largest error against a float64 product, unit-variance inputs, K = 896-4864:
3e-4 packed, 1.5e-4 plain).

The packed weight is a copy (one more copy of the linear weights in memory: 2 GB for Qwen2.5-0.5B in fp32,
0.5 GB for SmolLM2-135M), taken from weights that must not change afterwards: the engine packs its own model,
whose base weights are frozen (adapters are LoRA). `MLPO_ENGINE_PACK=0` turns packing off.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

FP32_PACKED_MIN_ROWS = 4
"""fp32 calls of fewer rows keep the plain (MKL matrix-vector) call, faster there (module docstring)."""


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `pack_linears` applies: fp32 on a CPU with oneDNN, bf16 on one whose oneDNN has bf16 kernels."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_packed(x: torch.Tensor) -> bool:
    """Whether a call on `x` (its last dimension the input features) is faster on the packed weight."""
    return x.dtype == torch.bfloat16 or x.numel() >= FP32_PACKED_MIN_ROWS * x.shape[-1]


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose single-token, no-grad calls use `packed_weight` (see module docstring)."""

    packed_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() >= 2
            and x.shape[-2] == 1
            and x.dtype == self.weight.dtype
            and not torch.is_grad_enabled()
            and use_packed(x)
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [None], "")
        return super().forward(x)


def pack_linears(model: nn.Module) -> int:
    """Turn every bf16 or fp32 `nn.Linear` of `model` into a `PackedLinear`, in place; returns how many."""
    packed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype in (torch.bfloat16, torch.float32):
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 16)
            module.__class__ = PackedLinear
            packed += 1
    return packed


def packed_tensors(model: nn.Module) -> dict[int, Any]:
    """A `copy.deepcopy` memo sharing `model`'s packed weights (oneDNN's opaque tensors cannot be copied)."""
    return {id(m.packed_weight): m.packed_weight for m in model.modules() if isinstance(m, PackedLinear)}


def private_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that shares its parameters, buffers and packed weights (no weight memory)."""
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    memo.update(packed_tensors(model))
    return copy.deepcopy(model, memo)


def engine_model(model: Any, device: torch.device, share_weights: bool) -> tuple[Any, int]:
    """LocalEngine's model on `device` and how many of its linears are packed.

    On a CPU the weights are shared with the zoo's model unless `share_weights` is False; bf16 and fp32
    linears are packed where `can_pack` (`MLPO_ENGINE_PACK=0` turns packing off), in modules of the engine's own.
    """
    pack = can_pack(next(model.parameters()).dtype, device) and os.environ.get("MLPO_ENGINE_PACK", "1") != "0"
    if not share_weights or device.type != "cpu":
        model = copy.deepcopy(model)
    elif pack:
        model = private_copy(model)
    model = model.to(device).eval()
    return model, pack_linears(model) if pack else 0
