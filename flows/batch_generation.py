"""One transformers `generate` over a batch of rows that each keep their own settings.

The serving engine (Ray Serve's batching, flows/completions.py) decides which requests share a batch; this runs one.
Prompts of different lengths are left-padded with an attention mask. Each row stops on its own (a stopping
criterion per row: its max_new_tokens, its stop strings, the end-of-text token, its deadline, its caller gone).
Temperature, top_p and the seed are per row too: a row that samples draws its token in a logits processor with a
torch.Generator of its own and hands generate a one-hot choice, so a seeded request draws the same tokens whatever
else shares its batch, and a greedy one takes the same argmax as alone. Text streams out as it comes (a streamer
that generate feeds every step), holding back what could still turn out to be the start of a stop string.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

REPLACEMENT = "\ufffd"  # what decoding shows for a character whose bytes have not all come yet


@dataclass
class Row:
    """One completion asked for: a prompt's tokens and how to continue it; what came out."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    deadline: float = float("inf")  # time.monotonic() past which the row stops
    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: bool = False  # its text is wanted as it comes, not only at the end
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the completion's text, cut at a stop string
    sent: int = 0  # characters of text already streamed out
    finish_reason: str | None = None  # length, stop, timeout, cancelled

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def ready_text(self) -> str:
        """Text not yet streamed that can no longer change: all of it once done, else without what could be the start
        of a stop string or a character whose bytes are still coming."""
        end = len(self.text)
        if not self.done:
            end -= max((len(stop) - 1 for stop in self.stop), default=0)
            while end > self.sent and self.text[end - 1 : end] == REPLACEMENT:
                end -= 1
        chunk = self.text[self.sent : max(end, self.sent)]
        self.sent += len(chunk)
        return chunk


class RowSampler(LogitsProcessor):
    """Each sampling row draws its next token with its own temperature, top_p and generator; greedy rows keep the
    argmax. Returns scores that leave generate's greedy search one choice per row."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.generators = {}
        for index, row in enumerate(rows):
            if row.temperature > 0:
                seed = row.seed if row.seed is not None else random.SystemRandom().randrange(1 << 63)
                self.generators[index] = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = scores.argmax(dim=-1)
        for index, generator in self.generators.items():
            row = self.rows[index]
            probs = torch.softmax(scores[index].float() / row.temperature, dim=-1)
            if row.top_p < 1.0:  # the smallest set of most likely tokens whose probability reaches top_p
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered >= row.top_p
                probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
            chosen[index] = torch.multinomial(probs.cpu(), 1, generator=generator).to(chosen.device)[0]
        choice = torch.full_like(scores, float("-inf"))
        return choice.scatter_(1, chosen.unsqueeze(1), 0.0)


class RowStops(StoppingCriteria):
    """Which rows are finished after a step, and why (Row.finish_reason)."""

    def __init__(self, rows: list[Row], stopping: threading.Event):
        self.rows, self.stopping = rows, stopping

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        now = time.monotonic()
        for row in self.rows:
            if row.done:
                continue
            if row.cancelled.is_set():
                row.finish_reason = "cancelled"
            elif now >= row.deadline or self.stopping.is_set():
                row.finish_reason = "timeout"
            elif len(row.tokens) >= row.max_new_tokens:
                row.finish_reason = "length"
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


class RowStreamer(BaseStreamer):
    """Takes each step's new token of every row: appends it to its row, decodes the row's text, finds its stop
    strings and end-of-text; then tells the caller a step has passed."""

    def __init__(self, rows: list[Row], tokenizer, on_step: Callable[[], None]):
        self.rows, self.tokenizer, self.on_step = rows, tokenizer, on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call hands over the prompts
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.view(-1).tolist(), strict=True):
            if row.done:
                continue
            if token == self.tokenizer.eos_token_id:
                row.finish_reason = "stop"
                continue
            row.tokens.append(token)
            if row.stream or row.stop:  # else decoded once, at the end
                self.decode(row)
        self.on_step()

    def decode(self, row: Row) -> None:
        """The row's text so far, cut at its first stop string (which ends the row)."""
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((at for at in (row.text.find(stop) for stop in row.stop) if at >= 0), default=-1)
        if cut >= 0:
            row.text, row.finish_reason = row.text[:cut], "stop"

    def end(self) -> None:
        for row in self.rows:
            if not (row.stream or row.stop):
                self.decode(row)
            if not row.done:
                row.finish_reason = "length"
        self.on_step()


def generate_rows(model, tokenizer, rows: list[Row], stopping: threading.Event, on_step: Callable[[], None]) -> None:
    """Continue every row at once (one generate call), filling each Row as the tokens come."""
    live = [row for row in rows if not row.cancelled.is_set()]
    for row in rows:
        if row.cancelled.is_set():
            row.finish_reason = "cancelled"
    if not live:
        return on_step()
    width = max(len(row.prompt_ids) for row in live)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(row.prompt_ids)) + row.prompt_ids for row in live])
    mask = torch.tensor([[0] * (width - len(row.prompt_ids)) + [1] * len(row.prompt_ids) for row in live])
    config = GenerationConfig(
        max_new_tokens=max(row.max_new_tokens for row in live),
        do_sample=False,  # RowSampler has chosen every row's token: generate takes it
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = next(model.parameters()).device
    with torch.inference_mode():
        model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([RowSampler(live)]),
            stopping_criteria=[RowStops(live, stopping)],
            streamer=RowStreamer(live, tokenizer, on_step),
        )
