"""The served model's checks on a request's generation settings (tasks/tracking/serving.py, shipped with each
version)."""

from __future__ import annotations

import pytest

from tasks.tracking.serving import out_of_range


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"max_new_tokens": 1, "top_p": 1.0, "top_k": 0, "temperature": 0.01, "do_sample": True}, None),
        ({"max_new_tokens": 0}, "params.max_new_tokens: must be >= 1 and <= 4096 (got 0)"),
        ({"max_new_tokens": 4097}, "params.max_new_tokens: must be >= 1 and <= 4096 (got 4097)"),
        ({"temperature": 0.0}, "params.temperature: must be > 0 (got 0.0)"),
        ({"top_p": 0.0}, "params.top_p: must be > 0 and <= 1 (got 0.0)"),
        ({"top_k": -1}, "params.top_k: must be >= 0 (got -1)"),
        ({"repetition_penalty": -0.5}, "params.repetition_penalty: must be > 0 (got -0.5)"),
        ({"temperature": float("inf")}, "params.temperature: must be a finite number (got inf)"),
        ({"top_p": float("nan")}, "params.top_p: must be a finite number (got nan)"),
        (None, None),
    ],
)
def test_out_of_range_names_the_setting_and_its_limits(params, problem):
    assert out_of_range(params) == problem
