"""McNemar's exact test and paired before/after comparisons, against hand-computed values."""

from __future__ import annotations

import pytest

from mlpo_agents.report import mcnemar_exact, paired_comparison


def test_mcnemar_exact_hand_computed() -> None:
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(3, 3) == 1.0  # the two-sided tail exceeds 1 and is clipped
    assert mcnemar_exact(0, 0) == 1.0


def test_paired_comparison_counts_only_shared_questions() -> None:
    before = {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0, "only-before": 1.0}
    after = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0, "only-after": 0.0}
    paired = paired_comparison(before, after)
    assert (paired.n, paired.gained, paired.lost) == (4, 2, 1)
    assert paired.before == 0.5 and paired.after == 0.75
    assert paired.p_value == pytest.approx(mcnemar_exact(2, 1))
