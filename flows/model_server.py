"""serve-model's HTTP server: MLflow's scoring server for one model, behind limits on every request.

The model's own loader (tasks/tracking/serving.py) checks what needs the model: prompt lengths against its positions,
settings in range, the time limit. This ASGI layer adds what only the server can do: a body past its size is
refused (413) before it is read, and one that has not all arrived within body_timeout_seconds gets 408; JSON that is
malformed or nested too deep, settings the model does not take and settings of the wrong kind or out of range are
refused (400) before MLflow parses them; no more than max_concurrent requests generate at once and max_queue wait
(503 past that), and an error's body is one message, never a stack trace nor the request echoed back. Every line
the server logs (uvicorn's, the access log, MLflow's) goes through the pipeline's redaction. On shutdown,
generations in progress stop at their next token.

uvicorn runs it (`gpt2-pipeline serve-model` execs `uvicorn --factory flows.model_server:create_app`), reading the
model URI and the limits from SERVE_ENV.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from tasks.plumbing.redaction import RedactedStream, redact_output
from tasks.tracking.serving import LIMITS, Limits, RequestError, check_budget, check_settings, prompts_of

SERVE_ENV = "GPT2_PIPELINE_SERVE"  # {"model_uri": ..., "limits": {...}}, set by serve-model for this process
INVOCATIONS = "/invocations"
ERROR_MESSAGE_CHARS = 500

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Refused(Exception):
    def __init__(self, status: int, message: str, error_code: str = "INVALID_PARAMETER_VALUE"):
        super().__init__(message)
        self.status, self.error_code = status, error_code


def depth(value: Any, limit: int) -> int:
    """How deeply value nests (lists and objects), counted without recursion and no further than limit + 1."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list) and level <= limit:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
        elif isinstance(item, dict | list):
            return level
    return deepest


def read_json(body: bytes, limits: Limits, example: str) -> Any:
    """The body's JSON, or Refused (400) when it is not JSON or nests deeper than the limit; example: what to send."""
    deeper = f"request body: JSON nested deeper than {limits.max_json_depth} levels"
    try:
        value = json.loads(body)
    except RecursionError:
        raise Refused(400, deeper) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(400, f"request body: not JSON ({exc}); send {example}") from None
    if depth(value, limits.max_json_depth) > limits.max_json_depth:
        raise Refused(400, deeper)
    return value


def parse_request(body: bytes, limits: Limits, settings: dict[str, Any]) -> None:
    """Refuse a body that is not `{"inputs": ..., "params": {...}}` within the limits.

    Settings: the model's generation settings and their defaults (its signature's params)."""
    request = read_json(body, limits, '{"inputs": [...], "params": {...}}')
    if not isinstance(request, dict) or "inputs" not in request or set(request) - {"inputs", "params"}:
        raise Refused(400, 'request body: must be {"inputs": [prompts], "params": {settings}} and nothing else')
    params = request.get("params")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise Refused(400, 'params: must be an object of generation settings, as {"max_new_tokens": 20}')
    unknown = sorted(set(params) - set(settings))
    if unknown:
        raise Refused(400, f"params: this model does not take {', '.join(unknown)}; it takes {', '.join(settings)}")
    try:
        check_settings(params)
        new_tokens = params.get("max_new_tokens", settings.get("max_new_tokens", LIMITS["max_new_tokens"][1]))
        check_budget(prompts_of(request["inputs"]), new_tokens, limits)
    except RequestError as exc:
        raise Refused(400, str(exc)) from None


def too_large(detail: str) -> Refused:
    return Refused(413, f"request body: {detail} (serve-model --max-body-bytes)", "REQUEST_LIMIT_EXCEEDED")


async def read_body(receive: Receive, limit: int, seconds: float) -> bytes:
    """The request body, refused as soon as it passes limit bytes (413) or seconds (408)."""
    try:
        async with asyncio.timeout(seconds):
            return await _read_within(receive, limit)
    except TimeoutError:
        message = f"request body: not all sent within {seconds:g} s (serve-model --body-timeout)"
        raise Refused(408, message, "DEADLINE_EXCEEDED") from None


async def _read_within(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "request body: the client went away before sending it")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refused(
                413, f"request body: more than {limit:,} bytes (serve-model --max-body-bytes)", "REQUEST_LIMIT_EXCEEDED"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(send: Send, status: int, message: str, error_code: str, headers: list | None = None) -> None:
    body = json.dumps({"error_code": error_code, "message": message[:ERROR_MESSAGE_CHARS]}).encode()
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start_headers + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def one_message(body: bytes) -> tuple[str, str]:
    """MLflow's error body reduced to its error code and the loader's own message.

    No stack trace, and not the request it echoes ("Failed to predict data '...'. Error: <message>")."""
    try:
        error = json.loads(body)
        code, message = str(error.get("error_code", "INTERNAL_ERROR")), str(error.get("message", ""))
    except (ValueError, AttributeError):
        code, message = "INTERNAL_ERROR", body.decode("utf-8", "replace")
    message = message.rpartition("Error: ")[2] if "Failed to predict data" in message else message
    return code, " ".join(message.split()) or "the model could not answer this request"


class Guarded:
    """The limits around an ASGI app (MLflow's scoring server) whose model is `generation`."""

    def __init__(self, app, generation, limits: Limits, settings: dict[str, Any]):
        self.app, self.generation, self.limits, self.settings = app, generation, limits, settings
        self.slots = asyncio.Semaphore(limits.max_concurrent)
        self.admitted = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, self._stopping_on_shutdown(receive), send)
        if scope["type"] != "http" or scope["path"] != INVOCATIONS:
            return await self.app(scope, receive, send)
        if self.admitted >= self.limits.max_concurrent + self.limits.max_queue:
            busy = f"busy: {self.admitted} requests in progress (serve-model --max-concurrent/--max-queue); retry later"
            return await respond(send, 503, busy, "TEMPORARILY_UNAVAILABLE", [(b"retry-after", b"1")])
        self.admitted += 1
        try:
            await self._invoke(scope, receive, send)
        except Refused as refused:
            # The rest of a body that timed out may still come: the connection closes rather than read it as a request.
            close = [(b"connection", b"close")] if refused.status == 408 else []
            await respond(send, refused.status, str(refused), refused.error_code, close)
        except asyncio.CancelledError:  # the server stopped before this request finished: no traceback for it
            with contextlib.suppress(Exception):
                await respond(send, 503, "the server is stopping; retry on another", "TEMPORARILY_UNAVAILABLE")
        finally:
            self.admitted -= 1

    async def _invoke(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise too_large(f"{int(declared):,} bytes, more than {self.limits.max_body_bytes:,}")
        # A request reading its body counts among the admitted, so that bodies in memory are bounded too; a body that
        # does not come in body_timeout_seconds is refused (408), and its turn goes to the next request.
        body = await read_body(receive, self.limits.max_body_bytes, self.limits.body_timeout_seconds)
        parse_request(body, self.limits, self.settings)
        async with self.slots:
            await self.app(scope, self._replay(body), self._one_message_errors(send))

    @staticmethod
    def _replay(body: bytes) -> Receive:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return receive

    @staticmethod
    def _one_message_errors(send: Send) -> Send:
        """send, with an error response's body replaced by one message (see one_message)."""
        status, error = 200, bytearray()

        async def guarded(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status < 400:
                    await send(message)
            elif status < 400:
                await send(message)
            else:  # an error's body, in as many pieces as MLflow's middleware streams it
                error.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    code, text = one_message(bytes(error))
                    await respond(send, status, text, code)

        return guarded

    def _stopping_on_shutdown(self, receive: Receive) -> Receive:
        async def wrapped() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                self.generation.stop()  # generations in worker threads end at their next token
            return message

        return wrapped


def create_app():
    """The app uvicorn serves: the model of SERVE_ENV loaded through its own loader, in MLflow's scoring server."""
    redact_logs()  # before MLflow is imported, so that its handler writes to the redacted stderr too
    from mlflow.pyfunc import load_model, scoring_server

    served = json.loads(os.environ[SERVE_ENV])
    limits = Limits(**served["limits"])
    # MLflow's own request timeout answers 504 a little after the loader's deadline has stopped the generation.
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(int(limits.timeout_seconds) + 10)
    model = load_model(served["model_uri"], model_config=limits.as_config())
    schema = model.metadata.get_params_schema()
    settings = {param.name: param.default for param in (schema.params if schema else [])}
    return Guarded(scoring_server.init(model), model._model_impl, limits, settings)


def redact_logs() -> None:
    """Every line this process prints or logs goes through redaction, also through the handlers uvicorn configured
    before the app was created (they hold the streams they were given, not sys.stderr)."""
    redact_output()
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):  # a placeholder logger has none
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler.stream, RedactedStream):
                handler.setStream(RedactedStream(handler.stream))
