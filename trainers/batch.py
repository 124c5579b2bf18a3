"""Traces to tensors: the one place where recorded ModelCall/Reward events become a training batch.

`traces_to_batch` is pure: it takes events (lists of `ModelCall` and `Reward`) and returns a
`TrajectoryBatch` of tensors. `load_events` is the thin helper that reads them from a `TraceStore`.

Conventions:

- **Token-exact.** `input_ids[b]` is `prompt_token_ids + completion_token_ids` exactly as the engine
  sampled them; nothing is re-tokenized. Rows are right padded with `pad_token_id`.
- **Alignment.** A per-token tensor holds at position `t` the value for token `t`:
  `old_logprobs[b, t] = log p_old(input_ids[b, t] | input_ids[b, :t])` for completion positions
  `P_b <= t < P_b + C_b` (P = prompt length, C = completion length), 0 elsewhere. `completion_mask` is 1
  exactly on those positions. `losses.token_logprobs(logits, input_ids)` uses the same convention, so
  `grpo_loss(token_logprobs(...), batch.old_logprobs, batch.advantages, batch.completion_mask)` needs
  no shifting.
- **Groups.** Samples sharing a `group_id` share a context; the advantage is the reward minus the mean
  of the group's *usable* samples (Dr. GRPO; divided by the group std with `std_scale`). Rows are
  ordered group by group, samples in `sample_index` order.
- **Sampling temperature.** `temperatures[b]` is the temperature row b was sampled at (`ModelCall.sampling`),
  so the trainer can differentiate the policy it sampled from, softmax(logits / T) (`tempered_policy`).
  A greedy row (temperature 0) has no sampling distribution to match and a call recorded without a
  temperature was sampled at the provider default: both count as T = 1 (greedy rows are counted in
  `BatchStats.greedy_rows`). `old_logprobs` stay what the engine recorded (raw, T = 1, as vLLM returns them).
- **Nothing vanishes silently.** Every call that cannot be used is counted in `BatchStats` under the
  reason, with its call id.
- **Base model.** Only calls of the trainable `roles` must come from `base_model`: frozen peers may be
  any model (a hosted API, another family), and their calls are never trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mlpo_agents.trace import ModelCall, Reward, TraceStore, group_events

from .losses import group_advantages

RewardSource = Literal["call", "episode"]


class TraceMismatchError(ValueError):
    """The traces were sampled from other base weights/tokenizer than the model being trained."""


@dataclass
class BatchStats:
    """What `traces_to_batch` saw and why each unused call was left out (counts and call ids)."""

    calls_seen: int = 0
    """All calls passed in, any role."""
    other_role: int = 0
    """Calls of roles that are not trained (frozen peers, other agents): ignored by design."""
    rows: int = 0
    """Calls that became batch rows."""
    groups: int = 0
    """Groups in the batch (each with >= 2 rows)."""
    zero_advantage_groups: int = 0
    """Groups whose rewards are all equal: they give no learning signal."""
    truncated: int = 0
    """Trainable calls that stopped at the length limit (finish_reason 'length'), kept or not."""
    mixed_prompt_groups: int = 0
    """Groups whose samples do not share one prompt (kept: e.g. aligned multi-agent samples)."""
    greedy_rows: int = 0
    """Rows sampled greedily (temperature 0): their policy temperature is taken as 1."""
    skipped: dict[str, list[str]] = field(default_factory=dict)
    """Call ids left out, by reason: no_token_ids, logprob_mismatch, truncated, too_long, no_reward,
    singleton_group."""

    def skip(self, reason: str, call_id: str) -> None:
        """Record one call left out for `reason`."""
        self.skipped.setdefault(reason, []).append(call_id)

    def count(self, reason: str) -> int:
        """Number of calls left out for `reason`."""
        return len(self.skipped.get(reason, ()))

    @property
    def dropped(self) -> int:
        """Trainable calls left out, all reasons together."""
        return sum(len(v) for v in self.skipped.values())

    def as_dict(self) -> dict[str, int]:
        """Flat counts for logging."""
        out = {
            "calls_seen": self.calls_seen,
            "other_role": self.other_role,
            "rows": self.rows,
            "groups": self.groups,
            "zero_advantage_groups": self.zero_advantage_groups,
            "truncated": self.truncated,
            "mixed_prompt_groups": self.mixed_prompt_groups,
            "greedy_rows": self.greedy_rows,
            "dropped": self.dropped,
        }
        out.update({f"skipped_{k}": len(v) for k, v in self.skipped.items()})
        return out


@dataclass
class TrajectoryBatch:
    """Right-padded token-exact rows of one or more GRPO groups, ready for a policy-gradient step."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64, 1 on prompt + completion
    completion_mask: torch.Tensor  # (B, L) float32, 1 on the trainable role's completion tokens
    old_logprobs: torch.Tensor  # (B, L) float32, sampling logprob of token t at position t, 0 elsewhere
    rewards: torch.Tensor  # (B,) float32, weighted sum of the named rewards
    advantages: torch.Tensor  # (B,) float32
    group_index: torch.Tensor  # (B,) int64 in [0, G), index into `group_ids`
    prompt_lengths: torch.Tensor  # (B,) int64
    completion_lengths: torch.Tensor  # (B,) int64
    call_ids: list[str]
    """Row b came from call `call_ids[b]` (to join results back to the trace)."""
    group_ids: list[str]
    """The trace group id of each group index."""
    stats: BatchStats
    temperatures: torch.Tensor | None = None
    """(B,) float32 sampling temperature of each row (greedy or unrecorded: 1); None = every row at 1."""
    old_logprobs_tempered: bool = False
    """False: `old_logprobs` are the engine's raw (T = 1) ones; True: tempered ones of the sampling weights
    (`trainers.update.with_current_logprobs`)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_completion_tokens(self) -> int:
        """Tokens the loss trains on."""
        return int(self.completion_mask.sum().item())

    def select(self, rows: Sequence[int] | torch.Tensor) -> TrajectoryBatch:
        """A sub-batch of the given rows (for micro-batching); padding columns are trimmed."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.attention_mask[idx].sum(dim=1).max().item()) if len(idx) else 0
        return TrajectoryBatch(
            input_ids=self.input_ids[idx, :width],
            attention_mask=self.attention_mask[idx, :width],
            completion_mask=self.completion_mask[idx, :width],
            old_logprobs=self.old_logprobs[idx, :width],
            rewards=self.rewards[idx],
            advantages=self.advantages[idx],
            group_index=self.group_index[idx],
            prompt_lengths=self.prompt_lengths[idx],
            completion_lengths=self.completion_lengths[idx],
            call_ids=[self.call_ids[i] for i in idx.tolist()],
            group_ids=self.group_ids,
            stats=self.stats,
            temperatures=None if self.temperatures is None else self.temperatures[idx],
            old_logprobs_tempered=self.old_logprobs_tempered,
        )

    def to(self, device: torch.device | str) -> TrajectoryBatch:
        """The same batch with every tensor on `device`."""
        moved: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            moved[name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return TrajectoryBatch(**moved)


def load_events(
    store: TraceStore,
    *,
    episode_ids: str | Sequence[str] | None = None,
    roles: str | Sequence[str] | None = None,
) -> tuple[list[ModelCall], list[Reward]]:
    """Read the calls (optionally of some roles) and the rewards of some episodes (default: all)."""
    ids = list(episode_ids) if isinstance(episode_ids, list | tuple) else episode_ids
    roles_arg = list(roles) if isinstance(roles, list | tuple) else roles
    return store.calls(episode_id=ids, role=roles_arg), store.rewards(episode_id=ids)


def _reward_table(
    rewards: Sequence[Reward], names: Sequence[str], source: RewardSource
) -> dict[tuple[str, str], float]:
    # Key (call_id or episode_id, name) -> value. A later event for the same key wins (a re-score).
    table: dict[tuple[str, str], float] = {}
    for r in rewards:
        if r.name not in names or r.meta.get("failed"):
            continue  # a reward whose checker failed is no verdict: its call is skipped as no_reward
        if source == "call" and r.call_id is not None:
            table[(r.call_id, r.name)] = float(r.value)
        elif source == "episode" and r.call_id is None:
            table[(r.episode_id, r.name)] = float(r.value)
    return table


def _check_base_model(calls: Sequence[ModelCall], base_model: str) -> None:
    foreign = [c for c in calls if c.base_model != base_model]
    if not foreign:
        return
    found: dict[str, int] = {}
    for c in foreign:
        found[c.base_model] = found.get(c.base_model, 0) + 1
    summary = ", ".join(f"{n} from {m!r}" for m, n in sorted(found.items()))
    raise TraceMismatchError(
        f"{len(foreign)} of {len(calls)} trainable calls were sampled from another base model ({summary}), "
        f"but the trainer is training {base_model!r}. Their token ids and logprobs belong to other weights "
        f"and tokenizer and cannot be trained on. Train base model {next(iter(found))!r} instead, or "
        f"regenerate these episodes with {base_model!r} serving the trained role (or pass only the "
        f"episodes sampled from it). First foreign call: {foreign[0].call_id}."
    )


def traces_to_batch(
    calls: Sequence[ModelCall],
    rewards: Sequence[Reward],
    *,
    roles: Sequence[str] = ("leader",),
    base_model: str,
    reward_names: Sequence[str] = ("correct",),
    reward_weights: Sequence[float] | Mapping[str, float] | None = None,
    pad_token_id: int = 0,
    std_scale: bool = False,
    max_len: int | None = None,
    keep_truncated: bool = True,
    reward_source: RewardSource = "call",
) -> TrajectoryBatch:
    """Turn recorded calls and rewards into a right-padded, token-exact GRPO batch (see module doc).

    A row's reward is sum_k w_k * reward_k over `reward_names` (weights default to 1), read from the
    rewards attached to the call (`reward_source="call"`, what the runner records for every sample
    of the trainable role) or from the episode-level rewards (`"episode"`, one joint reward per
    episode as in MAGRPO). A call missing any named reward is skipped as `no_reward`. Calls that
    stopped at the length limit are kept unless `keep_truncated=False`; rows longer than `max_len`
    are skipped as `too_long` (never cut: a cut completion no longer matches its reward).
    """
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    reward_names = (reward_names,) if isinstance(reward_names, str) else tuple(reward_names)
    if reward_source not in ("call", "episode"):
        raise ValueError(f"reward_source must be 'call' or 'episode', not {reward_source!r}")
    if reward_weights is None:
        weights = dict.fromkeys(reward_names, 1.0)
    elif isinstance(reward_weights, Mapping):
        unknown = set(reward_weights) - set(reward_names)
        if unknown:
            raise ValueError(
                f"reward_weights names {sorted(unknown)} are not in reward_names {list(reward_names)}"
            )
        weights = {n: float(reward_weights.get(n, 1.0)) for n in reward_names}
    else:
        if len(reward_weights) != len(reward_names):
            raise ValueError(
                f"reward_weights has {len(reward_weights)} values for {len(reward_names)} reward_names"
            )
        weights = dict(zip(reward_names, map(float, reward_weights), strict=True))

    stats = BatchStats(calls_seen=len(calls))
    trainable = [c for c in calls if c.role in roles]
    stats.other_role = len(calls) - len(trainable)
    if not trainable:
        seen = sorted({c.role for c in calls})
        raise ValueError(
            f"no calls with role in {list(roles)} among {len(calls)} calls (roles present: {seen})"
        )
    _check_base_model(trainable, base_model)

    table = _reward_table(rewards, reward_names, reward_source)
    if not table:
        level = "call-level (call_id set)" if reward_source == "call" else "episode-level (call_id None)"
        raise ValueError(
            f"no {level} rewards named {list(reward_names)} among {len(rewards)} reward events; score the "
            f"episodes first, or pick reward_names/reward_source matching what was recorded "
            f"(names present: {sorted({r.name for r in rewards})})"
        )

    usable: list[tuple[ModelCall, float]] = []
    for c in trainable:
        if not c.prompt_token_ids or (not c.completion_token_ids and c.text):
            stats.skip("no_token_ids", c.call_id)
            continue
        if len(c.logprobs) != len(c.completion_token_ids):
            stats.skip("logprob_mismatch", c.call_id)
            continue
        if c.finish_reason == "length":
            stats.truncated += 1
            if not keep_truncated:
                stats.skip("truncated", c.call_id)
                continue
        if max_len is not None and len(c.prompt_token_ids) + len(c.completion_token_ids) > max_len:
            stats.skip("too_long", c.call_id)
            continue
        key = c.call_id if reward_source == "call" else c.episode_id
        if any((key, n) not in table for n in reward_names):
            stats.skip("no_reward", c.call_id)
            continue
        usable.append((c, sum(weights[n] * table[(key, n)] for n in reward_names)))

    reward_of = {c.call_id: r for c, r in usable}
    groups = group_events(c for c, _ in usable)
    rows: list[ModelCall] = []
    group_ids: list[str] = []
    group_of_row: list[int] = []
    for gid, members in groups.items():
        if len(members) < 2:
            stats.skip("singleton_group", members[0].call_id)
            continue
        if len({tuple(m.prompt_token_ids) for m in members}) > 1:
            stats.mixed_prompt_groups += 1
        group_of_row.extend([len(group_ids)] * len(members))
        group_ids.append(gid)
        rows.extend(members)

    if not rows:
        if groups and all(len(m) < 2 for m in groups.values()):
            raise ValueError(
                f"every group has a single usable sample ({len(groups)} groups): GRPO needs G>=2 samples per "
                f"context; run with leader sampling n>=2. Stats: {stats.as_dict()}"
            )
        raise ValueError(f"no usable calls for roles {list(roles)}: {stats.as_dict()}")

    width = max(len(c.prompt_token_ids) + len(c.completion_token_ids) for c in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # (B, L)
    completion_mask = torch.zeros((batch, width), dtype=torch.float32)  # (B, L)
    old_logprobs = torch.zeros((batch, width), dtype=torch.float32)  # (B, L)
    prompt_lengths = torch.zeros(batch, dtype=torch.long)  # (B,)
    completion_lengths = torch.zeros(batch, dtype=torch.long)  # (B,)
    for b, c in enumerate(rows):
        p, n = len(c.prompt_token_ids), len(c.completion_token_ids)
        input_ids[b, : p + n] = torch.tensor(c.prompt_token_ids + c.completion_token_ids, dtype=torch.long)
        attention_mask[b, : p + n] = 1
        completion_mask[b, p : p + n] = 1.0
        old_logprobs[b, p : p + n] = torch.tensor(c.logprobs, dtype=torch.float32)
        prompt_lengths[b], completion_lengths[b] = p, n

    sampled_at = [sampling_temperature(c) for c in rows]
    stats.greedy_rows = sum(t == 0.0 for t in sampled_at)
    temperatures = torch.tensor([t if t > 0 else 1.0 for t in sampled_at], dtype=torch.float32)  # (B,)
    reward_tensor = torch.tensor([reward_of[c.call_id] for c in rows], dtype=torch.float32)  # (B,)
    group_index = torch.tensor(group_of_row, dtype=torch.long)  # (B,)
    advantages = group_advantages(reward_tensor, group_index, std_scale=std_scale)  # (B,)

    group_min = torch.full((len(group_ids),), float("inf")).scatter_reduce(
        0, group_index, reward_tensor, "amin"
    )
    group_max = torch.full((len(group_ids),), float("-inf")).scatter_reduce(
        0, group_index, reward_tensor, "amax"
    )
    stats.rows, stats.groups = batch, len(group_ids)
    stats.zero_advantage_groups = int((group_min == group_max).sum().item())

    return TrajectoryBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        old_logprobs=old_logprobs,
        rewards=reward_tensor,
        advantages=advantages,
        group_index=group_index,
        prompt_lengths=prompt_lengths,
        completion_lengths=completion_lengths,
        call_ids=[c.call_id for c in rows],
        group_ids=group_ids,
        stats=stats,
        temperatures=temperatures,
    )


def sampling_temperature(call: ModelCall) -> float:
    """The temperature `call` was sampled at (1.0, the provider default, when it was not recorded)."""
    value = call.sampling.get("temperature")
    return 1.0 if value is None else float(value)
