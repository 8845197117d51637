"""One generate over a batch of rows with their own settings (flows/batch_generation.py), on a small GPT-2 trained
briefly here: each row's output is the one it gets alone; stops, deadlines and a caller gone end a row on its own."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from flows.batch_generation import Row, generate_rows
from tasks.data.tokenizer import train_bpe
from tasks.plumbing.params import TokenizerParams
from tests.helpers import ROOT, greedy_alone

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "床前明月光", "K"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A byte-level BPE and a GPT-2 fitted a few dozen steps to the same text: greedy output that is not one token
    repeated, so rows that ran together but took each other's tokens would differ."""
    folder = tmp_path_factory.mktemp("corpus")
    text = (ROOT / "data/samples/tinyshakespeare.txt").read_text(encoding="utf-8")[:40_000] + "床前明月光，疑是地上霜。"
    (folder / "train.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    tokenizer = train_bpe([folder / "train.jsonl"], TokenizerParams(vocab_size=300, block_size=64))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=64, n_positions=128))
    ids = torch.tensor(tokenizer(text)["input_ids"][: 64 * 40]).view(40, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        loss = model(input_ids=ids[step % 40 :][:8], labels=ids[step % 40 :][:8]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


def run(lm, rows: list[Row], stopping: threading.Event | None = None) -> list[Row]:
    model, tokenizer = lm
    steps = []
    generate_rows(model, tokenizer, rows, stopping or threading.Event(), lambda: steps.append(1))
    assert steps, "no step was reported"
    return rows


def row(lm, prompt: str, new: int, **settings) -> Row:
    return Row(lm[1](prompt)["input_ids"], new, **settings)


def test_rows_of_different_lengths_in_one_batch_each_get_what_they_get_alone(lm):
    """Left padding and the attention mask: greedy rows token for token as transformers gives each alone; sampling
    rows with a seed draw the same tokens alone and in company, and different seeds differ."""
    model, tokenizer = lm
    asked = [(prompt, new) for prompt, new in zip(PROMPTS, (12, 5, 9, 20), strict=True)]
    together = run(lm, [row(lm, prompt, new) for prompt, new in asked])
    for (prompt, new), got in zip(asked, together, strict=True):
        alone = greedy_alone(model, tokenizer, prompt, new)
        assert got.tokens == alone and got.finish_reason == ("length" if len(alone) == new else "stop")
        assert got.text == tokenizer.decode(alone, skip_special_tokens=True)
    seeded = [row(lm, PROMPTS[0], 16, temperature=1.0, top_p=0.9, seed=seed) for seed in (7, 8)]
    alone = run(lm, [row(lm, PROMPTS[0], 16, temperature=1.0, top_p=0.9, seed=7)])[0]
    crowd = run(lm, [row(lm, PROMPTS[1], 10), *seeded, row(lm, PROMPTS[2], 3, temperature=0.7, seed=1)])
    assert crowd[1].tokens == alone.tokens and crowd[2].tokens != alone.tokens


def test_a_stop_string_ends_its_row_alone_and_is_never_streamed(lm):
    greedy = run(lm, [row(lm, PROMPTS[0], 30)])[0]
    stop = greedy.text[5:8]  # text the row would write, so it must stop there
    rows = run(lm, [row(lm, PROMPTS[0], 30, stop=(stop, "never there")), row(lm, PROMPTS[1], 30)])
    assert rows[0].finish_reason == "stop" and rows[0].text == greedy.text[: greedy.text.find(stop)]
    assert rows[1].finish_reason in ("length", "stop") and len(rows[1].tokens) > len(rows[0].tokens)
    streamed = Row(rows[0].prompt_ids, 30, stop=(stop,))
    streamed.text, streamed.tokens = greedy.text[:7], [0]  # mid-way: what could still become the stop is held back
    assert streamed.ready_text() == greedy.text[: 7 - (len(stop) - 1)]


def test_a_row_past_its_deadline_or_cancelled_stops_and_the_others_go_on(lm):
    past = row(lm, PROMPTS[0], 40, deadline=time.monotonic() - 1)
    gone = row(lm, PROMPTS[1], 40)
    gone.cancelled.set()
    rows = run(lm, [past, gone, row(lm, PROMPTS[2], 12)])
    assert past.finish_reason == "timeout" and len(past.tokens) <= 1
    assert gone.finish_reason == "cancelled" and gone.tokens == []
    assert rows[2].finish_reason in ("length", "stop") and len(rows[2].tokens) >= 1
    stopping = threading.Event()
    stopping.set()  # the server is stopping
    assert run(lm, [row(lm, PROMPTS[0], 40)], stopping)[0].finish_reason == "timeout"


def test_a_batch_waits_for_more_rows_only_while_they_come_faster_than_a_batch_runs():
    """Pace (flows/completions.py) sets Ray Serve's batch wait and when a batch counts as full: no wait for a lone
    client, up to the cap under load, up to the cap more while a batch runs, and, once none runs, a batch full when
    it has the rows the batches before it had (never less than a request's rows: Ray Serve refuses a request past
    the size)."""
    from flows.completions import Pace

    pace = Pace(cap=0.25, max_rows=32)
    assert pace.wait(0.0) == 0.0  # nothing came yet: a first request does not wait
    for at in range(4):  # a lone client, a request every half second, each batch 0.05 s
        pace.queued(at, 1, at * 0.5)
        pace.started([at], at * 0.5)
        pace.ended(0.05)
    assert pace.wait(2.0) == 0.0 and pace.size(1) == 32  # one row is all that comes: full
    for at in range(200):  # 100 rows a second, batches of 0.3 s: worth waiting, up to the cap
        pace.queued(100 + at, 1, 2.0 + at / 100)
    pace.ended(0.3)
    assert pace.wait(4.0) == pytest.approx(0.25)
    pace.started([100 + at for at in range(8)], 4.0)  # 8 rows start, 192 left waiting
    assert pace.wait(4.1) == pytest.approx(0.25 + 0.2)  # and until the batch running ends (0.3 s after 4.0)
    assert pace.wait(5.0) == pytest.approx(0.25)  # it should have ended: no more than the wait
    slow = Pace(cap=1.0, max_rows=32)
    slow.queued(0, 40, 0.0)
    slow.ended(0.3)
    assert slow.wait(1.0) == pytest.approx(0.3 - 2.0 / 40)  # batch time less the time between rows
    assert Pace(cap=0.0, max_rows=32).wait(0.0) == 0.0  # --batch-wait 0: never waits
    long = Pace(cap=0.25, max_rows=32)
    long.ended(20.0)  # a batch of many tokens ran 20 s: the next one running waits no more than the cap for it
    long.started([], 0.0)
    assert long.wait(0.1) == pytest.approx(0.25)
    sizes = Pace(cap=0.25, max_rows=32)
    for batch in range(2):  # eight clients: each batch takes the eight
        for client in range(8):
            sizes.queued(batch * 8 + client, 1, batch)
        sizes.started([batch * 8 + client for client in range(8)], batch)
        assert sizes.size(8) == 8  # while a batch runs, the next one keeps taking rows
        sizes.ended(0.2)
    assert sizes.size(7) == 7 and sizes.size(8) == 32 and sizes.size(33) == 33  # 33: over, Ray defers the last
    for client in range(30):
        sizes.queued(100 + client, 1, 3.0)
    sizes.gone(100)  # a caller gone before its batch: not waited for
    sizes.started(list(range(101, 109)), 3.0)  # 21 rows left waiting: the next batch waits for more
    sizes.ended(0.2)
    assert sizes.size(28) == 28 and sizes.size(29) == 32


def test_requests_tokenized_before_the_alias_moved_run_on_the_version_they_were_tokenized_for(lm, tmp_path):
    """Around an alias switch a batch can hold requests tokenized by the old version's tokenizer and by the new
    one's (here a different vocabulary): each runs on its own version, as it would alone."""
    import asyncio

    from flows.completions import Engine, Job, Metrics, Served

    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "to be or not to be, that is the question " * 50}) + "\n")
    new_tokenizer = train_bpe([tmp_path / "train.jsonl"], TokenizerParams(vocab_size=280, block_size=64))
    torch.manual_seed(1)
    new_model = GPT2LMHeadModel(GPT2Config(vocab_size=len(new_tokenizer), n_layer=2, n_head=2, n_embd=64)).eval()
    old, new = Served("1", *lm), Served("2", new_model, new_tokenizer)
    engine = Engine.__new__(Engine)  # the batch path alone: no registry, no Ray
    engine.metrics, engine.stopping = Metrics(), threading.Event()

    async def batch() -> list[Job]:
        jobs = [Job([Row(v.tokenizer(PROMPTS[0])["input_ids"], 8)], v) for v in (old, new, old)]
        return await engine.run_batch(jobs)

    for job in asyncio.run(batch()):
        served = job.served
        assert job.version == served.version and job.finished
        assert job.rows[0].tokens == greedy_alone(served.model, served.tokenizer, PROMPTS[0], 8)


def test_a_stream_ends_quietly_when_ray_serve_says_its_caller_left_with_an_error():
    """Ray Serve may tell a replica that the caller left by raising from receive (its call to the proxy cancelled)
    rather than with a disconnect message: the stream's listener ends as for a disconnect, nothing raised."""
    import asyncio

    from ray.exceptions import TaskCancelledError
    from starlette.responses import StreamingResponse

    from flows.completions import event_stream

    async def nothing():
        yield b""

    heard = []

    async def cancelled():
        heard.append("cancelled")
        raise TaskCancelledError()

    async def disconnect():
        heard.append("disconnect")
        return {"type": "http.disconnect"}

    stream = event_stream()(nothing(), media_type="text/event-stream")
    for receive in (cancelled, disconnect):
        assert asyncio.run(stream.listen_for_disconnect(receive)) is None  # ended, nothing raised
    assert heard == ["cancelled", "disconnect"]
    # Starlette's own response lets the error out: the traceback the log showed.
    with pytest.raises(TaskCancelledError):
        asyncio.run(StreamingResponse(nothing()).listen_for_disconnect(cancelled))
