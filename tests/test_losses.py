"""Losses and advantages against numbers worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from mlpo_agents.trainers.losses import (
    discounted_returns,
    group_advantages,
    grpo_loss,
    magrpo_loss,
    token_logprobs,
)


def close(actual, expected, tol=1e-5):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected), atol=tol)


# ---- group_advantages ---------------------------------------------------------------------------
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 2.0, 0.0, 1.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])


def test_group_advantages_dr_grpo_is_reward_minus_group_mean():
    # group 0: mean 0.5 -> +-0.5; group 1: mean 0.5, all equal -> 0; group 2: mean 1 -> 1, -1, 0
    adv = group_advantages(REWARDS, GROUPS)
    assert close(adv, [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 1.0, -1.0, 0.0])


def test_group_advantages_std_scale_uses_unbiased_group_std():
    # group 0: sum of squares 4 * 0.25 = 1, /(4-1) = 1/3, std = 0.5773503, 0.5 / 0.5773503 = 0.8660254
    # group 1: std 0 -> 0 / eps = 0;  group 2: squares 1 + 1 + 0 = 2, /(3-1) = 1, std = 1 -> 1, -1, 0
    # (each divided by std + STD_EPS = 1e-4, TRL's epsilon)
    adv = group_advantages(REWARDS, GROUPS, std_scale=True)
    a = 0.5 / (0.5773503 + 1e-4)
    b = 1.0 / (1.0 + 1e-4)
    assert close(adv, [a, -a, -a, a, 0.0, 0.0, b, -b, 0.0])


def test_group_advantages_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))


# ---- token_logprobs -----------------------------------------------------------------------------
def test_token_logprobs_alignment_position_t_holds_token_t():
    # logits after token 0 are [0, 0] -> p = 1/2 each; token 1 is id 1 -> log 0.5 = -0.6931472
    # logits after token 1 are [ln 3, 0] -> p = [3/4, 1/4]; token 2 is id 0 -> log 0.75 = -0.2876821
    # the logits at the last position predict nothing in the sequence; position 0 has no prefix -> 0
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [7.0, -7.0]]])
    ids = torch.tensor([[1, 1, 0]])
    assert close(token_logprobs(logits, ids), [[0.0, -0.6931472, -0.2876821]])


def test_token_logprobs_matches_log_softmax_on_random_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    ids = torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    out = token_logprobs(logits, ids)
    assert torch.allclose(out[:, 1:], ref, atol=1e-6) and torch.all(out[:, 0] == 0)


# ---- grpo_loss ----------------------------------------------------------------------------------
# Two sequences, three positions; the loss trains row 0 positions 1-2 and row 1 position 1.
MASK = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -1.0])
OLD = torch.full((2, 3), -1.0)
# ratios on the mask: row 0 -> 1.5, 0.9; row 1 -> 0.5. Off-mask values are junk the loss must ignore.
LOGP = OLD + torch.log(torch.tensor([[9.0, 1.5, 0.9], [9.0, 0.5, 9.0]]))


def test_grpo_loss_token_aggregation_and_metrics():
    # row 0 (A=+1): r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped); r=0.9 -> max(-0.9, -0.9) = -0.9
    # row 1 (A=-1): r=0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    # token: (-1.2 - 0.9 + 0.8) / 3 = -0.4333333
    loss, m = grpo_loss(LOGP, OLD, ADV, MASK, clip_eps=0.2, aggregation="token")
    assert close(loss, -0.4333333)
    assert m["clip_fraction"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["mean_ratio"] == pytest.approx(2.9 / 3, abs=1e-6)  # (1.5 + 0.9 + 0.5) / 3
    # approx_kl = mean((r - 1) - ln r): 0.0945349 + 0.0053605 + 0.1931472 = 0.2930426, / 3 = 0.0976809
    assert m["approx_kl"] == pytest.approx(0.0976809, abs=1e-6)


def test_grpo_loss_sequence_and_dr_grpo_aggregation():
    # sequence: row 0 mean (-1.2 - 0.9) / 2 = -1.05, row 1 = 0.8 -> (-1.05 + 0.8) / 2 = -0.125
    loss, _ = grpo_loss(LOGP, OLD, ADV, MASK, aggregation="sequence")
    assert close(loss, -0.125)
    # dr_grpo with a budget of 4 tokens: -1.3 / (B=2 * 4) = -0.1625
    loss, _ = grpo_loss(LOGP, OLD, ADV, MASK, aggregation="dr_grpo", max_tokens=4)
    assert close(loss, -0.1625)


def test_grpo_loss_clip_higher():
    # clip_eps_high = 0.6: r = 1.5 < 1.6 is no longer clipped -> -1.5; (-1.5 - 0.9 + 0.8) / 3 = -0.5333333
    loss, m = grpo_loss(LOGP, OLD, ADV, MASK, clip_eps=0.2, clip_eps_high=0.6)
    assert close(loss, -0.5333333)
    assert m["clip_fraction"] == pytest.approx(1 / 3, abs=1e-6)


def test_grpo_loss_k3_kl_to_reference():
    # ref - logp = ln 2 on row 0 position 1, 0 elsewhere: k3 = 2 - ln 2 - 1 = 0.3068528 there, 0 elsewhere
    # token: (-1.3 + 0.1 * 0.3068528) / 3 = -1.2693147 / 3 = -0.4231049; ref_kl = 0.3068528 / 3 = 0.1022843
    ref = LOGP.clone()
    ref[0, 1] += math.log(2.0)
    loss, m = grpo_loss(LOGP, OLD, ADV, MASK, ref_logp=ref, kl_coef=0.1)
    assert close(loss, -0.4231049)
    assert m["ref_kl"] == pytest.approx(0.1022843, abs=1e-6)


@pytest.mark.parametrize(
    ("aggregation", "expected_grad"),
    [
        # token: -A * mask / 3 tokens
        ("token", [[0.0, -1 / 3, -1 / 3], [0.0, 1 / 3, 0.0]]),
        # sequence: -A * mask / (B=2 * |o_b|): row 0 -> -1/4, row 1 -> +1/2
        ("sequence", [[0.0, -0.25, -0.25], [0.0, 0.5, 0.0]]),
        # dr_grpo, max_tokens 4: -A * mask / (2 * 4) = -+1/8
        ("dr_grpo", [[0.0, -0.125, -0.125], [0.0, 0.125, 0.0]]),
    ],
)
def test_grpo_loss_gradient_at_ratio_one_is_minus_advantage_over_normaliser(aggregation, expected_grad):
    logp = OLD.clone().requires_grad_(True)
    loss, m = grpo_loss(logp, OLD, ADV, MASK, aggregation=aggregation, max_tokens=4)
    loss.backward()
    assert close(logp.grad, expected_grad)
    assert m["clip_fraction"] == 0.0 and m["mean_ratio"] == pytest.approx(1.0)


def test_grpo_loss_gradient_flows_through_parameters():
    # logp = theta * x, so d loss / d theta = sum -A * mask * x / N (N = 3 tokens, ratio 1 at theta = 1)
    x = torch.tensor([[0.0, -2.0, -3.0], [0.0, -4.0, -5.0]])
    theta = torch.tensor(1.0, requires_grad=True)
    loss, _ = grpo_loss(theta * x, x, ADV, MASK)
    loss.backward()
    # (-1 * (-2 - 3) + 1 * (-4)) / 3 = (5 - 4) / 3 = 0.3333333
    assert close(theta.grad, 1 / 3)


def test_grpo_loss_ignores_padding_even_when_it_is_infinite():
    logp = LOGP.clone()
    logp[1, 2] = float("-inf")
    loss, _ = grpo_loss(logp, OLD, ADV, MASK)
    assert close(loss, -0.4333333)


def test_grpo_loss_misuse_raises():
    with pytest.raises(ValueError, match="max_tokens"):
        grpo_loss(LOGP, OLD, ADV, MASK, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(LOGP, OLD, ADV, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(LOGP, OLD, ADV, MASK, aggregation="mean")


# ---- magrpo_loss --------------------------------------------------------------------------------
def test_magrpo_loss_value_and_gradient():
    # summed log-probs on the mask: row 0 -0.5 - 1.0 = -1.5, row 1 -2.0 (the -9 is padding)
    # loss = -(1 * -1.5 + (-1) * -2.0) / 2 = -(0.5) / 2 = -0.25; d/d logp = -A * mask / B
    logp = torch.tensor([[0.0, -0.5, -1.0], [0.0, -2.0, -9.0]], requires_grad=True)
    loss, m = magrpo_loss(logp, MASK, ADV)
    assert close(loss, -0.25)
    loss.backward()
    assert close(logp.grad, [[0.0, -0.5, -0.5], [0.0, 0.5, 0.0]])
    assert m["mean_seq_logp"] == pytest.approx(-1.75)  # (-1.5 - 2.0) / 2
    assert m["mean_completion_tokens"] == pytest.approx(1.5)


# ---- discounted_returns -------------------------------------------------------------------------
def test_discounted_returns_without_termination():
    # G2 = 1, G1 = 0.9 * 1, G0 = 0.9 * 0.9; second row: G2 = 3, G1 = 2 + 2.7 = 4.7, G0 = 1 + 4.23 = 5.23
    out = discounted_returns(torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 3.0]]), gamma=0.9)
    assert close(out, [[0.81, 0.9, 1.0], [5.23, 4.7, 3.0]])


def test_discounted_returns_early_termination():
    # row 0 ends at turn 1: the reward 5 at turn 2 never happened -> G = [1 + 0.9 * 0, 0, 0]
    # row 1 ends at turn 1: G1 = 1, G0 = 0 + 0.9 * 1 = 0.9, G2 = 0
    rewards = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]])
    done = torch.tensor([[False, True, False], [False, True, False]])
    assert close(discounted_returns(rewards, 0.9, done), [[1.0, 0.0, 0.0], [0.9, 1.0, 0.0]])


def test_token_logprobs_tempered_is_log_softmax_of_logits_over_t():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, generator=g)
    ids = torch.randint(0, 6, (2, 4), generator=g)
    temps = torch.tensor([0.7, 1.0])
    logp = token_logprobs(logits, ids, temps)
    for b in range(2):
        expected = torch.log_softmax(logits[b, :-1] / temps[b], dim=-1).gather(1, ids[b, 1:, None]).squeeze(1)
        assert torch.allclose(logp[b, 1:], expected, atol=1e-6)
    assert torch.equal(token_logprobs(logits, ids, 1.0), token_logprobs(logits, ids))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(logits, ids, torch.tensor([0.0, 1.0]))


def test_grpo_loss_k3_ratio_kl_weights_k3_by_the_ratio():
    # one token, A = 0, old = -1, logp = -0.9 -> r = e^0.1; ref = -1.2: d = -0.3, k3 = e^-0.3 + 0.3 - 1
    logp = torch.tensor([[0.0, -0.9]], requires_grad=True)
    old, ref, mask = torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, -1.2]]), torch.tensor([[0.0, 1.0]])
    k3 = math.exp(-0.3) + 0.3 - 1
    plain, _ = grpo_loss(logp, old, torch.zeros(1), mask, ref_logp=ref, kl_coef=1.0)
    weighted, _ = grpo_loss(
        logp, old, torch.zeros(1), mask, ref_logp=ref, kl_coef=1.0, kl_estimator="k3_ratio"
    )
    assert plain.item() == pytest.approx(k3, abs=1e-6)
    assert weighted.item() == pytest.approx(math.exp(0.1) * k3, abs=1e-6)
    # d/dlogp (r * k3) = r * k3 + r * (1 - e^d)
    (grad,) = torch.autograd.grad(weighted, logp)
    assert grad[0, 1].item() == pytest.approx(math.exp(0.1) * (k3 + 1 - math.exp(-0.3)), abs=1e-6)
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(logp, old, torch.zeros(1), mask, kl_estimator="k2")  # type: ignore[arg-type]
