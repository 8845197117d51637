"""The serving guard at the function level: what serve-model's server (flows/model_server.py) and the loader shipped
with each model version (tasks/tracking/serving.py) refuse, each with one message, before anything generates."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from flows.model_server import Refused, parse_request, read_body
from tasks.tracking.serving import Limits, RequestError, check_budget, check_settings

# The generation settings a registered version takes, with their defaults (its signature's params).
SETTINGS = {"max_new_tokens": 64, "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
            "repetition_penalty": 1.0}  # fmt: skip
HUGE = 10**400  # a JSON integer past any float

# (setting, value, the one message the caller gets)
REFUSED = [
    *((name, value, f"params.{name}: must be a whole number (got {shown})")
      for name in ("max_new_tokens", "top_k")
      for value, shown in (("abc", '"abc"'), ("5", '"5"'), (None, "null"), ([3], "[3]"), ({}, "{}"),
                           ({"a": 1}, '{"a": 1}'), (True, "true"), (False, "false"), (4.9, "4.9"), (5.0, "5.0"),
                           (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"))),
    *((name, value, f"params.{name}: must be a number (got {shown})")
      for name in ("temperature", "top_p", "repetition_penalty")
      for value, shown in (("abc", '"abc"'), ("0.5", '"0.5"'), (None, "null"), ([0.5], "[0.5]"), ({}, "{}"),
                           (True, "true"), (False, "false"))),
    *((name, value, f"params.{name}: must be a finite number (got {shown})")
      for name in ("temperature", "top_p", "repetition_penalty")
      for value, shown in ((math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"),
                           (HUGE, "1" + "0" * 36 + "..."))),
    *(("do_sample", value, f"params.do_sample: must be true or false (got {shown})")
      for value, shown in ((1, "1"), (0, "0"), (0.0, "0.0"), ("true", '"true"'), (None, "null"), ([True], "[true]"),
                           ({}, "{}"), (math.nan, "nan"))),
    ("max_new_tokens", 0, "params.max_new_tokens: must be >= 1 and <= 4096 (got 0)"),
    ("max_new_tokens", -3, "params.max_new_tokens: must be >= 1 and <= 4096 (got -3)"),
    ("max_new_tokens", 4097, "params.max_new_tokens: must be >= 1 and <= 4096 (got 4097)"),
    ("max_new_tokens", HUGE, "params.max_new_tokens: must be >= 1 and <= 4096 (got 1" + "0" * 36 + "...)"),
    ("top_k", -1, "params.top_k: must be >= 0 and <= 1048576 (got -1)"),
    ("top_k", 1048577, "params.top_k: must be >= 0 and <= 1048576 (got 1048577)"),
    ("top_p", 0.0, "params.top_p: must be > 0 and <= 1 (got 0.0)"),
    ("top_p", -0.1, "params.top_p: must be > 0 and <= 1 (got -0.1)"),
    ("top_p", 2, "params.top_p: must be > 0 and <= 1 (got 2)"),
    # Below 1e-6 sampling divides the logits into inf and fails inside transformers' generate.
    ("temperature", 0.0, "params.temperature: must be >= 1e-06 (got 0.0)"),
    ("temperature", -1, "params.temperature: must be >= 1e-06 (got -1)"),
    ("temperature", 1e-300, "params.temperature: must be >= 1e-06 (got 1e-300)"),
    ("repetition_penalty", 0, "params.repetition_penalty: must be >= 1e-06 (got 0)"),
    ("repetition_penalty", -0.5, "params.repetition_penalty: must be >= 1e-06 (got -0.5)"),
]  # fmt: skip

ACCEPTED = [
    ("max_new_tokens", 1), ("max_new_tokens", 4096), ("top_k", 0), ("top_k", 50), ("top_k", 1048576),
    ("temperature", 1e-6), ("temperature", 0.8), ("temperature", 2), ("temperature", 1e308),
    ("top_p", 1e-9), ("top_p", 0.5), ("top_p", 1), ("repetition_penalty", 1e-6), ("repetition_penalty", 1.3),
    ("repetition_penalty", 10), ("do_sample", True), ("do_sample", False),
]  # fmt: skip


def body(inputs=("a",), **params) -> bytes:
    return json.dumps({"inputs": list(inputs), "params": params}).encode()  # nan and inf as NaN and Infinity


def refusal(request: bytes, limits: Limits | None = None) -> tuple[int, str] | None:
    try:
        parse_request(request, limits or Limits(), SETTINGS)
    except Refused as refused:
        return refused.status, str(refused)
    return None


@pytest.mark.parametrize(("name", "value", "message"), REFUSED)
def test_a_setting_of_the_wrong_kind_or_out_of_range_is_refused_with_one_message(name, value, message):
    """The server answers 400 before MLflow sees the request, and the loader refuses it alike (any MLflow server)."""
    assert refusal(body(**{name: value})) == (400, message)
    with pytest.raises(RequestError) as refused:
        check_settings({name: value})
    assert str(refused.value) == message


@pytest.mark.parametrize(("name", "value"), ACCEPTED)
def test_a_setting_of_the_right_kind_within_range_is_accepted(name, value):
    assert refusal(body(**{name: value})) is None
    check_settings({name: value})


@pytest.mark.parametrize(
    ("max_new_tokens", "message"),
    [
        (None, "params.max_new_tokens: must be a whole number (got null)"),
        ("64", 'params.max_new_tokens: must be a whole number (got "64")'),
        (True, "params.max_new_tokens: must be a whole number (got true)"),
        (4.9, "params.max_new_tokens: must be a whole number (got 4.9)"),
        (0, "params.max_new_tokens: must be >= 1 and <= 4096 (got 0)"),
        (300, "params.max_new_tokens: 16 prompts x 300 new tokens is more than the 4096 a request may ask for; "
         "send fewer prompts or fewer tokens"),
    ],
)  # fmt: skip
def test_the_budget_refuses_new_tokens_of_the_wrong_kind(max_new_tokens, message):
    """check_budget, as the loader calls it with a request's max_new_tokens, never fails with a TypeError."""
    with pytest.raises(RequestError) as refused:
        check_budget(["a"] * 16, max_new_tokens, Limits())
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (b'{"inputs": ["a"], "params": []}', 'params: must be an object of generation settings, as {"max_new_tokens"'),
        (b'{"inputs": ["a"], "params": 0}', "params: must be an object of generation settings"),
        (b'{"inputs": ["a"], "params": "max_new_tokens=5"}', "params: must be an object of generation settings"),
        (b'{"inputs": ["a"], "params": {"max_new_tokens": NaN}}', "params.max_new_tokens: must be a whole number "
         "(got nan)"),
        (b'{"inputs": ["a"], "params": {"temperature": 1e999}}', "params.temperature: must be a finite number "
         "(got inf)"),
        (b'{"inputs": ["a"], "params": {"num_beams": 4}}', "params: this model does not take num_beams; it takes "
         "max_new_tokens, do_sample"),
        (b'{"inputs": [3]}', "inputs[0]: must be a string (got int)"),
        (b'{"inputs": "a", "extra": 1}', 'request body: must be {"inputs": [prompts], "params": {settings}}'),
        (b'\xff', "request body: not JSON"),
        (body(["a"] * 17, max_new_tokens=1), "inputs: 17 prompts, more than the 16 a request may hold"),
    ],
)  # fmt: skip
def test_a_request_of_the_wrong_shape_is_refused_with_one_message(request_body, message):
    status, text = refusal(request_body)
    assert status == 400 and text.startswith(message)


@pytest.mark.parametrize(
    "request_body",
    [b'{"inputs": ["a"]}', b'{"inputs": "a", "params": null}', b'{"inputs": ["a"], "params": {}}',
     body(["a", "b"], max_new_tokens=2048, do_sample=False, temperature=1, top_k=0, top_p=1, repetition_penalty=1.2)],
)  # fmt: skip
def test_a_request_within_the_limits_is_accepted(request_body):
    assert refusal(request_body) is None


def receiving(*chunks: bytes, then_wait: bool = False):
    """An ASGI receive that sends the body in chunks, then (then_wait) waits for more that never comes."""
    messages = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks]

    async def receive():
        if messages:
            return messages.pop(0)
        if then_wait:
            await asyncio.Event().wait()  # a client that sent its headers, then goes quiet
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive


def read(receive, limit: int = 1024, seconds: float = 0.05) -> bytes | tuple[int, str, str]:
    try:
        return asyncio.run(read_body(receive, limit, seconds))
    except Refused as refused:
        return refused.status, str(refused), refused.error_code


def test_a_body_that_does_not_arrive_in_time_is_refused_with_408():
    assert read(receiving(b"{", b'"inputs"', then_wait=True)) == (
        408, "request body: not all sent within 0.05 s (serve-model --body-timeout)", "DEADLINE_EXCEEDED"
    )  # fmt: skip
    assert read(receiving(then_wait=True), seconds=0.001)[0] == 408
    assert read(receiving(b'{"inputs": ', b'["a"]}')) == b'{"inputs": ["a"]}'
    assert read(receiving(b"x" * 600, b"x" * 600))[0] == 413
