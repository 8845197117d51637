"""Serving under load: closed-loop clients against MLflow's scoring server (serve-model --api mlflow), the batched
OpenAI server (serve-model) and a bare transformers generate loop over batches of the same size, on the same model.

Each client sends a request, waits for its answer, sends the next, for --seconds at each level of clients; prompts
are lines of the bundled corpus (different lengths), max_tokens --tokens, greedy. Reported: answers/s, generated
tokens/s, p50 and p99 latency of the answered requests, the refusals (503 over the queue limit) and any other error;
for the batched server also the time to the first streamed token (a second pass with "stream": true). Tokens: the
OpenAI server's usage counts; MLflow's answers retokenized (it returns text); the bare loop's own counts. Two more
rows at the top level: the bare loop on one torch thread (a replica's share here) and the batched server asked for
one token a request (what its HTTP path carries alone).
Run: python bench/serving.py [--model models:/gpt2-lm/1] [--clients 1,8,32] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import ROOT, add_save_option, machine, save
from tests.servers import free_port

BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Load:
    """What every client sends: these prompts in turn, greedily, `new` tokens a request, for `seconds` a level."""

    texts: list[str]
    new: int
    seconds: float


def prompts(model_dir: Path, tokenizer_dir: Path, new: int, count: int = 64) -> list[str]:
    """Opening lines of the corpus's speeches (a few to a few dozen tokens) that the model, given each alone,
    continues greedily for `new` tokens before any end-of-text: every answer then carries `new` tokens whichever
    server writes it (in a batch a near tie may rarely flip a token; the table's tokens/s counts what was written)."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    speeches = (ROOT / "data/samples/tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")
    chosen = []
    for index, speech in enumerate(speeches):
        text = speech[: 20 + (index * 37) % 120]
        inputs = tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        if tokenizer.eos_token_id not in out[0, inputs["input_ids"].shape[1] :].tolist():
            chosen.append(text)
        if len(chosen) == count:
            return chosen
    raise SystemExit(f"only {len(chosen)} lines of the corpus run {new} tokens without end-of-text: ask fewer --tokens")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


class Server:
    """serve-model in the project, on a free port, until the block ends (SIGTERM, then its whole group)."""

    def __init__(self, api: str, model: str, extra: list[str]):
        self.port = free_port()
        self.command = [
            str(BIN / "gpt2-pipeline"),
            "serve-model",
            "--api",
            api,
            "--model",
            model,
            "--port",
            str(self.port),
            *extra,
        ]
        self.health = f"http://{LOOPBACK}:{self.port}/" + ("health" if api == "openai" else "ping")

    def __enter__(self) -> Server:
        import httpx

        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"{' '.join(self.command)} exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(self.health, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.health} did not answer in 180 s")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()


async def closed_loop(send, load: Load, clients: int) -> dict:
    """`clients` loops of send(prompt) -> (status, tokens, first_token_seconds | None) for the load's seconds."""
    texts, latencies, firsts, tokens, codes = load.texts, [], [], 0, {}
    stop_at = time.monotonic() + load.seconds

    async def client(number: int) -> None:
        nonlocal tokens
        turn = number
        while time.monotonic() < stop_at:
            started = time.monotonic()
            status, count, first = await send(texts[turn % len(texts)])
            turn += clients
            codes[status] = codes.get(status, 0) + 1
            if status == 200:
                latencies.append(time.monotonic() - started)
                tokens += count
                if first is not None:
                    firsts.append(first - started)

    began = time.monotonic()
    await asyncio.gather(*(client(number) for number in range(clients)))
    return summary(clients, time.monotonic() - began, latencies, tokens, firsts, codes)


def summary(
    clients: int, elapsed: float, latencies: list[float], tokens: int, firsts: list[float], codes: dict
) -> dict:
    """One row of the table: what `clients` at once got in `elapsed` seconds (codes: HTTP status -> count)."""
    return {
        "clients": clients,
        "seconds": elapsed,
        "answers": len(latencies),
        "requests_s": len(latencies) / elapsed,
        "tokens_s": tokens / elapsed,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "first_token_p50": percentile(firsts, 0.5) if firsts else None,
        "refused": codes.get(503, 0),
        "errors": sum(count for code, count in codes.items() if code not in (200, 503)),
    }


async def against_mlflow(port: int, tokenizer, load: Load, clients: int) -> dict:
    import httpx

    url = f"http://{LOOPBACK}:{port}/invocations"
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:

        async def send(prompt: str):
            body = {"inputs": [prompt], "params": {"max_new_tokens": load.new, "do_sample": False}}
            response = await http.post(url, json=body)
            if response.status_code != 200:
                return response.status_code, 0, None
            text = response.json()["predictions"][0]
            return 200, max(len(tokenizer(text)["input_ids"]) - len(tokenizer(prompt)["input_ids"]), 0), None

        return await closed_loop(send, load, clients)


async def against_openai(port: int, model: str, load: Load, clients: int, stream: bool = False) -> dict:
    import httpx

    url = f"http://{LOOPBACK}:{port}/v1/completions"
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:

        async def send(prompt: str):
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": load.new,
                "temperature": 0,
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
            }
            if not stream:
                response = await http.post(url, json=body)
                usage = response.json().get("usage", {}) if response.status_code == 200 else {}
                return response.status_code, usage.get("completion_tokens", 0), None
            first, count = None, 0
            async with http.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return response.status_code, 0, None
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if first is None and any(choice["text"] for choice in event["choices"]):
                        first = time.monotonic()
                    count = event.get("usage", {}).get("completion_tokens", count)
            return 200, count, first

        return await closed_loop(send, load, clients)


def bare(model_dir: Path, tokenizer_dir: Path, load: Load, clients: int, threads: int = 0) -> dict:
    """transformers generate over batches of `clients` prompts (left-padded), one after another: the ceiling of a
    server whose every batch is full, with nothing between the batches (on `threads` of torch's; 0: its default)."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    texts, latencies, tokens, turn = load.texts, [], 0, 0
    began = time.monotonic()
    while time.monotonic() - began < load.seconds:
        batch = [texts[(turn + index) % len(texts)] for index in range(clients)]
        turn += clients
        inputs = tokenizer(batch, return_tensors="pt", padding=True)
        started = time.monotonic()
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=load.new, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        latencies += [time.monotonic() - started] * clients
        new_ids = out[:, inputs["input_ids"].shape[1] :]
        tokens += int((new_ids != tokenizer.eos_token_id).sum())
    elapsed = time.monotonic() - began
    torch.set_num_threads(default_threads)
    return summary(clients, elapsed, latencies, tokens, [], {200: len(latencies)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a registered version, models:/<name>/<version>; default: registered.json's")
    parser.add_argument("--clients", default="1,8,32", help="levels of closed-loop clients, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="at each level")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens a request")
    add_save_option(parser)
    args = parser.parse_args()
    from tasks.tracking.loading import model_source

    os.chdir(ROOT)
    model = args.model or json.loads((ROOT / "registered.json").read_text())["model_uri"]
    name = model.removeprefix("models:/").partition("/")[0]
    levels = [int(level) for level in args.clients.split(",")]
    print(f"machine: {machine()}", flush=True)
    rows = []
    with model_source(model) as source:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer)
        load = Load(prompts(Path(source.model), Path(source.tokenizer), args.tokens), args.tokens, args.seconds)
        for clients in levels:
            found = bare(Path(source.model), Path(source.tokenizer), load, clients)
            rows.append({"server": "bare transformers generate, batches of that many prompts", **found})
        # The replica's share on this machine: one thread of torch's (serve-model leaves a core to Ray's proxy).
        found = bare(Path(source.model), Path(source.tokenizer), load, max(levels), threads=1)
        rows.append({"server": "bare transformers generate, one torch thread (as a replica has here)", **found})
    with Server("mlflow", model, []) as server:
        for clients in levels:
            found = asyncio.run(against_mlflow(server.port, tokenizer, load, clients))
            rows.append({"server": "serve-model --api mlflow (MLflow scoring server)", **found})
    with Server("openai", model, []) as server:
        for clients in levels:
            found = asyncio.run(against_openai(server.port, name, load, clients))
            streamed = asyncio.run(
                against_openai(server.port, name, replace(load, seconds=load.seconds / 2), clients, True)
            )
            found["first_token_p50"] = streamed["first_token_p50"]
            found["errors"] += streamed["errors"]
            rows.append({"server": "serve-model (OpenAI API, Ray Serve batching)", **found})
        # What the HTTP path carries when generating costs next to nothing: one token a request.
        found = asyncio.run(against_openai(server.port, name, replace(load, new=1), max(levels)))
        rows.append({"server": "serve-model, max_tokens 1 (its request path alone)", **found})
    for row in rows:
        print(
            f"{row['server']} x{row['clients']}: {row['tokens_s']:.0f} tokens/s, p99 {row['p99']:.2f} s, "
            f"{row['refused']} refused, {row['errors']} errors",
            flush=True,
        )
    save(args.save, {"model": model, "tokens": args.tokens, "seconds": args.seconds, "rows": rows})


if __name__ == "__main__":
    main()
