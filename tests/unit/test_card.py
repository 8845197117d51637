"""The model card stays a card: hostile samples and names are text, and the registry's description has a limit."""

from __future__ import annotations

import json

import pytest
from markdown_it import MarkdownIt

from tasks.plumbing.paths import INGEST_STATS, MODEL_DIR, SAMPLES_FILE, TRAIN_METRICS
from tasks.register import model_card
from tasks.tracking.registry import CUT_NOTE, MAX_DESCRIPTION, within_limit
from tests.helpers import tiny_params

HOSTILE_SAMPLE = "ROMEO:\n```\n# Pwned\n[click](javascript:alert(1)) <img src=x onerror=alert(1)>\n````\nend"
HOSTILE_SOURCE = "data/[x](javascript:alert(2))<script>alert(3)</script>#.txt"


@pytest.fixture
def card(tmp_path, monkeypatch) -> str:
    """The card of a model whose samples and source names carry Markdown and HTML."""
    from tasks.plumbing.params import parse_params

    monkeypatch.chdir(tmp_path)
    split = {"records": 3, "chars": 30, "bytes": 30}
    files = {
        INGEST_STATS: {"sources": [HOSTILE_SOURCE], "train": split, "validation": split},
        TRAIN_METRICS: {"steps": 5, "tokens_seen": 640, "device": "cpu", "precision": "fp32"},
        SAMPLES_FILE: [{"prompt": "ROMEO:", "text": HOSTILE_SAMPLE}, {"prompt": "```", "text": "```\n<b>x</b>"}],
        MODEL_DIR / "config.json": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "vocab_size": 512},
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return model_card("gpt2-lm", parse_params(tiny_params()), {"perplexity": 9.5}, {"git_commit": "<i>abc</i>"})


def test_hostile_samples_and_names_stay_text(card):
    tokens = MarkdownIt("commonmark").parse(card)
    text = ["".join(child.content for child in token.children or []) for token in tokens]
    headings = [text[i + 1] for i, token in enumerate(tokens) if token.type == "heading_open"]
    assert headings == ["gpt2-lm", "Data", "Model", "Validation", "Samples", "Load"]  # none injected
    html = MarkdownIt("commonmark").render(card)
    assert "<script" not in html and "<img" not in html and "<i>" not in html and 'href="javascript' not in html
    blocks = [token.content for token in tokens if token.type == "fence" and token.info == "text"]
    assert blocks == [f"{HOSTILE_SAMPLE}\n", "```\n<b>x</b>\n"]  # each sample whole, in its own block
    assert "data/[x](javascript:alert(2))<script>alert(3)</script>#.txt" in MarkdownIt("commonmark").render(
        card
    ).replace("&lt;", "<").replace("&gt;", ">")  # the file name shown as it is, as text


def test_a_long_card_is_cut_within_the_limit_and_stays_a_card(card):
    samples = "\n\n".join(["## Samples", *(f"```text\n{'x' * 900}\n```" for _ in range(8))])
    long = card + samples
    cut = within_limit(long)
    assert len(long) > MAX_DESCRIPTION >= len(cut) and cut.endswith(CUT_NOTE)
    tokens = MarkdownIt("commonmark").parse(cut)
    assert tokens[-1].type == "paragraph_close" and "model_card.md" in tokens[-2].content  # the note is text
    assert within_limit(card) == card
