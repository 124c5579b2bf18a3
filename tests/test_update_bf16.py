"""`train_dtype="bfloat16"`: LoRA in float32 on a bfloat16 copy of the base (MLPO, MAGRPO), against float32.

Measured on tiny-test (2 layers, hidden 64, V = 512, logits up to ~10), one `policy_update` on the synthetic
batch with the same LoRA weights on both bases (lora_B made non-zero so every LoRA weight has a gradient):

| quantity (bf16 base vs fp32 base)                     | grpo, token agg. | magrpo | pinned  |
|-------------------------------------------------------|------------------|--------|---------|
| per-row sequence logprob, max relative error          | 0.0046           | same   | < 0.02  |
|   (rows sharing a 20-token prompt: KV-cache path)     | 0.012            | same   | < 0.03  |
| LoRA gradient vector: cosine similarity               | 0.9916           | 0.9920 | > 0.95  |
| LoRA gradient vector: |g16 - g32| / |g32|             | 0.137            | 0.135  | < 0.35  |
| LoRA gradient norm: relative error                    | 0.055            | 0.057  | < 0.15  |

Other draws of the LoRA weights (generator seeds 2-4) gave cosines 0.965-0.995, vector errors 0.10-0.26, norm
errors 0.001-0.042 and row errors up to 0.011 (shared prompt), hence the headroom; a LoRA path that is off on
the bf16 base (its scaling 0.1 instead of 2) gives cosine 0.66, vector error 0.97 and row errors 0.046.

That error is bf16's own (8-bit mantissa: rounding the base weights alone gives cosine 0.998, bf16
activations and logits the rest), so the gradient pins catch a LoRA path that is broken, not a subtle cast.
The subtle bugs have their own tight checks: LoRA weights, gradients or AdamW moments in bf16 (dtypes, and
a lr = 1e-5 step, far below a bf16 LoRA weight's resolution of ~2e-4, must move every weight by lr: with
the LoRA in bf16, none moves by lr and 95% do not move at all), and
log-probs computed in bf16 instead of float32 (compared with float64 on the same bf16 logits, to 1e-5).
"""

import pytest
import torch

from mlpo_agents.trainers.lora import LoraSettings, attach_lora
from mlpo_agents.trainers.losses import token_logprobs
from mlpo_agents.trainers.update import policy_update, sequence_logprobs
from tests.ddp_update_script import synthetic_batch

CASES = {
    "grpo_token": {"loss": "grpo", "aggregation": "token", "old_logprobs": "current", "clip_eps": 0.2},
    "magrpo": {"loss": "magrpo"},
}


def lora_model(train_dtype, state=None):
    """tiny-test with LoRA (r=4) on a base in `train_dtype`; LoRA weights from `state`, else seeded with
    lora_B != 0. Returns (model, its LoRA state)."""
    torch.manual_seed(0)
    model = attach_lora("tiny-test", LoraSettings(r=4, alpha=8), dtype=train_dtype)
    if state is None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.05)
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    else:
        model.load_state_dict(state, strict=False)
    return model, state


@pytest.fixture(scope="module")
def models():
    fp32, state = lora_model("float32")
    bf16, _ = lora_model("bfloat16", state)
    return fp32, bf16


def batch(shared_prompt=False):
    if not shared_prompt:
        return synthetic_batch()
    b = synthetic_batch(prompt=20)
    # a shared prompt >= MIN_SHARED_PREFIX: it runs once and its KV cache is repeated for every row
    b.input_ids[:, :20] = b.input_ids[0, :20]
    return b


class GradCapture(torch.optim.SGD):
    """Records the flattened LoRA gradient `policy_update` steps on (float64 copy) and leaves the weights."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grad = None

    def step(self, closure=None):
        self.grad = torch.cat([p.grad.flatten().double() for g in self.param_groups for p in g["params"]])


def lora_gradient(model, b, case):
    optimizer = GradCapture([p for p in model.parameters() if p.requires_grad])
    policy_update(model, optimizer, b, micro_batch_size=2, max_grad_norm=None, **CASES[case])
    return optimizer.grad


def test_bf16_base_keeps_lora_weights_grads_and_adamw_state_in_float32(models):
    _, model = models
    params = dict(model.named_parameters())
    lora = {n: p for n, p in params.items() if "lora_" in n}
    base = {n: p for n, p in params.items() if "lora_" not in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base.values())

    fresh, _ = lora_model("bfloat16")  # its own copy: this test steps it
    before = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    lr = 1e-5  # below the bf16 spacing of these weights (~2e-4 at |w| ~ 0.05): a bf16 weight would not move
    trainable = [p for p in fresh.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    policy_update(fresh, optimizer, batch(), micro_batch_size=3, **CASES["grpo_token"])
    assert all(
        optimizer.state[p][k].dtype == torch.float32 for p in trainable for k in ("exp_avg", "exp_avg_sq")
    )
    # Adam's first step moves a weight by lr * |g| / (|g| + 1e-8): by lr, bar the few with a tiny gradient
    moved = torch.cat(
        [(p.detach() - before[n]).abs().flatten() for n, p in fresh.named_parameters() if p.requires_grad]
    )
    by_lr = ((moved - lr).abs() < 1e-3 * lr).float().mean().item()
    assert by_lr > 0.95, f"{by_lr:.3f} of the LoRA weights moved by lr"


@pytest.mark.parametrize("shared_prompt, pin", [(False, 0.02), (True, 0.03)])
def test_sequence_logprobs_on_bf16_base_match_float32(models, shared_prompt, pin):
    fp32, bf16 = models
    b = batch(shared_prompt)
    with torch.no_grad():
        ref, got = sequence_logprobs(fp32, b), sequence_logprobs(bf16, b)  # (B, L)
    assert got.dtype == torch.float32
    rows_ref, rows_got = (ref * b.completion_mask).sum(1), (got * b.completion_mask).sum(1)  # (B,)
    rel = ((rows_got - rows_ref).abs() / rows_ref.abs()).max().item()
    assert rel < pin, f"per-row logprob relative error {rel:.4f}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_gradient_on_bf16_base_matches_float32(models, case):
    fp32, bf16 = models
    b = batch()
    g32, g16 = lora_gradient(fp32, b, case), lora_gradient(bf16, b, case)
    assert g16.norm() > 0 and g32.norm() > 0
    cosine = torch.nn.functional.cosine_similarity(g16, g32, dim=0).item()
    vector_rel = ((g16 - g32).norm() / g32.norm()).item()
    norm_rel = ((g16.norm() - g32.norm()).abs() / g32.norm()).item()
    measured = f"cosine {cosine:.4f}, vector rel {vector_rel:.3f}, norm rel {norm_rel:.3f}"
    assert cosine > 0.95 and vector_rel < 0.35 and norm_rel < 0.15, measured


def test_bf16_logprobs_are_float32_math_on_the_bf16_logits(models):
    _, bf16 = models
    b = batch()
    with torch.no_grad():
        logits = bf16(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # (B, L, V) bf16
        got = sequence_logprobs(bf16, b)  # (B, L)
    assert logits.dtype == torch.bfloat16
    ref = (
        torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    )  # (B, L-1)
    mask = b.completion_mask[:, 1:].bool()
    # float32 log-softmax of the bf16 logits is within ~1e-6 of float64; a bf16 one is off by ~1e-2
    assert (got[:, 1:] - ref).abs()[mask].max().item() < 1e-5
    assert (token_logprobs(logits, b.input_ids)[:, 1:] - ref).abs()[mask].max().item() < 1e-5


@pytest.mark.parametrize("module, cls", [("mlpo", "MLPOConfig"), ("magrpo", "MAGRPOConfig")])
def test_train_dtype_is_a_validated_opt_in_field_and_flag(module, cls):
    import importlib

    from mlpo_agents.trainers.common import lora_copy
    from mlpo_agents.trainers.loop import COMMON_FLAGS, FLAG_ALGOS

    config_cls = getattr(importlib.import_module(f"mlpo_agents.trainers.{module}"), cls)
    assert config_cls().train_dtype == "float32"
    with pytest.raises(ValueError, match=r"train_dtype='float16': use one of float32, bfloat16"):
        config_cls(train_dtype="float16")
    assert COMMON_FLAGS["train_dtype"][0] is str and module in FLAG_ALGOS["train_dtype"]
    config = config_cls(train_dtype="bfloat16")
    model = lora_copy("tiny-test", config, seed=0)
    dtypes = {("lora_" in n, p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
