"""The fast decode path's compiled kernels (mlpo_agents/kernels.cpp) compute what the torch ops they replace do.

Each kernel against the torch formula transformers uses: fp32 within float summation order; bf16 rounded
where torch rounds (equal, or one bf16 step apart where 1/sqrt and rsqrt round differently). Decode
attention against SDPA over the same left-padded batch, with NaN in the padding it must never read. The
engine-level equality (tokens and logprobs against transformers' modules) is in tests/test_fast_decode.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mlpo_agents import kernels
from mlpo_agents.fast_decode import _first_real_columns

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    module = kernels.load()
    assert module is not None, "the kernels must build on a machine with a C++ compiler (CI has gcc)"
    return module


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # one bf16 step (2^-8 relative) at most, and rarely
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-3)
        assert (out != ref).float().mean() < 0.01


def _rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_and_gated_activation_equal_torch(ops, dtype):
    torch.manual_seed(0)
    h, delta = (torch.randn(5, 3, 96) * 4).to(dtype), torch.randn(5, 3, 96).to(dtype)
    weight, eps = (torch.rand(96) + 0.5).to(dtype), 1e-5
    _close(ops.rms_norm(h, weight, eps), _rms(h, weight, eps))
    updated = h.clone()
    normed = ops.add_rms_norm_(updated, delta, weight, eps)
    assert torch.equal(updated, h + delta)  # the residual add in place, rounded as torch rounds it
    _close(normed, _rms(h + delta, weight, eps))
    gate_up = (torch.randn(7, 2, 64) * 3).to(dtype)
    _close(ops.silu_mul(gate_up), F.silu(gate_up[..., :32]) * gate_up[..., 32:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_split_writes_q_and_the_cache_columns_as_torch_rotates(ops, dtype):
    torch.manual_seed(1)
    rows, tokens, heads, kv, dim = 3, 2, 6, 2, 16
    qkv = torch.randn(rows, tokens, (heads + 2 * kv) * dim).to(dtype)
    angles = torch.rand(rows, tokens, dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    t = qkv.view(rows, tokens, heads + 2 * kv, dim).transpose(1, 2)
    qk = t[:, : heads + kv]
    half = dim // 2
    rotated = qk * cos[:, None] + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin[:, None]
    # k and v land in columns 4-5 of a cache buffer with more rows and columns than the batch
    key_buffer, value_buffer = torch.zeros(5, kv, 9, dim, dtype=dtype), torch.zeros(5, kv, 9, dim, dtype=dtype)
    q = torch.empty(rows, heads, tokens, dim, dtype=dtype)
    ops.rotary_split(qkv, cos, sin, heads, kv, q, key_buffer[:rows, :, 4:6], value_buffer[:rows, :, 4:6])
    _close(q, rotated[:, :heads])
    _close(key_buffer[:rows, :, 4:6], rotated[:, heads:])
    assert torch.equal(value_buffer[:rows, :, 4:6], t[:, heads + kv :])
    with pytest.raises(RuntimeError, match="cos and sin"):  # one angle per row and token, never broadcast
        ops.rotary_split(qkv, cos[:1], sin[:1], heads, kv, q, key_buffer[:rows, :, 4:6], value_buffer[:rows, :, 4:6])
    for buffer in (key_buffer, value_buffer):  # nothing outside the given columns and rows is written
        assert not buffer[:, :, :4].any() and not buffer[:, :, 6:].any() and not buffer[rows:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv,dim", [(9, 3, 64), (14, 2, 64), (4, 4, 32)])
def test_decode_attention_equals_sdpa_and_never_reads_padding(ops, dtype, heads, kv, dim):
    """SmolLM2's and Qwen2.5's shapes (the vectorised path) and one it has no instance for (plain loops)."""
    torch.manual_seed(2)
    rows, width = 6, 40
    first = torch.tensor([0, 5, 39, 17, 30, 1])  # each row's first real column of the left-padded batch
    key_buffer = torch.randn(8, kv, 50, dim).to(dtype)
    value_buffer = torch.randn(8, kv, 50, dim).to(dtype)
    keys, values = key_buffer[:rows, :, 7 : 7 + width], value_buffer[:rows, :, 7 : 7 + width]  # strided views
    q = torch.randn(rows, heads, 1, dim).to(dtype)
    mask = (torch.arange(width)[None, :] >= first[:, None])[:, None, None, :]
    scale = dim**-0.5
    ref = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=heads != kv)
    ref = ref.transpose(1, 2).reshape(rows, 1, heads * dim)
    for row, start in enumerate(first.tolist()):  # padding the kernel must skip: NaN would poison any sum
        keys[row, :, :start] = float("nan")
        values[row, :, :start] = float("nan")
    out = ops.decode_attention(q, keys, values, first, scale)
    assert out.shape == (rows, 1, heads * dim) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    with pytest.raises(RuntimeError, match="start out of range"):
        ops.decode_attention(q, keys, values, torch.full((rows,), width), scale)


def test_copy_rows_moves_rows_of_every_buffer_within_the_columns(ops):
    buffers = [torch.randn(6, 2, 10, 4).to(torch.bfloat16) for _ in range(3)]
    before = [b.clone() for b in buffers]
    ops.copy_rows(buffers, [1, 2], [5, 4], 3, 8)
    for b, old in zip(buffers, before, strict=True):
        expected = old.clone()
        expected[[1, 2], :, 3:8] = old[[5, 4], :, 3:8]
        assert torch.equal(b, expected)


def test_first_real_columns_of_a_left_padded_mask_and_none_otherwise():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)[:, None, None, :]
    assert _first_real_columns(mask).tolist() == [2, 0, 3]
    holed = mask.clone()
    holed[1, 0, 0, 2] = False  # a row whose real columns do not run to the end: attention takes the mask
    assert _first_real_columns(holed) is None


def test_load_falls_back_to_none_with_a_warning_when_the_build_fails(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(kernels, "_state", {})
    with caplog.at_level(logging.WARNING, logger="mlpo_agents.kernels"):
        assert kernels.load() is None
    assert "decoding with torch ops instead" in caplog.text and "MLPO_ENGINE_KERNELS=0" in caplog.text
    monkeypatch.setenv("MLPO_ENGINE_KERNELS", "0")
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.load() is None and kernels._state == {}
