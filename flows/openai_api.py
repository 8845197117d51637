"""The OpenAI completions API of the serving engine: a request checked into rows, answers and errors in OpenAI's shapes.

No I/O here: flows/completions.py reads the body within its limits and runs the rows; this says what a request asks
for, refuses what it may not ask with one message (HTTP 400, naming the field, as OpenAI's own errors do), and
writes the response, the stream's chunks and the usage counts.
"""

from __future__ import annotations

import json
import numbers
import secrets
import time
from dataclasses import dataclass
from typing import Any

from flows.batch_generation import Row
from flows.model_server import Refused, read_json
from tasks.tracking.serving import Limits, finite, of_kind, shown

COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
MAX_STOPS = 4  # stop strings in one request, as OpenAI allows
MAX_STOP_CHARS = 64
# What OpenAI's completions API takes that changes the output and this server does not do: refused, not ignored.
# name: the values that leave the output as it is (accepted).
NOT_DONE: dict[str, tuple[Any, ...]] = {
    "logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None,),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
}
TAKEN = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "user",
}
# name: (kind, lowest, highest, default); OpenAI's defaults (max_tokens 16; temperature 1: it samples unless told)
NUMBERS: dict[str, tuple[type, float, float, float | None]] = {
    "max_tokens": (int, 1, 4096, 16),
    "temperature": (float, 0.0, 2.0, 1.0),
    "top_p": (float, 1e-6, 1.0, 1.0),
    "n": (int, 1, 128, 1),
    "seed": (int, -(1 << 63), (1 << 63) - 1, None),
}


class ApiError(Refused):
    """A refusal in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        super().__init__(status, message, code or kind)
        self.param, self.kind = param, kind

    def body(self) -> bytes:
        error = {"message": str(self)[:500], "type": self.kind, "param": self.param, "code": self.error_code}
        return json.dumps({"error": error}).encode()


@dataclass
class Completion:
    """What one request asks for: its prompts, each continued n times, and how."""

    model: str
    prompts: list[str]
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    seed: int | None


def parse(body: bytes, limits: Limits) -> Completion:
    """The request, or ApiError (400) naming the first field that is missing, of the wrong kind or out of range."""
    try:
        request = read_json(body, limits, '{"model": ..., "prompt": ...}')
    except Refused as refused:
        raise ApiError(refused.status, str(refused)) from None
    if not isinstance(request, dict):
        raise ApiError(400, 'request body: must be an object, as {"model": "gpt2-lm", "prompt": "ROMEO:"}')
    for name in request:
        if name in NOT_DONE and request[name] not in NOT_DONE[name]:
            raise ApiError(400, f"{name}: not supported by this server; leave it out", name)
        if name not in TAKEN and name not in NOT_DONE:
            raise ApiError(400, f"{name}: not a completions parameter; it takes {', '.join(sorted(TAKEN))}", name)
    model = request.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model: must be the served model's name (GET /v1/models lists it)", "model")
    numbers_ = {name: number(request, name) for name in NUMBERS}
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream: must be true or false (got {shown(stream)})", "stream")
    options = request.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, 'stream_options: must be {"include_usage": true|false}', "stream_options")
    prompts = prompts_of(request.get("prompt"))
    completion = Completion(
        model,
        prompts,
        stop=stops_of(request.get("stop")),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        **numbers_,
    )
    budget(completion, limits)
    return completion


def number(request: dict[str, Any], name: str):
    kind, low, high, default = NUMBERS[name]
    value = request.get(name)
    if value is None:
        return default
    words = "a whole number" if kind is int else "a number"
    if not of_kind(value, kind):
        raise ApiError(400, f"{name}: must be {words} (got {shown(value)})", name)
    if (kind is float and not finite(value)) or not low <= value <= high:
        raise ApiError(400, f"{name}: must be from {low:g} to {high:g} (got {shown(value)})", name)
    return value


def prompts_of(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(item, numbers.Integral) for item in prompt):
        raise ApiError(400, "prompt: token ids are not taken; send the text", "prompt")
    raise ApiError(400, "prompt: must be a string or a non-empty list of strings", "prompt")


def stops_of(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (
        not isinstance(stops, list)
        or not all(isinstance(item, str) and 0 < len(item) <= MAX_STOP_CHARS for item in stops)
        or len(stops) > MAX_STOPS
    ):
        raise ApiError(
            400, f"stop: must be a string or up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters", "stop"
        )
    return tuple(stops)


def budget(completion: Completion, limits: Limits) -> None:
    """How many completions and new tokens one request may ask for."""
    rows, most = len(completion.prompts) * completion.n, min(limits.max_prompts, limits.max_concurrent)
    if rows > most:  # a request's rows run in one batch
        raise ApiError(
            400,
            f"prompt: {len(completion.prompts)} prompts x n {completion.n} completions is more than "
            f"the {most} a request may ask for (serve-model --max-prompts, --max-concurrent)",
            "n",
        )
    if rows * completion.max_tokens > limits.max_total_new_tokens:
        raise ApiError(
            400,
            f"max_tokens: {rows} completions x {completion.max_tokens} tokens is more than the "
            f"{limits.max_total_new_tokens} a request may ask for (serve-model --max-total-new-tokens)",
            "max_tokens",
        )


def rows_of(completion: Completion, tokenizer, positions: int, deadline: float) -> list[Row]:
    """The rows one request runs as (prompt by prompt, n each), a prompt past the model's positions refused."""
    rows = []
    for index, prompt in enumerate(completion.prompts):
        ids = tokenizer(prompt)["input_ids"] or [tokenizer.eos_token_id]  # an empty prompt starts from end-of-text
        if len(ids) + completion.max_tokens > positions:
            raise ApiError(
                400,
                f"prompt[{index}]: {len(ids):,} tokens and max_tokens {completion.max_tokens} do not "
                f"fit the model's {positions} positions; shorten it or ask for fewer",
                "prompt",
            )
        for copy in range(completion.n):
            seed = None if completion.seed is None else completion.seed + copy
            rows.append(
                Row(
                    ids,
                    completion.max_tokens,
                    completion.temperature,
                    completion.top_p,
                    seed,
                    completion.stop,
                    deadline,
                    stream=completion.stream,
                )
            )
    return rows


def usage(rows: list[Row], n: int) -> dict[str, int]:
    """OpenAI's counts: each prompt's tokens once, every completion's tokens."""
    prompt = sum(len(row.prompt_ids) for row in rows[::n])
    completion = sum(len(row.tokens) for row in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def new_id() -> str:
    return f"cmpl-{secrets.token_hex(12)}"


def answer(request_id: str, model: str, rows: list[Row], n: int) -> dict[str, Any]:
    choices = [
        {"index": index, "text": row.text, "finish_reason": row.finish_reason, "logprobs": None}
        for index, row in enumerate(rows)
    ]
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(rows, n),
    }


def chunk(request_id: str, model: str, choices: list[dict[str, Any]], usage_: dict | None = None) -> bytes:
    """One server-sent event of a streamed completion."""
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
