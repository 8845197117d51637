"""Promotion's decision at its threshold: promote.min_improvement is a fraction of the champion's bits per byte."""

from __future__ import annotations

import pytest

from tasks.promote import decide


@pytest.mark.parametrize(
    ("challenger", "champion", "min_improvement", "promoted"),
    [
        (0.9901, 1.0, 0.01, False),  # 0.99% better: just under the 1% asked
        (0.9899, 1.0, 0.01, True),  # 1.01% better: just over
        (1.0, 1.0, 0.01, False),  # equal scores never pass a positive threshold
        (1.2, 1.0, 0.01, False),  # worse
        (1.0, 1.0, 0.0, True),  # with no threshold, equal is enough
        (5.0, None, 0.01, True),  # no champion yet: the first challenger wins whatever its score
    ],
)
def test_decide_at_the_threshold(challenger, champion, min_improvement, promoted):
    decision, reason = decide(challenger, champion, min_improvement)
    assert decision is promoted
    if champion is None:
        assert reason == "no champion yet"
    else:
        gain = (champion - challenger) / champion
        change = f"{gain:.2%} fewer" if gain >= 0 else f"{-gain:.2%} more"
        assert reason.startswith(f"{change} bits per byte than the champion")
        assert reason.endswith(f"promotion needs {min_improvement:.2%} fewer" + (")" if promoted else ""))


def test_a_worse_challenger_is_said_to_have_more_bits_per_byte():
    assert decide(1.3371, 1.0, 0.01) == (
        False,
        "33.71% more bits per byte than the champion; promotion needs 1.00% fewer",
    )
