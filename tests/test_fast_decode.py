"""The engine's fast decode path (mlpo_agents/fast_decode.py) gives what transformers' modules give.

Each test runs the same requests through one engine twice, submitted together (one batch, rows joining and
leaving): once with the fast path, once with it turned off (`engine._lora.fast = None`, the module path every
other architecture takes). fp32: equal tokens, logprobs within 1e-4 as in test_engine.py (measured up to
1.2e-5: fused matmuls sum in another order). bf16: the first 10 greedy tokens equal and logprobs within 0.06 nats along the common prefix
(a logit of magnitude 4-8 has a bf16 spacing of 0.03-0.06; measured up to 0.024, one intra-op thread) with
the fast path's torch ops, 0.15 with its compiled kernels (`kernels.py`; measured up to 0.095): they keep
attention weights in fp32 where SDPA rounds them, and tiny-test's random weights amplify a rounding
difference. Both bf16 paths are as far from fp32 (`benchmarks/logprob_drift.py`, mean |bf16 - fp32| a token:
tiny-test 0.104 with kernels vs 0.101 without, SmolLM2 0.0231 vs 0.0222), and greedy flips at tiny-test's
near-ties come earlier or later (first token differing from fp32's greedy, six prompts of 30 tokens: modules
30/11/30/30/10/17, kernels 30/6/30/30/10/30), so with kernels the common prefix must be 5 tokens, not 10.
tests/test_kernels.py pins each kernel against torch.
"""

from __future__ import annotations

import pytest

from mlpo_agents.engine import LocalEngine
from mlpo_agents.fast_decode import lora_for
from mlpo_agents.testing import save_random_adapter, save_tiny_adapter
from tests.test_engine import PROMPTS as ENGINE_PROMPTS

PROMPTS = ENGINE_PROMPTS[:4]  # short, two-turn, one-word and long prompts


def _run(eng: LocalEngine, requests: list[tuple[list[dict], str | None]], fast: bool) -> tuple[list, int]:
    """(results, fast steps taken) of `requests` submitted together, greedy, with the fast path on or off."""
    saved, steps = eng._lora.fast, [0]
    if fast:
        step = saved.step

        def counted(*args, **kwargs):
            steps[0] += 1
            return step(*args, **kwargs)

        saved.step = counted
    else:
        eng._lora.fast = None
    try:
        futures = [eng.submit(m, max_tokens=20, temperature=0, adapter=a) for m, a in requests]
        return [f.result(timeout=120).samples[0] for f in futures], steps[0]
    finally:
        eng._lora.fast = saved
        if fast:
            del saved.step


def _assert_same(fast: list, slow: list, tol: float) -> None:
    for f, s in zip(fast, slow, strict=True):
        assert f.token_ids == s.token_ids
        assert f.logprobs == pytest.approx(s.logprobs, abs=tol)


@pytest.mark.parametrize("compiled", [True, False], ids=["kernels", "torch-ops"])
def test_fast_decode_equals_module_path_fp32(compiled):
    eng = LocalEngine("tiny-test", max_batch_size=8)
    try:
        assert eng._lora.fast is not None
        assert eng._lora.fast.kernels is not None  # CI has a compiler: the kernels must build
        if not compiled:  # the fallback where they cannot
            eng._lora.fast.kernels = None
        requests = [(m, None) for m in PROMPTS]
        fast, steps = _run(eng, requests, fast=True)
        slow, _ = _run(eng, requests, fast=False)
        assert steps > 0
        _assert_same(fast, slow, 1e-4)
        # A one-token prompt: its prefill is a one-token forward without a mask (the module path's).
        one = eng.generate(prompt_token_ids=[5], max_tokens=6, temperature=0).samples[0]
        saved, eng._lora.fast = eng._lora.fast, None
        try:
            assert (
                eng.generate(prompt_token_ids=[5], max_tokens=6, temperature=0).samples[0].token_ids
                == one.token_ids
            )
        finally:
            eng._lora.fast = saved
    finally:
        eng.close()


def test_fast_decode_equals_module_path_bf16_and_keeps_one_packed_copy():
    eng = LocalEngine("tiny-test", dtype="bfloat16", max_batch_size=8)
    try:
        assert eng._lora.fast is not None
        assert eng._lora.fast.prefills == bool(eng.packed_linears)  # packed: prefill takes the fast path
        if eng.packed_linears:  # the fused q/k/v and gate/up are packed by the fast path, not twice
            attn = eng._base_model.model.layers[0].self_attn
            assert not hasattr(attn.q_proj, "packed_weight") and hasattr(attn.o_proj, "packed_weight")
        requests = [(m, None) for m in PROMPTS]
        kernels = eng._lora.fast.kernels
        fast, steps = _run(eng, requests, fast=True)
        slow, _ = _run(eng, requests, fast=False)
        assert steps > 0
        for f, s in zip(fast, slow, strict=True):  # bf16: a near-tie may flip late; compare the common prefix
            same = next(
                (i for i, (a, b) in enumerate(zip(f.token_ids, s.token_ids, strict=False)) if a != b),
                len(f.token_ids),
            )
            assert same >= (10 if kernels is None else 5)
            assert f.logprobs[:same] == pytest.approx(s.logprobs[:same], abs=0.06 if kernels is None else 0.15)
    finally:
        eng.close()


def test_lora_rows_in_a_mixed_batch_equal_peft(tmp_path):
    """Base rows, an adapter on some of the fused modules (k and gate/up without LoRA), and one on all seven,
    in one batch: the fast path adds each adapter's update to its own rows exactly as peft does."""
    save_tiny_adapter(tmp_path / "some", 1, ["q_proj", "v_proj", "o_proj", "down_proj"])
    everything = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    save_tiny_adapter(tmp_path / "all", 2, everything)
    eng = LocalEngine("tiny-test", max_batch_size=8)
    try:
        eng.load_adapter("some", tmp_path / "some")
        eng.load_adapter("all", tmp_path / "all")
        assert eng._lora.fast_updates["some"] is not None and eng._lora.fast_updates["all"] is not None
        requests = [(PROMPTS[1], None), (PROMPTS[1], "some"), (PROMPTS[1], "all"), (PROMPTS[3], "some")]
        fast, steps = _run(eng, requests, fast=True)
        slow, _ = _run(eng, requests, fast=False)
        assert steps > 0
        assert len({tuple(s.token_ids) for s in fast[:3]}) == 3  # the adapters change the output
        _assert_same(fast, slow, 1e-4)
        # One adapter on every row (no row selection), then after one adapter is unloaded.
        alone, _ = _run(eng, [(m, "all") for m in PROMPTS[:2]], fast=True)
        _assert_same(alone, _run(eng, [(m, "all") for m in PROMPTS[:2]], fast=False)[0], 1e-4)
        eng.unload_adapter("all")
        assert "all" not in eng._lora.fast_updates
    finally:
        eng.close()


def test_adapter_with_a_rank_and_a_scale_per_module_equals_the_module_path(tmp_path):
    """q/k/v and gate/up are one matmul each on the fast path, their LoRA updates one A and one B: modules of one
    fused linear with different ranks and scales (peft's rank_pattern / alpha_pattern), and one left out."""
    from peft import LoraConfig

    from mlpo_agents import zoo

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"k_proj": 2, "up_proj": 6}, alpha_pattern={"k_proj": 12, "gate_proj": 2},
    )  # v_proj left out: its third of the fused q/k/v update is zero
    save_random_adapter(tmp_path / "mixed", zoo.build_tiny_test()[0], config, seed=5)
    eng = LocalEngine("tiny-test", max_batch_size=8)
    try:
        eng.load_adapter("mixed", tmp_path / "mixed")
        qkv, _, gate_up, _ = eng._lora.fast_updates["mixed"][0]
        assert qkv is not None and qkv[0].shape[0] == 4 + 2 and qkv[1].shape[1] == 4 + 2  # one A, one B
        assert gate_up is not None and gate_up[0].shape[0] == 4 + 6
        requests = [(PROMPTS[1], None), (PROMPTS[1], "mixed"), (PROMPTS[3], "mixed")]
        fast, steps = _run(eng, requests, fast=True)
        slow, _ = _run(eng, requests, fast=False)
        assert steps > 0 and fast[0].token_ids != fast[1].token_ids  # the adapter changes its rows
        _assert_same(fast, slow, 1e-4)
    finally:
        eng.close()


def test_an_adapter_the_fast_path_cannot_apply_takes_the_module_path(tmp_path):
    """An adapter on the first layer only (the fast path's updates cover every layer or none)."""
    save_tiny_adapter(tmp_path / "first", 3, ["q_proj", "v_proj"], layers=[0])
    eng = LocalEngine("tiny-test", max_batch_size=8)
    try:
        eng.load_adapter("first", tmp_path / "first")
        assert eng._lora.fast_updates["first"] is None
        assert lora_for(eng._lora.peft_model, "first", len(eng._lora.fast.layers)) is None
        requests = [(PROMPTS[0], None), (PROMPTS[1], "first")]
        fast, steps = _run(eng, requests, fast=True)
        slow, _ = _run(eng, requests, fast=False)
        _assert_same(fast, slow, 1e-4)
        # Steps with the adapter's row go through peft; only steps after it finished could take the fast path.
        assert steps < sum(len(s.token_ids) for s in fast)
    finally:
        eng.close()


def _prefill(eng: LocalEngine, prompts: list[list[int]], adapters: list[str | None], fast: bool):
    """One left-padded prefill forward of `prompts` as the engine's prefill runs it: (logits, cache, mask)."""
    import torch
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0) if padded else None
    saved = eng._lora.fast
    eng._lora.fast = saved if fast else None
    try:
        cache = DynamicCache(config=eng._base_model.config)
        with torch.inference_mode():
            logits = eng._forward(ids, mask if padded else None, positions, cache, adapters)
        return logits, cache, mask.bool()
    finally:
        eng._lora.fast = saved


def test_fast_prefill_equals_module_path_with_padding_and_adapters(tmp_path):
    """The prefill takes the fast path too (T tokens a row): left-padded rows of three lengths, base and
    adapter rows, and an unpadded one-row prefill give the module path's last-position logits and keys/values
    at the real columns (fp32, 1e-4), and finite keys/values at the padding."""
    save_tiny_adapter(
        tmp_path / "all", 2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    eng = LocalEngine("tiny-test", max_batch_size=8)
    eng.close()  # forwards (and the adapter load) run in this thread
    assert eng._lora.fast.prefills == bool(eng.packed_linears)  # packed weights (fp32 too): prefill is fast
    eng._lora.fast.prefills = True  # fp32 unpacked (MLPO_ENGINE_PACK=0) too: the strict comparison of the math
    eng._lora.load("all", str(tmp_path / "all"))
    prompts = [list(range(5, 30)), list(range(40, 49)), [7, 8, 9, 10, 11, 12, 13]]
    calls = [0]
    step = eng._lora.fast.step

    def counted(*args, **kwargs):
        calls[0] += 1
        return step(*args, **kwargs)

    eng._lora.fast.step = counted
    for batch, adapters in (
        (prompts, [None, "all", None]),
        (prompts, [None, None, None]),
        (prompts[:1], [None]),
        (prompts[1:2], ["all"]),
    ):
        fast_logits, fast_cache, mask = _prefill(eng, batch, adapters, fast=True)
        slow_logits, slow_cache, _ = _prefill(eng, batch, adapters, fast=False)
        assert fast_logits.shape == slow_logits.shape
        assert (fast_logits - slow_logits).abs().max() < 1e-4
        for fast_layer, slow_layer in zip(fast_cache.layers, slow_cache.layers, strict=True):
            for a, b in ((fast_layer.keys, slow_layer.keys), (fast_layer.values, slow_layer.values)):
                assert bool(a.isfinite().all())
                real = mask[:, None, :, None].expand_as(a)
                assert (a[real] - b[real]).abs().max() < 1e-4
    assert calls[0] == 4  # every prefill above took the fast path
    base, adapted, _ = _prefill(eng, prompts, [None, "all", None], fast=True)[0]
    assert (
        base - _prefill(eng, prompts[:1], [None], fast=True)[0][0]
    ).abs().max() < 1e-4  # padding changes nothing
    assert (
        adapted - _prefill(eng, prompts[1:2], [None], fast=True)[0][0]
    ).abs().max() > 1e-3  # the adapter does
