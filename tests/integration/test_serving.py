"""`gpt2-pipeline serve-model`: @champion behind OpenAI's completions API, requests batched by Ray Serve, on a real
Ray of its own. One server for the module; the registry holds the trained version 1 and a larger, untrained
version 2 (slower, and with other outputs), and a test that moves @champion puts it back before it ends."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import BIN, greedy_alone, mlflow_on, store_client, tool_env, trained_copy
from tests.servers import LOOPBACK, free_port, process, wait_http

BODY_TIMEOUT = 1.0
ROWS, QUEUE = 8, 8  # serve-model --max-concurrent (rows in a batch) and --max-queue (requests waiting)


def make_version_2(project: Path, scratch: Path) -> None:
    """Version 2 of gpt2-lm: version 1's layout and tokenizer with a larger GPT-2 of random weights (1,024
    positions, so a long generation takes seconds)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with mlflow_on(f"sqlite:///{project}/mlflow.db") as mlflow:
        local = Path(mlflow.artifacts.download_artifacts("models:/gpt2-lm/1", dst_path=str(scratch)))
        torch.manual_seed(2)
        eos = json.loads((local / "model/config.json").read_text())["eos_token_id"]
        config = GPT2Config(
            vocab_size=512, n_layer=4, n_head=4, n_embd=256, n_positions=1024, bos_token_id=eos, eos_token_id=eos
        )
        for stale in (local / "model").iterdir():
            stale.unlink()
        GPT2LMHeadModel(config).save_pretrained(local / "model")
        client = store_client(project)
        run = client.create_run(client.get_experiment_by_name("gpt2-pipeline").experiment_id)
        client.log_artifacts(run.info.run_id, str(local), "larger")
        client.set_terminated(run.info.run_id)
        client.create_model_version("gpt2-lm", f"runs:/{run.info.run_id}/larger", run_id=run.info.run_id)


@pytest.fixture(scope="module")
def served(golden, tmp_path_factory):
    """(project, base URL, the server process, its log) of `gpt2-pipeline serve-model` on @champion (version 1)."""
    folder = tmp_path_factory.mktemp("serving")
    project = trained_copy(golden, folder)
    make_version_2(project, folder / "v2")
    store_client(project).set_registered_model_alias("gpt2-lm", "champion", "1")
    port = free_port()
    command = [
        str(BIN / "gpt2-pipeline"),
        "serve-model",
        "--port",
        str(port),
        "--max-concurrent",
        str(ROWS),
        "--max-queue",
        str(QUEUE),
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--follow",
        "0.5",
    ]
    log = folder / "serve.log"
    with process(command, log, tool_env(), cwd=project, background=True) as server:  # SIGTERM must still stop it
        base = f"http://{LOOPBACK}:{port}"
        wait_http(f"{base}/health", server, log, timeout=180)
        children = server_tree(server.pid)
        yield project, base, server, log
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0, log.read_text()[-3000:]
    assert [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE] == []
    assert "Traceback" not in log.read_text()


def server_tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def expected(project: Path, version: str, prompt: str, new: int) -> str:
    """What transformers' greedy generate writes after prompt alone, with the version's weights."""
    if version not in CACHE:
        CACHE[version] = loaded(project, version)
    model, tokenizer = CACHE[version]
    return tokenizer.decode(greedy_alone(model, tokenizer, prompt, new), skip_special_tokens=True)


CACHE: dict[str, tuple] = {}  # version: (model, tokenizer)


def loaded(project: Path, version: str) -> tuple:
    import tempfile

    from transformers import AutoTokenizer, GPT2LMHeadModel

    with mlflow_on(f"sqlite:///{project}/mlflow.db") as mlflow, tempfile.TemporaryDirectory() as scratch:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/gpt2-lm/{version}", dst_path=scratch))
        model = GPT2LMHeadModel.from_pretrained(local / "model").eval()
        return model, AutoTokenizer.from_pretrained(local / "components/tokenizer")


def move_champion(project: Path, base: str, version: str) -> None:
    """@champion to version, and wait until the server says it serves it."""
    store_client(project).set_registered_model_alias("gpt2-lm", "champion", version)
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/health", timeout=10).json()["version"] != version:
        assert time.monotonic() < deadline, f"the server did not switch to version {version}"
        time.sleep(0.2)


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_the_openai_client_completes_streams_and_lists_the_served_version(served):
    import openai

    project, base, _, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-checked", max_retries=0, timeout=60)
    models = client.models.list()
    assert [model.id for model in models.data] == ["gpt2-lm"] and models.data[0].version == "1"
    raw = client.completions.with_raw_response.create(
        model="gpt2-lm", prompt=["ROMEO:", "JULIET:\nO"], max_tokens=12, temperature=0, n=2
    )
    completion = raw.parse()
    assert raw.headers["x-model-version"] == "1" and completion.model == "gpt2-lm/1"
    texts = [choice.text for choice in completion.choices]
    assert [choice.index for choice in completion.choices] == [0, 1, 2, 3]
    assert texts == [expected(project, "1", "ROMEO:", 12)] * 2 + [expected(project, "1", "JULIET:\nO", 12)] * 2
    assert completion.usage.completion_tokens == sum(len(CACHE["1"][1](text)["input_ids"]) for text in texts)
    assert completion.usage.prompt_tokens == len(CACHE["1"][1]("ROMEO:")["input_ids"]) + len(
        CACHE["1"][1]("JULIET:\nO")["input_ids"]
    )
    stream = client.completions.create(
        model="gpt2-lm",
        prompt="ROMEO:",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [choice.text for chunk in chunks for choice in chunk.choices]
    assert len([piece for piece in pieces if piece]) > 1 and "".join(pieces) == texts[0]  # token by token
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens // 4
    sampled = [
        client.completions.create(model="gpt2-lm", prompt="ROMEO:", max_tokens=16, seed=seed, temperature=1)
        .choices[0]
        .text
        for seed in (5, 5, 6)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4", prompt="ROMEO:", max_tokens=4)
    assert unknown.value.code == "model_not_found" and "'gpt-4' is not served here" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="gpt2-lm", prompt="ROMEO:", max_tokens=4, temperature=7)
    assert bad.value.param == "temperature" and "temperature: must be from 0 to 2 (got 7)" in bad.value.message


def test_requests_batched_together_get_what_each_gets_alone(served):
    """Eight requests at once, prompts of different lengths and different max_tokens: they share batches (the
    batch-size histogram has a batch of several rows) and each answer is transformers' greedy output alone."""
    project, base, _, _ = served
    asked = [
        (prompt, new)
        for prompt in ("ROMEO:", "First Citizen:\nBefore we proceed", "K", "JULIET:\nO Romeo")
        for new in (6, 17)
    ]
    rows_before, batches_before = metric(base, "gpt2_serve_batch_rows_sum"), metric(base, "gpt2_serve_batch_rows_count")
    start, answers = threading.Barrier(len(asked)), {}

    def ask(prompt: str, new: int) -> None:
        start.wait()
        body = {"model": "gpt2-lm", "prompt": prompt, "max_tokens": new, "temperature": 0}
        answers[prompt, new] = httpx.post(f"{base}/v1/completions", json=body, timeout=60)

    threads = [threading.Thread(target=ask, args=pair) for pair in asked]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = metric(base, "gpt2_serve_batch_rows_sum") - rows_before
    batches = metric(base, "gpt2_serve_batch_rows_count") - batches_before
    assert rows == len(asked) and batches < len(asked)  # some batch held more than one request
    for (prompt, new), response in answers.items():
        assert response.status_code == 200, response.text
        version = response.headers["x-model-version"]
        assert response.json()["choices"][0]["text"] == expected(project, version, prompt, new), (prompt, new)


def test_every_bound_holds_with_one_message_in_openais_shape(served):
    _, base, _, _ = served
    url = f"{base}/v1/completions"

    def post(raw: bytes) -> httpx.Response:
        return httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60)

    too_big = post(b'{"model": "gpt2-lm", "prompt": "' + b"a" * (2 << 20) + b'"}')
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    refused = {
        b'{"model": "gpt2-lm", "prompt": "a", "max_tokens": 4.5}': "max_tokens: must be a whole number (got 4.5)",
        b'{"model": "gpt2-lm", "prompt": "a", "top_p": "high"}': 'top_p: must be a number (got "high")',
        b'{"model": "gpt2-lm", "prompt": [1, 2]}': "prompt: token ids are not taken; send the text",
        b'{"model": "gpt2-lm", "prompt": "a", "echo": true}': "echo: not supported by this server; leave it out",
        b'{"model": "gpt2-lm", "prompt": "a", "n": 9}': "prompt: 1 prompts x n 9 completions is more than the 8",
        b'{"model": "gpt2-lm", "prompt": "a", "max_tokens": 64}': "prompt[0]: 1 tokens and max_tokens 64 do not fit",
        b'{"model": "gpt2-lm", "prompt": "a", "stream": "yes"}': 'stream: must be true or false (got "yes")',
        b"[[[[[[[[[[[[1]]]]]]]]]]]]": "request body: JSON nested deeper than 8 levels",
        b"{not json": "request body: not JSON",
    }
    for raw, message in refused.items():
        response = post(raw)
        assert response.status_code == 400 and response.json()["error"]["message"].startswith(message), response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    old_api = httpx.post(f"{base}/invocations", json={"inputs": ["a"]}, timeout=30)
    assert old_api.status_code == 404 and "POST /v1/completions" in old_api.json()["error"]["message"]
    assert "serve-model --api mlflow" in old_api.json()["error"]["message"]
    headers_only = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n{"
    ).encode()
    slow = [
        socket.create_connection((base.split("//")[1].split(":")[0], int(base.rsplit(":", 1)[1])))
        for _ in range(ROWS + QUEUE)
    ]
    try:
        for connection in slow:  # each request still sending its body holds its turn
            connection.sendall(headers_only)
        deadline = time.monotonic() + 30
        while (busy := post(b'{"model": "gpt2-lm", "prompt": "a", "max_tokens": 1}')).status_code != 503:
            assert time.monotonic() < deadline, busy.text
        answers = [everything(connection) for connection in slow]  # ... until --body-timeout, then 408
    finally:
        for connection in slow:
            connection.close()
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "server_busy"
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "deadline_exceeded"' in answer, answer[:300]
    after = post(b'{"model": "gpt2-lm", "prompt": "a", "max_tokens": 1}')
    assert after.status_code == 200, after.text  # the turns they held went to the next requests


def everything(connection: socket.socket) -> bytes:
    connection.settimeout(10 * BODY_TIMEOUT + 30)
    received = b""
    while chunk := connection.recv(4096):
        received += chunk
        if b"\r\n\r\n" in received and b"}" in received.partition(b"\r\n\r\n")[2]:
            break
    return received


def test_a_client_gone_mid_stream_frees_its_turn_and_its_row_stops(served):
    """On version 2 (1,000 new tokens take seconds): the stream is closed after its first tokens; the server's count
    of requests in progress falls to zero at once and the row stops far short of what it asked for."""
    project, base, _, _ = served
    move_champion(project, base, "2")
    try:
        tokens_before = metric(base, "gpt2_serve_generated_tokens_total")
        body = {"model": "gpt2-lm", "prompt": "ROMEO:", "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{base}/v1/completions", json=body) as stream:
            assert stream.status_code == 200 and stream.headers["x-model-version"] == "2"
            first = next(line for line in stream.iter_lines() if line.startswith("data: {"))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        gone = time.monotonic()
        while metric(base, "gpt2_serve_in_flight") != 0:
            assert time.monotonic() - gone < 2, "the turn of a client gone was not freed"
            time.sleep(0.05)
        while metric(base, "gpt2_serve_generated_tokens_total") == tokens_before:  # counted when its batch ends
            assert time.monotonic() - gone < 30
            time.sleep(0.05)
        assert metric(base, "gpt2_serve_generated_tokens_total") - tokens_before < 500
    finally:
        move_champion(project, base, "1")


def test_moving_the_champion_under_load_switches_between_batches_and_fails_no_request(served):
    """Four clients ask without pause while @champion moves from 1 to 2: every request is answered, each by one
    version whose name it carries and whose greedy output it is, and once one answer came from version 2, every
    request sent after it is answered by version 2."""
    project, base, _, _ = served
    answers, stop = [], threading.Event()

    def client(number: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                response = http.post(
                    f"{base}/v1/completions",
                    json={"model": "gpt2-lm", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0},
                )
                answers.append((sent, time.monotonic(), response))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        move_champion(project, base, "2")
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        move_champion(project, base, "1")
    assert [response.status_code for _, _, response in answers] == [200] * len(answers)
    versions = [response.headers["x-model-version"] for _, _, response in answers]
    assert {"1", "2"} <= set(versions)
    texts = {version: expected(project, version, "ROMEO:", 8) for version in ("1", "2")}
    assert texts["1"] != texts["2"]
    for _, _, response in answers:
        version = response.headers["x-model-version"]
        assert response.json()["model"] == f"gpt2-lm/{version}"
        assert response.json()["choices"][0]["text"] == texts[version]
    first_new = min(done for _, done, response in answers if response.headers["x-model-version"] == "2")
    assert {response.headers["x-model-version"] for sent, _, response in answers if sent > first_new} == {"2"}
