"""Our GRPO-family loss and gradient vs TRL's on identical inputs (reference: trl 1.16.0, the installed package).

Pins `trainers.losses.grpo_loss` + `trainers.update.policy_update` (tempered policy, old logprobs, micro-
batches) to `trl/trainer/grpo_trainer.py::GRPOTrainer._compute_loss` at trl 1.16.0, called on a bare
trainer object with the attributes it reads and the tiny model patched by TRL's own
`add_fused_lm_head(model, temperature=T)`, as `GRPOTrainer.__init__` does. Covered: temperature 1 and
0.7, every aggregation (sequence = TRL "grpo", token = "bnpo" and "dapo", dr_grpo = "dr_grpo"), without
KL and with it (k3 = `use_bias_correction_kl=False`, k3_ratio = TRL's default True), ratio 1 (TRL's
num_iterations == 1 path) and ratio != 1 with clipping. Also the std-scaled advantage epsilon
(`advantages / (std_rewards + 1e-4)` in `_generate_and_score_completions`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head, nanstd  # noqa: E402

from mlpo_agents.trainers.batch import BatchStats, TrajectoryBatch  # noqa: E402
from mlpo_agents.trainers.losses import STD_EPS, group_advantages  # noqa: E402
from mlpo_agents.trainers.update import policy_update, sequence_logprobs, with_current_logprobs  # noqa: E402

ROWS, PROMPT, COMPLETION, MAX_TOKENS, PAD = 6, 5, 7, 12, 0
LOSS_TYPES = {"sequence": ["grpo"], "token": ["bnpo", "dapo"], "dr_grpo": ["dr_grpo"]}


def test_trl_version_is_the_pinned_reference():
    assert trl.__version__ == "1.16.0", "re-check GRPOTrainer._compute_loss and update the reference tests"


class _Accelerator:
    """What `_compute_loss` asks of the accelerator on one CPU process."""

    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def autocast(self):
        return nullcontext()

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_trainer(model, *, loss_type: str, beta: float, bias_correction: bool, eps_high: float):
    trainer = object.__new__(GRPOTrainer)
    trainer.model = model
    trainer.accelerator = _Accelerator()
    trainer.args = SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=1)
    trainer.aux_loss_enabled = False
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.importance_sampling_level = "token"
    trainer.beta = beta
    trainer.loss_type = loss_type
    trainer.epsilon_low, trainer.epsilon_high = 0.2, eps_high
    trainer.use_vllm = False
    trainer.vllm_importance_sampling_correction = False
    trainer.max_completion_length = MAX_TOKENS
    trainer.current_gradient_accumulation_steps = 1
    trainer._entropy_bonus_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return trainer


@pytest.fixture(scope="module")
def tiny():
    from mlpo_agents import zoo

    model, _ = zoo.build_tiny_test()
    ref = copy.deepcopy(model)
    with torch.no_grad():  # a reference a little away from the policy, so the KL term is not 0
        gen = torch.Generator().manual_seed(3)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.float(), ref.float()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 200, (ROWS, PROMPT), generator=g)
    completion_ids = torch.randint(3, 200, (ROWS, COMPLETION), generator=g)
    lengths = torch.tensor([7, 3, 5, 7, 1, 6])
    completion_mask = (torch.arange(COMPLETION)[None, :] < lengths[:, None]).long()  # (B, C) right padded
    completion_ids = torch.where(completion_mask.bool(), completion_ids, PAD)
    advantages = torch.tensor([0.5, -0.5, 1.0, -1.0, 0.25, -0.75])
    return prompt_ids, completion_ids, completion_mask, advantages


def _our_batch(
    prompt_ids, completion_ids, completion_mask, advantages, temperature, old=None
) -> TrajectoryBatch:
    width = PROMPT + COMPLETION
    mask = torch.zeros(ROWS, width)
    mask[:, PROMPT:] = completion_mask.float()
    old_full = torch.zeros(ROWS, width)
    if old is not None:
        old_full[:, PROMPT:] = old * completion_mask
    return TrajectoryBatch(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1),
        completion_mask=mask,
        old_logprobs=old_full,
        rewards=advantages.clone(),
        advantages=advantages,
        group_index=torch.zeros(ROWS, dtype=torch.long),
        prompt_lengths=torch.full((ROWS,), PROMPT),
        completion_lengths=completion_mask.sum(dim=1),
        call_ids=[str(i) for i in range(ROWS)],
        group_ids=["g"],
        stats=BatchStats(),
        temperatures=torch.full((ROWS,), temperature),
        old_logprobs_tempered=old is not None,
    )


def _trl_loss_and_grads(model, ref, inputs, *, temperature, loss_type, beta, bias_correction, eps_high, old):
    prompt_ids, completion_ids, completion_mask, advantages = inputs
    policy = copy.deepcopy(model)
    add_fused_lm_head(policy, temperature=temperature, outputs=("log_probs", "entropy"))
    policy.train()
    trainer = _trl_trainer(
        policy, loss_type=loss_type, beta=beta, bias_correction=bias_correction, eps_high=eps_high
    )
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum().float(),
    }
    if old is not None:
        batch["old_per_token_logps"] = old
    if beta:
        ref_patched = copy.deepcopy(ref)
        add_fused_lm_head(ref_patched, temperature=temperature)
        with torch.no_grad():
            batch["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                ref_patched,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1),
                COMPLETION,
            )[0]
    loss = trainer._compute_loss(policy, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in policy.named_parameters()}


def _our_loss_and_grads(model, ref, batch, *, tempered, aggregation, beta, estimator, eps_high, old_mode):
    policy = copy.deepcopy(model)
    params = list(policy.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)  # one step: delta = -grad
    metrics = policy_update(
        policy,
        optimizer,
        batch,
        loss="grpo",
        micro_batch_size=4,  # 2 micro-batches: accumulation must reproduce the full-batch gradient
        max_grad_norm=None,
        ref_model=ref if beta else None,
        tempered_policy=tempered,
        old_logprobs=old_mode,
        clip_eps=0.2,
        clip_eps_high=eps_high,
        kl_coef=beta,
        kl_estimator=estimator,
        aggregation=aggregation,
        max_tokens=MAX_TOKENS,
    )
    grads = {n: b - p.detach() for (n, p), b in zip(policy.named_parameters(), before, strict=True)}
    return metrics["loss"], grads


def _max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _scale(grads: dict[str, torch.Tensor]) -> float:
    return max(g.abs().max().item() for g in grads.values())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
@pytest.mark.parametrize(
    "beta,estimator", [(0.0, "k3"), (0.04, "k3"), (0.04, "k3_ratio")], ids=["no_kl", "k3", "k3_ratio"]
)
def test_grpo_loss_and_gradient_equal_trl_at_ratio_one(tiny, temperature, aggregation, beta, estimator):
    """TRL with num_iterations=1 (old = detached current) vs ours with old_logprobs='current'."""
    model, ref = tiny
    inputs = _inputs()
    batch = _our_batch(*inputs, temperature)
    ours_loss, ours = _our_loss_and_grads(
        model,
        ref,
        batch,
        tempered=True,
        aggregation=aggregation,
        beta=beta,
        estimator=estimator,
        eps_high=0.2,
        old_mode="current",
    )
    for loss_type in LOSS_TYPES[aggregation]:
        trl_loss, theirs = _trl_loss_and_grads(
            model,
            ref,
            inputs,
            temperature=temperature,
            loss_type=loss_type,
            beta=beta,
            bias_correction=estimator == "k3_ratio",
            eps_high=0.2,
            old=None,
        )
        assert ours_loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
        assert _max_abs(ours, theirs) <= 1e-5 * _scale(theirs), loss_type


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
def test_grpo_with_clipping_equals_trl_when_the_ratio_is_not_one(tiny, temperature, aggregation):
    """Old logprobs a little off the current tempered ones (a later epoch): ratios, clip-higher and k3_ratio."""
    model, ref = tiny
    inputs = _inputs(seed=1)
    with torch.no_grad():
        tempered = sequence_logprobs(model, _our_batch(*inputs, temperature), tempered_policy=True)
    g = torch.Generator().manual_seed(5)
    old = tempered[:, PROMPT:] + 0.3 * torch.randn(ROWS, COMPLETION, generator=g)  # ratios in ~[0.5, 2]
    batch = _our_batch(*inputs, temperature, old=old)
    ours_loss, ours = _our_loss_and_grads(
        model,
        ref,
        batch,
        tempered=True,
        aggregation=aggregation,
        beta=0.04,
        estimator="k3_ratio",
        eps_high=0.28,
        old_mode="batch",
    )
    trl_loss, theirs = _trl_loss_and_grads(
        model,
        ref,
        inputs,
        temperature=temperature,
        loss_type=LOSS_TYPES[aggregation][0],
        beta=0.04,
        bias_correction=True,
        eps_high=0.28,
        old=old * inputs[2],
    )
    assert ours_loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert _max_abs(ours, theirs) <= 1e-5 * _scale(theirs)


def test_with_current_logprobs_gives_the_ratio_one_gradient(tiny):
    """Tempered old logprobs stored before the first step give the gradient of the ratio-one path."""
    model, ref = tiny
    batch = _our_batch(*_inputs(), 0.7)
    stored = with_current_logprobs(model, batch, tempered_policy=True, micro_batch_size=4)
    assert stored.old_logprobs_tempered
    common = dict(tempered=True, aggregation="token", beta=0.0, estimator="k3", eps_high=0.2)
    _, from_stored = _our_loss_and_grads(model, ref, stored, old_mode="batch", **common)
    _, from_current = _our_loss_and_grads(model, ref, batch, old_mode="current", **common)
    assert _max_abs(from_stored, from_current) <= 1e-5 * _scale(from_current)


def test_raw_policy_gradient_differs_from_trl_at_temperature_0_7(tiny):
    """tempered_policy=False differentiates log pi at T = 1: not the sampled policy (the issue's finding)."""
    model, ref = tiny
    inputs = _inputs()
    batch = _our_batch(*inputs, 0.7)
    _, raw = _our_loss_and_grads(
        model,
        ref,
        batch,
        tempered=False,
        aggregation="token",
        beta=0.0,
        estimator="k3",
        eps_high=0.2,
        old_mode="current",
    )
    _, theirs = _trl_loss_and_grads(
        model,
        ref,
        inputs,
        temperature=0.7,
        loss_type="bnpo",
        beta=0.0,
        bias_correction=False,
        eps_high=0.2,
        old=None,
    )
    assert _max_abs(raw, theirs) > 1e-2 * _scale(theirs)


def test_tempered_ratio_against_raw_recorded_logprobs_is_refused(tiny):
    model, _ = tiny
    batch = _our_batch(*_inputs(), 0.7)  # old_logprobs as the engine records them: raw
    optimizer = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.0)
    with pytest.raises(ValueError, match="old_logprobs='current'"):
        policy_update(model, optimizer, batch, loss="grpo", tempered_policy=True, old_logprobs="batch")


def test_std_scaled_advantage_epsilon_is_trls():
    """trl 1.16 `_generate_and_score_completions`: (r - group mean) / (nanstd(group) + 1e-4)."""
    assert STD_EPS == 1e-4
    rewards = torch.tensor([0.0, 0.001, 0.002, 0.001, 1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    groups = torch.arange(3).repeat_interleave(4)
    grouped = rewards.view(3, 4)
    mean = grouped.mean(dim=1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    expected = (rewards - mean) / (std + 1e-4)
    torch.testing.assert_close(
        group_advantages(rewards, groups, std_scale=True), expected, rtol=1e-5, atol=1e-6
    )
