"""Advantages and policy losses as pure tensor functions (no models, no trainer state).

Conventions shared with `trainers.batch`:

- Shapes: `B` sequences, `L` padded tokens (prompt + completion, right padded), `V` vocabulary.
- Alignment: a per-token tensor holds at position `t` the quantity for *token t itself*, e.g.
  `logp[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`. Position 0 has no prefix and holds 0.
  `token_logprobs`, `TrajectoryBatch.old_logprobs` and `TrajectoryBatch.completion_mask` all use it,
  so they combine elementwise with no shifting in the trainer.
- `mask` is 1 on the tokens the loss trains (the trainable role's completion tokens), 0 elsewhere.

References:
- GRPO: Shao et al. 2024, DeepSeekMath, arXiv 2402.03300 (eq. 3; k3 KL estimator eq. 4).
- PPO clipping: Schulman et al. 2017, arXiv 1707.06347 (eq. 7). Asymmetric clip (`clip_eps_high`):
  DAPO, Yu et al. 2025, arXiv 2503.14476 (clip-higher; token-level aggregation).
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783 (no std scaling,
  no length normalisation: divide by a constant generation budget).
- MAGRPO: Liu et al. 2025, arXiv 2508.04652.
- TRL 1.16 `GRPOTrainer` (trl/trainer/grpo_trainer.py): the std epsilon `STD_EPS`, the tempered policy
  (`token_logprobs(..., temperature=)`, TRL divides the logits by the sampling temperature) and the
  ratio-weighted KL (`kl_estimator="k3_ratio"`, TRL's `use_bias_correction_kl`) follow it; the reference
  tests in tests/test_fidelity_grpo.py call TRL's `_compute_loss` on the same tensors.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token", "sequence", "dr_grpo"]
KLEstimator = Literal["k3", "k3_ratio"]

STD_EPS = 1e-4
"""Added to the group std before dividing (std-scaled advantages): TRL 1.16 GRPOTrainer's `std_rewards + 1e-4`.
A smaller epsilon blows up groups whose rewards differ by little (std ~1e-3)."""


def group_advantages(
    rewards: torch.Tensor,  # (B,)
    group_index: torch.Tensor,  # (B,) int64 in [0, G)
    std_scale: bool = False,
    eps: float = STD_EPS,
) -> torch.Tensor:  # (B,)
    """Group-relative advantage A_i = r_i - mean_{j in g(i)} r_j, or (r_i - mean) / (std + eps) when `std_scale`.

    Without `std_scale` this is Dr. GRPO's advantage; with it, the original GRPO one. The std is the
    unbiased sample std over the group (Bessel's correction, as `torch.std`), and a group whose rewards
    are all equal gets advantage 0 either way. Groups may have different sizes.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_index must both be (B,); got {tuple(rewards.shape)}, {tuple(group_index.shape)}"
        )
    rewards = rewards.to(torch.float32)
    group_index = group_index.to(torch.long)
    num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    counts = torch.zeros(num_groups, dtype=torch.float32, device=rewards.device)
    counts.index_add_(0, group_index, torch.ones_like(rewards))  # (G,)
    sums = torch.zeros(num_groups, dtype=torch.float32, device=rewards.device)
    sums.index_add_(0, group_index, rewards)  # (G,)
    mean = sums / counts.clamp(min=1)  # (G,)
    centred = rewards - mean[group_index]  # (B,)
    if not std_scale:
        return centred
    sq = torch.zeros(num_groups, dtype=torch.float32, device=rewards.device)
    sq.index_add_(0, group_index, centred**2)  # (G,)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()  # (G,) unbiased
    return centred / (std[group_index] + eps)


def token_logprobs(
    logits: torch.Tensor,  # (B, L, V)
    input_ids: torch.Tensor,  # (B, L)
    temperature: torch.Tensor | float | None = None,  # (B,) or scalar; None = 1
) -> torch.Tensor:  # (B, L) float32
    """log p(input_ids[t] | input_ids[:t]) at position t (position 0 = 0), from causal-LM logits.

    logp[b, t] = z[b, t-1, x_t] - logsumexp_v z[b, t-1, v] with z = logits / temperature[b]: with a
    temperature this is the log-prob under the *tempered* policy softmax(logits / T) that the engine
    samples from (top-p is not included, as in TRL). Computed one sequence at a time in float32 with
    gather + logsumexp, so the peak extra memory is one (L, V) row rather than a (B, L, V) copy.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, L, V) and input_ids (B, L); got {tuple(logits.shape)}, {tuple(input_ids.shape)}"
        )
    batch, length, _ = logits.shape
    out = logits.new_zeros((batch, length), dtype=torch.float32)  # (B, L)
    if length < 2:
        return out
    temps = None
    if temperature is not None:
        temps = torch.as_tensor(temperature, dtype=torch.float32).expand(batch)  # (B,)
        if not bool((temps > 0).all()):
            raise ValueError(f"temperature must be > 0 (greedy rows count as 1), got {temps.tolist()}")
    targets = input_ids[:, 1:].unsqueeze(-1)  # (B, L-1, 1)
    rows = []
    for b in range(batch):
        row_logits = logits[b, :-1].float()  # (L-1, V)
        if temps is not None and float(temps[b]) != 1.0:
            row_logits = row_logits / temps[b].to(row_logits.device)
        picked = row_logits.gather(-1, targets[b]).squeeze(-1)  # (L-1,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))  # (L-1,)
    return torch.cat([out[:, :1], torch.stack(rows)], dim=1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def grpo_loss(
    logp: torch.Tensor,  # (B, L) current policy, grad flows through it
    old_logp: torch.Tensor,  # (B, L) sampling policy (from the engine)
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, L) 1 on trained completion tokens
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logp: torch.Tensor | None = None,  # (B, L) reference policy
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Aggregation = "token",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO surrogate with per-token ratios, optional KL to a reference, three aggregations.

    Per token (Shao et al. eq. 3, PPO eq. 7), with r_t = exp(logp_t - old_logp_t):
        l_t = max(-A * r_t, -A * clip(r_t, 1 - clip_eps, 1 + clip_eps_high)) + kl_coef * kl_t
        k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            (Schulman's k3, DeepSeekMath eq. 4)
        kl_t = k3_t ("k3", GRPO as published) or r_t * k3_t ("k3_ratio": the importance-weighted k3 whose
               gradient is the unbiased reverse-KL gradient, DeepSeek-V3.2; TRL 1.16's default
               `use_bias_correction_kl=True`; r_t is differentiable, so it changes the gradient even at r = 1)
    Aggregation over the masked tokens (M = mask, |o_b| = sum_t M[b, t]):
        "token"    sum_{b,t} M l / sum_{b,t} M                           (DAPO: every token weighs the same)
        "sequence" 1/B sum_b (1/|o_b| sum_t M l)                         (GRPO as published)
        "dr_grpo"  sum_{b,t} M l / (B * max_tokens)                      (Dr. GRPO: constant normaliser;
                    `max_tokens` is the generation budget, e.g. max_new_tokens, and is required)
    `clip_eps_high` defaults to `clip_eps` (symmetric clipping). Returns (loss, metrics) where the
    metrics are floats: clip_fraction (share of tokens whose clipped branch is active), approx_kl
    (k3 of old vs new, mean over tokens), mean_ratio, and ref_kl when a reference is given.
    """
    if aggregation not in ("token", "sequence", "dr_grpo"):
        raise ValueError(f"aggregation must be 'token', 'sequence' or 'dr_grpo', not {aggregation!r}")
    if aggregation == "dr_grpo" and not max_tokens:
        raise ValueError(
            "aggregation='dr_grpo' needs max_tokens (the generation budget, e.g. max_new_tokens)"
        )
    if kl_estimator not in ("k3", "k3_ratio"):
        raise ValueError(f"kl_estimator must be 'k3' or 'k3_ratio', not {kl_estimator!r}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (log-probs of the reference model on the same tokens)")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    on = mask.bool()  # (B, L)
    mask = mask.to(logp.dtype)  # (B, L)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # (B, 1)

    # `where`, not `* mask`: padding may hold -inf and inf * 0 = nan.
    log_ratio = torch.where(on, logp - old_logp, 0.0)  # (B, L)
    ratio = torch.exp(log_ratio)  # (B, L)
    pg_loss1 = -adv * ratio  # (B, L)
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)  # (B, L)
    per_token = torch.max(pg_loss1, pg_loss2)  # (B, L)

    ref_kl = None
    if ref_logp is not None:
        ref_diff = torch.where(on, ref_logp - logp, 0.0)  # (B, L)
        ref_kl = torch.exp(ref_diff) - ref_diff - 1.0  # (B, L) k3, >= 0
        if kl_coef > 0:
            kl_term = ref_kl * ratio if kl_estimator == "k3_ratio" else ref_kl  # (B, L)
            per_token = per_token + kl_coef * kl_term

    masked = torch.where(on, per_token, 0.0)  # (B, L)
    if aggregation == "token":
        loss = masked.sum() / mask.sum().clamp(min=1)
    elif aggregation == "sequence":
        loss = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    else:
        assert max_tokens is not None  # checked above
        loss = masked.sum() / (mask.shape[0] * max_tokens)

    with torch.no_grad():
        clipped = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))  # (B, L)
        metrics = {
            "clip_fraction": _masked_mean(clipped.to(mask.dtype), mask).item(),
            "approx_kl": _masked_mean((ratio - 1.0) - log_ratio, mask).item(),
            "mean_ratio": _masked_mean(ratio, mask).item(),
        }
        if ref_kl is not None:
            metrics["ref_kl"] = _masked_mean(ref_kl, mask).item()
    return loss, metrics


def magrpo_loss(
    logp: torch.Tensor,  # (B, L) agent i's policy on its own completion tokens
    mask: torch.Tensor,  # (B, L)
    advantages: torch.Tensor,  # (B,) joint-action advantages A_g
) -> tuple[torch.Tensor, dict[str, float]]:
    """MAGRPO per-agent objective: loss_i = -(1/B) sum_g A_g * sum_t log pi_i(o_{g,t}).

    Liu et al. 2025 (MAGRPO): each of the B = G joint actions in a group contributes its advantage
    times the summed log-probability of agent i's tokens. Normalisation: the mean over the B samples
    (over all samples when B holds several groups) and a plain sum over tokens, with no length
    normalisation and no ratio or clipping (on-policy REINFORCE with a group baseline).
    Metrics: mean sequence log-prob and mean completion length.
    """
    seq_logp = torch.where(mask.bool(), logp, 0.0).sum(dim=1)  # (B,)
    mask = mask.to(logp.dtype)  # (B, L)
    loss = -(advantages.to(logp.dtype) * seq_logp).mean()
    with torch.no_grad():
        metrics = {
            "mean_seq_logp": seq_logp.mean().item(),
            "mean_completion_tokens": mask.sum(dim=1).mean().item(),
        }
    return loss, metrics


def discounted_returns(
    rewards_per_turn: torch.Tensor,  # (B, T) reward received at each turn
    gamma: float = 0.9,
    done: torch.Tensor | None = None,  # (B, T) bool, True at the turn where the episode ended
) -> torch.Tensor:  # (B, T)
    """Discounted return per turn: G_t = r_t + gamma * (1 - done_t) * G_{t+1}, G_T = 0.

    Multi-turn MAGRPO (early termination when the reward reaches a threshold): with `done`, no reward
    flows back across the terminating turn and every turn after it gets return 0 (those turns never
    happened, so their rewards are ignored).
    """
    rewards_per_turn = rewards_per_turn.to(torch.float32)
    batch, turns = rewards_per_turn.shape
    if done is None:
        done = torch.zeros((batch, turns), dtype=torch.bool, device=rewards_per_turn.device)
    if done.shape != rewards_per_turn.shape:
        raise ValueError(f"done must be (B, T) like rewards_per_turn; got {tuple(done.shape)}")
    done_f = done.to(torch.float32)  # (B, T)
    # A turn is valid when no earlier turn ended the episode.
    alive = (done_f.cumsum(dim=1) - done_f) == 0  # (B, T)
    rewards = rewards_per_turn * alive  # (B, T)
    returns = torch.zeros_like(rewards)  # (B, T)
    running = torch.zeros(batch, dtype=torch.float32, device=rewards.device)  # (B,)
    for t in range(turns - 1, -1, -1):
        running = rewards[:, t] + gamma * (1.0 - done_f[:, t]) * running
        returns[:, t] = running
    return returns * alive
