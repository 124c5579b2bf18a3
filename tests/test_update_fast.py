"""The fast update path equals the plain one: logits only where the loss reads them, and a GRPO group's
shared prompt run once per micro-batch (`trainers.update.sequence_logprobs`), in values and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mlpo_agents.trainers.batch import BatchStats, TrajectoryBatch  # noqa: E402
from mlpo_agents.trainers.lora import LoraSettings, attach_lora  # noqa: E402
from mlpo_agents.trainers.losses import token_logprobs  # noqa: E402
from mlpo_agents.trainers.update import (  # noqa: E402
    MIN_SHARED_PREFIX,
    policy_update,
    sequence_logprobs,
    shared_prefix_length,
)


def group_batch(groups: int = 2, g: int = 4, prompt: int = 40, tail: int = 0, seed: int = 0) -> TrajectoryBatch:
    """`groups` GRPO groups of `g` rows; rows of a group share a prompt of `prompt` tokens (the last `tail`
    prompt tokens differ per row, as when peers' proposals differ), completions of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows = groups * g
    lengths = [5 + (3 * b) % 9 for b in range(rows)]  # completion lengths 5..13
    width = prompt + max(lengths)
    ids = torch.zeros(rows, width, dtype=torch.long)
    attention = torch.zeros(rows, width, dtype=torch.long)
    completion = torch.zeros(rows, width)
    for k in range(groups):
        shared = torch.randint(3, 200, (prompt,), generator=gen)
        for j in range(g):
            b = k * g + j
            row_prompt = shared.clone()
            if tail:
                row_prompt[-tail:] = torch.randint(3, 200, (tail,), generator=gen)
            ids[b, :prompt] = row_prompt
            ids[b, prompt : prompt + lengths[b]] = torch.randint(3, 200, (lengths[b],), generator=gen)
            attention[b, : prompt + lengths[b]] = 1
            completion[b, prompt : prompt + lengths[b]] = 1.0
    rewards = torch.tensor([float((b * 7) % 3 == 0) for b in range(rows)])
    group_index = torch.arange(groups).repeat_interleave(g)
    means = torch.stack([rewards[group_index == k].mean() for k in range(groups)])
    return TrajectoryBatch(
        input_ids=ids,
        attention_mask=attention,
        completion_mask=completion,
        old_logprobs=torch.zeros(rows, width),
        rewards=rewards,
        advantages=rewards - means[group_index],
        group_index=group_index,
        prompt_lengths=torch.full((rows,), prompt),
        completion_lengths=torch.tensor(lengths),
        call_ids=[str(b) for b in range(rows)],
        group_ids=[f"g{k}" for k in range(groups)],
        stats=BatchStats(),
        temperatures=torch.full((rows,), 0.7),
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = attach_lora("tiny-test", LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # a non-zero adapter, so the gradient reaches both LoRA factors
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return m


def plain_logprobs(model, mb: TrajectoryBatch) -> torch.Tensor:
    """The reference: one full forward over every position, as before the fast path."""
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    return token_logprobs(logits, mb.input_ids, mb.temperatures)


def test_shared_prefix_length_counts_common_leading_tokens():
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 4], [1, 2, 3, 5]])
    assert shared_prefix_length(ids, 4) == 2
    assert shared_prefix_length(ids, 1) == 1
    assert shared_prefix_length(ids[:1], 4) == 0  # one row shares nothing with anyone


@pytest.mark.parametrize("tail", [0, 6])
def test_fast_logprobs_equal_the_full_forward_on_completion_tokens(model, tail):
    batch = group_batch(tail=tail)
    mb = batch.select(list(range(4)))
    assert shared_prefix_length(mb.input_ids, 39) >= MIN_SHARED_PREFIX  # the shared path is taken
    mask = mb.completion_mask.bool()
    with torch.no_grad():
        want = plain_logprobs(model, mb)
        for share in (True, False):
            got = sequence_logprobs(model, mb, tempered_policy=True, share_prefix=share)
            assert got.shape == want.shape
            assert torch.allclose(got[mask], want[mask], atol=1e-5), share
            assert (got[~mask][: mb.prompt_lengths[0] - 1] == 0).all()  # prompt positions carry no logits


def test_fast_update_gradient_equals_the_plain_forward_gradient(model):
    """One policy_update step with the fast path moves the weights as the plain forward does."""
    batch = group_batch(groups=2, g=4)

    def step(share: bool) -> dict[str, torch.Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        grads: dict[str, torch.Tensor] = {}

        class Capture(torch.optim.SGD):
            def step(self, closure=None):  # type: ignore[override]
                for name, p in model.named_parameters():
                    if p.requires_grad and p.grad is not None:
                        grads[name] = p.grad.detach().clone()

        opt = Capture(params, lr=0.0)
        policy_update(
            model, opt, batch, micro_batch_size=4, max_grad_norm=None, old_logprobs="current",
            share_prefix=share, aggregation="token",
        )
        for p, s in zip(params, saved, strict=True):
            p.data.copy_(s)
        return grads

    fast, plain = step(True), step(False)
    assert fast.keys() == plain.keys() and fast
    for name in fast:
        assert torch.allclose(fast[name], plain[name], atol=1e-6, rtol=1e-4), name
    assert any(float(g.abs().max()) > 0 for g in fast.values())


def test_fast_logprobs_match_with_the_adapter_disabled_reference(model):
    """The KL reference (adapter disabled) goes through the same path."""
    mb = group_batch().select(list(range(4)))
    mask = mb.completion_mask.bool()
    with torch.no_grad(), model.disable_adapter():
        want = plain_logprobs(model, mb)
        got = sequence_logprobs(model, mb, tempered_policy=True)
    assert torch.allclose(got[mask], want[mask], atol=1e-5)


def test_ratio_metrics_average_over_the_rows_that_trained(model):
    """Groups with equal rewards (zero advantage) are skipped whole; the ratio metrics are means over the rows
    that did train, so at ratio one (`old_logprobs="current"`) mean_ratio is 1 and approx_kl 0, however many
    groups were skipped (it used to read 0.25 with three of four groups skipped)."""
    batch = group_batch(groups=4, g=4)
    zero = batch.group_index >= 1  # groups 1..3: equal rewards
    batch.rewards[zero] = 1.0
    batch.advantages[zero] = 0.0
    assert bool((batch.advantages[~zero] != 0).any())
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    try:
        metrics = policy_update(
            model, torch.optim.SGD(params, lr=0.0), batch, micro_batch_size=4, max_grad_norm=None,
            old_logprobs="current", aggregation="token",
        )  # fmt: skip
    finally:
        for p, s in zip(params, saved, strict=True):
            p.data.copy_(s)
    assert metrics["mean_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["clip_fraction"] == 0.0
