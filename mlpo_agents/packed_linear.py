"""Decode steps through oneDNN-prepacked bf16 weights: LocalEngine's linear layers on a CPU.

A bf16 `nn.Linear` on a CPU hands its (N, K) weight to oneDNN on every call, which reorders it into the
blocked layout its AMX/AVX-512 kernels read; for the few rows of a decode step that is work worth skipping.
`pack_linears` reorders each weight once (`torch.ops.mkldnn._reorder_linear_weight`) and turns the layer into a `PackedLinear`, which runs single-token inputs (decode steps) on the packed weight and
everything else (prefill, training, gradients) exactly as `nn.Linear` does. Measured on 2 cores with AMX:
a whole decode step 1.18x faster (SmolLM2-135M, 2 rows: 35.6 -> 30.1 ms) to 1.27x (Qwen2.5-Coder-0.5B,
16 rows: 85.3 -> 67.2 ms), equal outputs at the shapes measured; the team workload, where prefill and
cache work share the time, about 4% less wall time. Prefill shapes are left alone: there the plain call was
as fast or faster (0.65x-1.45x).

The packed weight is a copy (one more copy of the linear weights in memory), taken from weights that must
not change afterwards: the engine packs its own model, whose base weights are frozen (adapters are LoRA).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `pack_linears` applies: bf16 on a CPU whose oneDNN build has bf16 kernels."""
    return (
        dtype == torch.bfloat16
        and device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose single-token, no-grad calls use `packed_weight` (see module docstring)."""

    packed_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and x.shape[-2] == 1 and x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [None], "")
        return super().forward(x)


def pack_linears(model: nn.Module) -> int:
    """Turn every bf16 `nn.Linear` of `model` into a `PackedLinear`, in place; returns how many."""
    packed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16:
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

    On a CPU the weights are shared with the zoo's model unless `share_weights` is False; bf16 linears are
    packed where `can_pack` (`MLPO_ENGINE_PACK=0` turns packing off), in modules of the engine's own.
    """
    pack = can_pack(next(model.parameters()).dtype, device) and os.environ.get("MLPO_ENGINE_PACK", "1") != "0"
    if not share_weights or device.type != "cpu":
        model = copy.deepcopy(model)
    elif pack:
        model = private_copy(model)
    model = model.to(device).eval()
    return model, pack_linears(model) if pack else 0
