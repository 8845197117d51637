"""The served model's loader and the limits every request meets: MLflow's transformers pyfunc, checked first.

Register ships this file with every model version (the `code/` folder of its MLmodel) and names it the
python_function loader, so any MLflow scoring server refuses, with HTTP 400 and a message naming the problem, a
setting out of range or not finite, a prompt that is not a string, too many prompts or new tokens, and a prompt
longer than the model's positions (measured before it is tokenized); a generation stops at the time limit. The
limits come from the model config (`model_config`, as `mlflow models serve --model-config` or serve-model pass
it). serve-model adds what only the HTTP server can do (flows/model_server.py). It imports nothing of the
pipeline: the served model must load without the project.
"""

from __future__ import annotations

import json
import math
import numbers
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

# name: what a setting must be, as the JSON a caller sends: a whole number, any number, or true/false
KINDS: dict[str, type] = {
    "max_new_tokens": int,
    "do_sample": bool,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "repetition_penalty": float,
}
KIND_WORDS = {int: "a whole number", float: "a number", bool: "true or false"}
# name: (lowest, highest, whether lowest itself is allowed): what transformers' generate accepts, and a cap on a
# request's length. Below 1e-6 a temperature or repetition penalty divides float32 logits into inf, and sampling
# fails on them; top_k as params.yaml bounds it (the largest vocabulary).
LIMITS: dict[str, tuple[float, float, bool]] = {
    "max_new_tokens": (1, 4096, True),
    "temperature": (1e-6, math.inf, True),
    "top_k": (0, 1 << 20, True),
    "top_p": (0, 1, False),
    "repetition_penalty": (1e-6, math.inf, True),
}
SHOWN_CHARS = 40  # of a refused value, in its message


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a served model, and how many run at once.

    serve-model's options default to these; `docs/reliability.md` lists them."""

    max_body_bytes: int = 1 << 20  # a request's body; past it 413, before the body is read
    body_timeout_seconds: float = 10.0  # a request's body must have arrived by then; past it 408
    max_prompts: int = 16  # prompts in one request
    max_total_new_tokens: int = 4096  # prompts x max_new_tokens in one request
    timeout_seconds: float = 30.0  # a generation stops here and the request gets 504
    max_concurrent: int = 2  # requests generating at once
    max_queue: int = 8  # requests waiting for one of those; past them 503
    max_json_depth: int = 8  # nesting of the request's JSON (a request needs 3)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> Limits:
        """The limits named in a model config (unknown keys are the pipeline's inference config, left there)."""
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in (config or {}).items() if key in names})

    def as_config(self) -> dict[str, Any]:
        return asdict(self)


class RequestError(ValueError):
    """A request the served model refuses; its message is the one line the caller gets with HTTP 400."""


def setting_problem(name: str, value: Any) -> str | None:
    """What is wrong with one generation setting (its kind, not finite, out of LIMITS), for the caller, or None.

    Settings not in KINDS are left to the model's signature."""
    kind = KINDS.get(name)
    if kind is None:
        return None
    if not of_kind(value, kind):
        return f"params.{name}: must be {KIND_WORDS[kind]} (got {shown(value)})"
    if kind is bool:
        return None
    if kind is float and not finite(value):
        return f"params.{name}: must be a finite number (got {shown(value)})"
    low, high, low_allowed = LIMITS[name]
    if value < low or value > high or (value == low and not low_allowed):
        bounds = f"{'>=' if low_allowed else '>'} {shown(low)}" + (f" and <= {shown(high)}" if high < math.inf else "")
        return f"params.{name}: must be {bounds} (got {shown(value)})"
    return None


def of_kind(value: Any, kind: type) -> bool:
    """Kinds as JSON has them: true and false are no numbers, 4.9 and 5.0 no whole numbers."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


def check_settings(params: dict[str, Any] | None) -> None:
    """Refuse (RequestError) the first setting of the wrong kind, not finite or out of range."""
    for name, value in (params or {}).items():
        problem = setting_problem(name, value)
        if problem:
            raise RequestError(problem)


def finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past any float (10**400): as a double setting it would be inf
        return False


def shown(value: Any) -> str:
    """A refused value as the caller sent it (JSON; numbers as Python prints them: inf, nan), cut short."""
    try:
        text = str(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else json.dumps(value)
    except (TypeError, ValueError):  # not JSON, or an integer of more digits than Python prints
        text = type(value).__name__
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def prompts_of(inputs: Any) -> list[str]:
    """The request's prompts: a string or a list of strings, anything else refused naming the bad item."""
    if isinstance(inputs, str):
        return [inputs]
    if getattr(inputs, "ndim", 0) == 2 and hasattr(inputs, "iloc"):  # MLflow's schema made a DataFrame of it
        inputs = inputs.iloc[:, 0]
    if hasattr(inputs, "tolist"):  # a pandas Series, a NumPy array
        inputs = inputs.tolist()
    if not isinstance(inputs, list) or not inputs:
        raise RequestError('inputs: must be a prompt or a non-empty list of prompts, as {"inputs": ["ROMEO:"]}')
    for index, item in enumerate(inputs):
        if not isinstance(item, str):
            raise RequestError(f"inputs[{index}]: must be a string (got {type(item).__name__})")
    return inputs


def check_budget(prompts: list[str], max_new_tokens: int, limits: Limits) -> None:
    """How many prompts, and how many new tokens in all, one request may ask for (RequestError past them)."""
    check_settings({"max_new_tokens": max_new_tokens})
    if len(prompts) > limits.max_prompts:
        raise RequestError(f"inputs: {len(prompts)} prompts, more than the {limits.max_prompts} a request may hold")
    if len(prompts) * max_new_tokens > limits.max_total_new_tokens:
        raise RequestError(
            f"params.max_new_tokens: {len(prompts)} prompts x {max_new_tokens} new tokens is more than the "
            f"{limits.max_total_new_tokens} a request may ask for; send fewer prompts or fewer tokens"
        )


class Stopper:
    """A transformers stopping criterion: the generation ends at its deadline, or at once when the server stops."""

    def __init__(self, deadline: float, stopping: threading.Event):
        self.deadline, self.stopping, self.reached = deadline, stopping, False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.reached = self.stopping.is_set() or time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), self.reached, dtype=torch.bool, device=input_ids.device)


class CheckedGeneration:
    """The transformers pyfunc model, refusing a request outside the limits before it generates."""

    def __init__(self, model, limits: Limits | None = None):
        self.model = model
        self.limits = limits or Limits()
        self.stopping = threading.Event()
        pipeline = model.pipeline
        self.positions = pipeline.model.config.n_positions
        self.tokenizer = pipeline.tokenizer
        # No token stands for more characters than its vocabulary entry has (byte-level entries hold a character
        # a byte): a prompt longer than positions x this cannot fit, and is refused before it is tokenized.
        self.longest_token = max(len(token) for token in self.tokenizer.get_vocab())

    def predict(self, data, params: dict[str, Any] | None = None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE

        params = dict(params or {})
        try:
            self.check(prompts_of(data), params)
        except RequestError as problem:
            raise MlflowException(str(problem), error_code=INVALID_PARAMETER_VALUE) from None
        stopper = Stopper(time.monotonic() + self.limits.timeout_seconds, self.stopping)
        params["stopping_criteria"] = [stopper]
        result = self.model.predict(data, params=params)
        if stopper.reached:
            why = "the server is stopping" if self.stopping.is_set() else f"{self.limits.timeout_seconds:g} s passed"
            raise MlflowException(f"generation stopped before it finished: {why}", error_code=DEADLINE_EXCEEDED)
        return result

    def check(self, prompts: list[str], params: dict[str, Any]) -> None:
        check_settings(params)
        new_tokens = params.get("max_new_tokens", LIMITS["max_new_tokens"][1])
        check_budget(prompts, new_tokens, self.limits)
        room = self.positions - new_tokens
        for index, prompt in enumerate(prompts):
            if len(prompt) > self.positions * self.longest_token:  # cannot fit, whatever its tokens
                raise RequestError(self._too_long(index, f"{len(prompt):,} characters", new_tokens))
            tokens = len(self.tokenizer(prompt)["input_ids"])
            if tokens > room:
                raise RequestError(self._too_long(index, f"{tokens:,} tokens", new_tokens))

    def _too_long(self, index: int, size: str, new_tokens: int) -> str:
        return (
            f"inputs[{index}]: {size} and max_new_tokens {new_tokens} do not fit the model's {self.positions} "
            "positions; shorten the prompt or ask for fewer new tokens"
        )

    def stop(self) -> None:
        """End every generation in progress at its next token (the server is shutting down)."""
        self.stopping.set()

    def __getattr__(self, name: str):  # everything else as MLflow's own wrapper has it
        return getattr(self.model, name)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> CheckedGeneration:
    """The python_function loader MLflow calls (the MLmodel's loader_module is this module)."""
    from mlflow import transformers

    limits = Limits.from_config(model_config)
    inference = {key: value for key, value in (model_config or {}).items() if key not in limits.as_config()}
    return CheckedGeneration(transformers._load_pyfunc(path, inference or None), limits)
