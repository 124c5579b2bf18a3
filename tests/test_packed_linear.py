"""Prepacked linears (`packed_linear.py`): decode steps through oneDNN's packed weights, everything else
as `nn.Linear`; the engine packs modules of its own and leaves the shared zoo model untouched. fp32 steps of
fewer than `FP32_PACKED_MIN_ROWS` rows keep the plain call (faster there).

Tolerance: oneDNN's packed kernel and the plain bf16 call round alike at the shapes measured here (equal
outputs), but nothing promises that on every CPU, so single-token outputs are compared within one bf16
rounding step of the output (rtol 2^-7); calls that must take the plain path are compared exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlpo_agents import zoo
from mlpo_agents.engine import LocalEngine
from mlpo_agents.packed_linear import FP32_PACKED_MIN_ROWS, PackedLinear, can_pack, pack_linears, private_copy
from mlpo_agents.testing import save_tiny_adapter
from tests.test_engine import PROMPTS

needs_bf16 = pytest.mark.skipif(
    not can_pack(torch.bfloat16, torch.device("cpu")), reason="this CPU's oneDNN has no bf16 kernels"
)
needs_fp32 = pytest.mark.skipif(not can_pack(torch.float32, torch.device("cpu")), reason="torch without oneDNN")
BF16_RTOL = 2**-7


def _layer(bias: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    plain = nn.Linear(64, 96, bias=bias).to(dtype)
    packed = private_copy(nn.Sequential(plain))[0]
    assert pack_linears(packed) == 1 and isinstance(packed, PackedLinear)
    return plain, packed


@needs_fp32
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_steps_of_enough_rows_use_the_packed_weight_and_fewer_the_plain_call(bias):
    plain, packed = _layer(bias, torch.float32)
    many = torch.randn(FP32_PACKED_MIN_ROWS, 1, 64)
    few = many[: FP32_PACKED_MIN_ROWS - 1]
    with torch.inference_mode():
        torch.testing.assert_close(packed(many), plain(many), rtol=1e-5, atol=1e-5)  # summation order only
        assert torch.equal(packed(few), plain(few))
        packed.packed_weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(packed.weight), 16)
        assert not torch.equal(packed(many), plain(many))  # the packed weight is really read
        assert torch.equal(packed(few), plain(few))  # and never for fewer rows


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_single_token_uses_packed_weight_and_matches(bias):
    plain, packed = _layer(bias)
    x = torch.randn(5, 1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        want, got = plain(x), packed(x)
    assert got.shape == want.shape == (5, 1, 96)
    torch.testing.assert_close(got.float(), want.float(), rtol=BF16_RTOL, atol=1e-3)
    packed.packed_weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(packed.weight), 16)
    with torch.inference_mode():
        assert not torch.equal(packed(x), want)  # the single-token call really reads the packed weight


@needs_bf16
def test_prefill_and_gradients_take_the_plain_path():
    plain, packed = _layer(True)
    packed.packed_weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(packed.weight), 16)
    prompt = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed(prompt), plain(prompt))
    token = torch.randn(3, 1, 64, dtype=torch.bfloat16, requires_grad=True)
    assert torch.equal(packed(token), plain(token))  # grad enabled: plain


@needs_bf16
def test_engine_packs_its_own_modules_and_adapters_still_load(tmp_path):
    eng = LocalEngine("tiny-test", dtype="bfloat16", max_batch_size=8)
    try:
        assert eng.packed_linears > 0
        shared, _ = zoo.resolve("tiny-test", dtype="bfloat16")
        assert not any(isinstance(m, PackedLinear) for m in shared.modules())  # trainers see plain layers
        engine_weight = eng._base_model.model.layers[0].self_attn.q_proj.weight
        assert engine_weight is shared.model.layers[0].self_attn.q_proj.weight  # weights shared, not copied
        base = eng.generate(PROMPTS[1], max_tokens=12, temperature=0).samples[0].token_ids
        save_tiny_adapter(tmp_path / "a1", seed=1)
        eng.load_adapter("a1", tmp_path / "a1")
        tuned = eng.generate(PROMPTS[1], max_tokens=12, temperature=0, adapter="a1").samples[0].token_ids
        assert tuned != base
        assert eng.generate(PROMPTS[1], max_tokens=12, temperature=0).samples[0].token_ids == base
    finally:
        eng.close()
