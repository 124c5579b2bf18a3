"""The gradient step shared by the GRPO-family trainers: micro-batches, accumulation, clipping, DDP.

`policy_update` takes one `TrajectoryBatch` and makes exactly one optimizer step. Micro-batch losses
are weighted so that the accumulated gradient equals the gradient of the loss on the whole batch
(for every aggregation), and under an `accelerate.Accelerator` each rank trains on its own rows
(`rows[rank::world]`) while DDP averages the gradients, so the step is the same as on one process.

Which policy is optimised (`tempered_policy`): the engine samples row b from softmax(logits / T_b) but
records raw (T = 1) logprobs, as vLLM does. With `tempered_policy=True` the trainable forward divides the
logits by each row's sampling temperature (`TrajectoryBatch.temperatures`), as TRL's GRPOTrainer does, so
the policy that is differentiated is the one that was sampled. The ratio's old logprobs must then be of
the same tempered distribution, which the recorded raw ones are not; two ways to get them:
- `old_logprobs="current"`: the detached current logprob (the ratio is exactly 1; TRL's path when
  num_iterations == 1). Right for the first gradient step on freshly sampled data, whose weights are
  the sampling weights.
- `with_current_logprobs(model, batch)` before the first of several gradient steps on one batch: one
  no-grad forward stores the tempered logprobs of the sampling weights as `old_logprobs`.
Greedy rows count as T = 1 (see `trainers.batch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

from .batch import TrajectoryBatch
from .losses import grpo_loss, magrpo_loss, token_logprobs

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
"""`fn(logp, batch, ref_logp=None, **loss_kwargs) -> (loss, metrics)` on one micro-batch."""


def _grpo(logp: torch.Tensor, mb: TrajectoryBatch, ref_logp: torch.Tensor | None = None, **kw: Any) -> Any:
    return grpo_loss(logp, mb.old_logprobs, mb.advantages, mb.completion_mask, ref_logp=ref_logp, **kw)


def _magrpo(logp: torch.Tensor, mb: TrajectoryBatch, ref_logp: torch.Tensor | None = None, **kw: Any) -> Any:
    return magrpo_loss(logp, mb.completion_mask, mb.advantages)


LOSSES: dict[str, LossFn] = {"grpo": _grpo, "magrpo": _magrpo}

SKIPPED_UPDATE = {"loss": 0.0, "grad_norm": 0.0, "trained_tokens": 0.0, "tokens_per_s": 0.0, "update_s": 0.0,
                  "update_skipped": 1.0}  # fmt: skip
"""`policy_update`'s metrics when there was nothing to learn and no step was taken."""


def nothing_to_learn(batch: TrajectoryBatch, loss: str | LossFn = "grpo", kl_coef: float = 0.0) -> bool:
    """Every row's advantage is 0 under a built-in loss with no KL term: the gradient is exactly zero, so no
    step is taken (a zero gradient would still move the weights through Adam's momentum). Every trainer's rule."""
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    return loss_fn in (_grpo, _magrpo) and kl_coef == 0 and not bool(batch.advantages.any())


OldLogprobs = Literal["batch", "current"]


def _micro_batches(
    rows: int, micro_batch_size: int, rank: int, world: int, keep: list[bool] | None = None
) -> list[list[int]]:
    """This rank's micro-batches of the rows it keeps; every rank gets the same count (an empty one is `[]`)
    so DDP syncs line up."""
    kept = [[r for r in range(k, rows, world) if keep is None or keep[r]] for k in range(world)]
    mine = kept[rank]
    count = max(1, math.ceil(max(len(k) for k in kept) / micro_batch_size))
    chunks = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return chunks + [[] for _ in range(count - len(chunks))]


MIN_SHARED_PREFIX = 16
"""A micro-batch whose rows share at least this many leading prompt tokens computes them once."""


def shared_prefix_length(input_ids: torch.Tensor, limit: int) -> int:
    """How many leading tokens (at most `limit`) every row of `input_ids` (B, L) has in common."""
    if input_ids.shape[0] < 2 or limit <= 0:
        return 0
    same = (input_ids[:, :limit] == input_ids[:1, :limit]).all(dim=0)  # (limit,)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else limit


def sequence_logprobs(
    model: Any,
    mb: TrajectoryBatch,
    tempered_policy: bool = False,
    *,
    share_prefix: bool = True,
    prefix_model: Any = None,
) -> torch.Tensor:
    """(B, L) log p(token t | tokens < t) of `model` on a micro-batch (same alignment as `old_logprobs`).

    With `tempered_policy`, p = softmax(logits / T_b) at each row's sampling temperature. Only positions
    from the shortest prompt's last token on get logits (`logits_to_keep`): earlier positions hold no
    completion token, so their log-probs are 0, as the loss masks them anyway. With `share_prefix`, the
    prompt tokens that all rows share (a GRPO group's G samples share their whole prompt) run through the
    model once and their KV cache is repeated for every row, instead of once per row; gradients flow through
    the shared forward, so the result and its gradient equal the plain forward's up to float rounding
    (pinned by tests/test_update_fast.py). `prefix_model`: the module that runs the shared prefix (the
    unwrapped model under DDP, so one DDP forward per backward); default `model`.
    """
    ids, mask = mb.input_ids, mb.attention_mask  # (B, L)
    width = ids.shape[1]
    first = max(int(mb.prompt_lengths.min()) - 1, 0) if len(mb) else 0  # first position whose logits count
    prefix = shared_prefix_length(ids, first) if share_prefix else 0
    keep = width - first
    cache = None
    if prefix >= MIN_SHARED_PREFIX:
        # None when the model declines a cache (e.g. activation checkpointing is on): plain forward then.
        cache = (prefix_model or model)(input_ids=ids[:1, :prefix], use_cache=True).cache
    if cache is not None:
        cache.batch_repeat_interleave(len(mb))
        logits = model(
            input_ids=ids[:, prefix:], attention_mask=mask, cache=cache, logits_to_keep=keep
        ).logits  # (B, keep, V)
    else:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # (B, keep, V)
    logp = token_logprobs(logits, ids[:, first:], mb.temperatures if tempered_policy else None)  # (B, keep)
    return torch.nn.functional.pad(logp, (first, 0))


def with_current_logprobs(
    model: Any,
    batch: TrajectoryBatch,
    *,
    tempered_policy: bool = True,
    micro_batch_size: int = 4,
    accelerator: Any = None,
) -> TrajectoryBatch:
    """`batch` with `old_logprobs` replaced by `model`'s own (tempered) logprobs, computed without gradient.

    Call it once before several gradient steps on a batch sampled from `model`'s current weights: the
    ratio of every step then refers to the tempered sampling policy (the recorded raw logprobs do not).
    """
    device = accelerator.device if accelerator else next(model.parameters()).device
    old = torch.zeros_like(batch.old_logprobs)  # (B, L)
    was_training = model.training
    model.eval()  # no dropout: the old policy is the sampling policy
    with torch.no_grad():
        for start in range(0, len(batch), micro_batch_size):
            rows = list(range(start, min(start + micro_batch_size, len(batch))))
            mb = batch.select(rows).to(device)
            logp = sequence_logprobs(model, mb, tempered_policy)  # (b, width)
            old[rows, : logp.shape[1]] = torch.where(mb.completion_mask.bool(), logp, 0.0).to(old.device)
    model.train(was_training)
    return dataclasses.replace(batch, old_logprobs=old, old_logprobs_tempered=tempered_policy)


def _needs_tempered_old(batch: TrajectoryBatch) -> bool:
    return batch.temperatures is not None and bool((batch.temperatures != 1.0).any())


def policy_update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    batch: TrajectoryBatch,
    *,
    loss: str | LossFn = "grpo",
    micro_batch_size: int = 4,
    max_grad_norm: float | None = 1.0,
    accelerator: Any = None,
    ref_model: Any = None,
    tempered_policy: bool = True,
    old_logprobs: OldLogprobs = "batch",
    share_prefix: bool = True,
    **loss_kwargs: Any,
) -> dict[str, float]:
    """One optimizer step on `batch`; returns loss, grad norm, loss metrics and trained tokens/s.

    `ref_model` gives reference log-probs for a KL term (`kl_coef` in `loss_kwargs`); with `kl_coef > 0`
    and no `ref_model`, a peft model with its adapter disabled is the reference. `tempered_policy`: the
    policy (and the reference) is softmax(logits / T) at each row's sampling temperature; `old_logprobs`:
    the ratio's old logprobs are the batch's ("batch") or the detached current ones ("current"); see the
    module docstring. `share_prefix`: rows' common prompt tokens run once per micro-batch (see
    `sequence_logprobs`); micro-batches follow row order, so a group's rows share a micro-batch when
    `micro_batch_size` divides G.

    Rows whose advantage is 0 add exactly nothing to the loss or its gradient of the built-in losses when
    there is no KL term, so they get no forward or backward (a group whose samples all scored the same is
    skipped whole); their rows and tokens still count in the normaliser, so the gradient is the whole
    batch's. When no row is left there is nothing to learn and no step is taken (`update_skipped`): a zero
    gradient would still move the weights through Adam's momentum (MLPO's rule too).
    """
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1")
    if old_logprobs not in ("batch", "current"):
        raise ValueError(f"old_logprobs must be 'batch' or 'current', not {old_logprobs!r}")
    if (
        loss_fn is _grpo
        and tempered_policy
        and old_logprobs == "batch"
        and not batch.old_logprobs_tempered
        and _needs_tempered_old(batch)
    ):
        raise ValueError(
            "tempered_policy=True with rows sampled at temperature != 1, but the batch's old_logprobs are the "
            "engine's raw (T = 1) ones: the ratio would compare two distributions. Pass old_logprobs='current' "
            "(one gradient step per batch), or call with_current_logprobs(model, batch) once before the steps, "
            "or tempered_policy=False"
        )
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if len(batch) < world:
        raise ValueError(f"a batch of {len(batch)} rows cannot be split over {world} processes")
    device = accelerator.device if accelerator else next(model.parameters()).device
    # The loss of the whole batch is a row mean (sequence, dr_grpo, magrpo) or a token mean (token):
    # a micro-batch's own mean is scaled by its share of rows (or tokens) of the whole batch.
    by_tokens = loss_kwargs.get("aggregation") == "token" and loss_fn is _grpo
    total = batch.completion_mask.sum().clamp(min=1) if by_tokens else torch.tensor(float(len(batch)))
    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    use_ref = loss_kwargs.get("kl_coef", 0.0) > 0

    model.train()
    optimizer.zero_grad(set_to_none=True)
    start, trained_tokens, loss_sum, trained_share = time.perf_counter(), 0, 0.0, 0.0
    sums: dict[str, float] = {}  # the loss's metrics, weighted by each micro-batch's share of what trained
    if nothing_to_learn(batch, loss_fn, loss_kwargs.get("kl_coef", 0.0)):  # weights and Adam's moments stay
        return dict(SKIPPED_UPDATE)
    skip_zero = loss_fn in (_grpo, _magrpo) and not use_ref
    keep = (batch.advantages != 0).tolist() if skip_zero else None
    chunks = _micro_batches(len(batch), micro_batch_size, rank, world, keep)
    for i, rows in enumerate(chunks):
        empty = not rows  # a rank with fewer rows still runs a forward/backward so DDP's all-reduce lines up
        mb = batch.select(rows or [0]).to(device)
        share = 0.0 if empty else float(mb.completion_mask.sum() if by_tokens else len(rows)) / float(total)
        sync = accelerator is None or i == len(chunks) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            logp = sequence_logprobs(
                model, mb, tempered_policy, share_prefix=share_prefix, prefix_model=unwrapped
            )  # (b, L)
            if old_logprobs == "current":
                mb.old_logprobs = logp.detach()  # ratio exactly 1 (mb is this loop's own copy)
            ref_logp = None
            if use_ref:
                with torch.no_grad():
                    if ref_model is not None:
                        ref_logp = sequence_logprobs(ref_model, mb, tempered_policy, share_prefix=share_prefix)
                    else:
                        with unwrapped.disable_adapter():
                            ref_logp = sequence_logprobs(unwrapped, mb, tempered_policy, share_prefix=share_prefix)
            mb_loss, metrics = loss_fn(logp, mb, ref_logp=ref_logp, **loss_kwargs)
            scaled = mb_loss * share * world  # DDP averages over ranks: undo the 1/world
            if accelerator is not None:
                accelerator.backward(scaled)
            else:
                scaled.backward()
        if not empty:
            trained_tokens += int(mb.completion_mask.sum().item())
            loss_sum += mb_loss.item() * share * world
            trained_share += share * world
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * share * world
    params = [p for p in model.parameters() if p.requires_grad]
    if max_grad_norm is not None and max_grad_norm > 0:
        clip = accelerator.clip_grad_norm_ if accelerator else torch.nn.utils.clip_grad_norm_
        grad_norm = float(clip(params, max_grad_norm))
    else:
        grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {
        "loss": loss_sum,  # this rank's estimate of the whole-batch loss
        "grad_norm": grad_norm,
        "trained_tokens": float(trained_tokens),
        "tokens_per_s": trained_tokens / max(seconds, 1e-9),
        "update_s": seconds,
        # means over the rows that trained (skipped zero-advantage groups are no rows of the ratio)
        **{key: value / max(trained_share, 1e-12) for key, value in sums.items()},
    }
