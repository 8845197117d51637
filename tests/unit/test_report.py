"""The promotion report's page, drawn from two hand-made model views: what it shows, and that it needs nothing
from elsewhere (tests/integration/test_registry.py renders a real one in Chromium)."""

from __future__ import annotations

import re

from tasks.promote import decide
from tasks.tracking.report import COLORS, ModelView, render


def views() -> tuple[ModelView, ModelView]:
    champion = ModelView(
        "models:/gpt2-lm/1", "champion", 3.40, [{"prompt": "ROMEO:", "text": "ROMEO: <b>hark</b>"}], "1", "r1",
        curves={"train/loss": [(10, 6.0), (20, 5.0), (30, 4.5)], "train/eval_loss": [(30, 4.6)]},
        metrics={"eval/perplexity": 90.0}, params={"train.max_steps": "30", "train.seed": "1"},
        tags={"data_md5": "aaa", "tokenized_md5": "bbb"},
    )  # fmt: skip
    challenger = ModelView(
        "models:/gpt2-lm/2", "challenger", 3.10, [{"prompt": "ROMEO:", "text": "床前明月光，疑是地上霜"}], "2", "r2",
        curves={"train/loss": [(10, 6.1), (20, 4.9), (30, 4.2), (40, 4.0)]},
        metrics={"eval/perplexity": 70.0}, params={"train.max_steps": "40", "train.seed": "1"},
        tags={"data_md5": "aaa", "tokenized_md5": "ccc"},
    )  # fmt: skip
    return champion, challenger


def polylines(page: str) -> dict[str, int]:
    """Points per line colour."""
    return {c: len(p.split()) for p, c in re.findall(r'<polyline points="([^"]+)" stroke="([^"]+)"', page)}


def test_the_report_shows_the_decision_curves_samples_and_what_differs():
    champion, challenger = views()
    promoted, reason = decide(challenger.bits_per_byte, champion.bits_per_byte, 0.01)
    page = render(champion, challenger, {"promoted": promoted, "reason": reason, "min_improvement": 0.01})
    assert "Promoted: 8.82% fewer bits per byte than the champion (promotion needs 1.00% fewer)." in page
    assert "≤ 3.3660" in page  # the champion's 3.40 less 1%
    # Training loss: one line each, every logged step; validation loss: the champion's single point.
    assert page.count("<svg") == 2
    assert polylines(page[: page.index("validation loss</figcaption>")]) == {COLORS[0]: 3, COLORS[1]: 4}
    assert polylines(page[page.index("validation loss</figcaption>") :]) == {COLORS[0]: 1}
    assert "床前明月光，疑是地上霜" in page and "ROMEO: &lt;b&gt;hark&lt;/b&gt;" in page  # text, never markup
    assert "<td>train.max_steps</td><td>30</td><td>40</td>" in page and "train.seed" not in page
    assert "<td>data_md5</td><td>aaa</td><td>aaa</td><td>same</td>" in page
    assert "<td>tokenized_md5</td><td>bbb</td><td>ccc</td><td>different or not recorded</td>" in page


def test_the_report_needs_nothing_from_elsewhere():
    champion, challenger = views()
    page = render(champion, challenger, {"promoted": False, "reason": "x", "min_improvement": 0.01})
    assert not re.search(r"<script|<link|<img|src=|href=|url\(|@import", page)
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}  # a name, not fetched


def test_the_first_challenger_s_report_has_no_champion_column():
    _, challenger = views()
    page = render(None, challenger, {"promoted": True, "reason": "no champion yet", "min_improvement": 0.01})
    assert "Promoted: no champion yet." in page and "needed to promote" not in page
    assert polylines(page) == {COLORS[1]: 4}
