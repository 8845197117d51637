"""The promotion report's page, drawn from two hand-made model views: what it shows, and that it needs nothing
from elsewhere (tests/integration/test_registry.py renders a real one in Chromium)."""

from __future__ import annotations

import re

from tasks.plumbing.params import GateRule
from tasks.promote import Measured, decide
from tasks.tracking.report import COLORS, ModelView, render


def views() -> tuple[ModelView, ModelView]:
    champion = ModelView(
        "models:/gpt2-lm/1", "champion", {"bits_per_byte": 3.40, "hellaswag/acc_norm": 0.31},
        [{"prompt": "ROMEO:", "text": "ROMEO: <b>hark</b>"}], "1", "r1",
        curves={"train/loss": [(10, 6.0), (20, 5.0), (30, 4.5)], "train/eval_loss": [(30, 4.6)]},
        metrics={"eval/perplexity": 90.0}, params={"train.max_steps": "30", "train.seed": "1"},
        tags={"data_md5": "aaa", "tokenized_md5": "bbb"},
    )  # fmt: skip
    challenger = ModelView(
        "models:/gpt2-lm/2", "challenger", {"bits_per_byte": 3.10, "hellaswag/acc_norm": 0.29},
        [{"prompt": "ROMEO:", "text": "床前明月光，疑是地上霜"}], "2", "r2",
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
    gate = [GateRule(metric="bits_per_byte", margin=0.01), GateRule(metric="hellaswag/acc_norm", require="not_worse")]
    measured = [Measured(view.figures, [], {"hellaswag/acc_norm": True}) for view in (challenger, champion)]
    promoted, reason, verdicts = decide(gate, *measured)
    page = render(champion, challenger, {"promoted": promoted, "reason": reason, "gate": verdicts})
    # Kept out by the one rule it misses; the gate's table gives each rule's verdict, and both models' figures.
    missed = "hellaswag/acc_norm 0.31 → 0.29, 6.45% worse (must not be worse): NOT met"
    assert f"Not promoted: {missed}." in page
    met = "bits_per_byte 3.4 → 3.1, 8.82% better (must improve by at least 1.00%): met"
    assert f"<td>bits_per_byte</td><td>{met}</td>" in page and f"<td>hellaswag/acc_norm</td><td>{missed}</td>" in page
    assert "<td>hellaswag/acc_norm</td><td>0.31</td><td>0.29</td>" in page
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
    page = render(champion, challenger, {"promoted": False, "reason": "x", "gate": []})
    assert not re.search(r"<script|<link|<img|src=|href=|url\(|@import", page)
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}  # a name, not fetched


def test_the_first_challenger_s_report_has_no_champion_column():
    _, challenger = views()
    page = render(None, challenger, {"promoted": True, "reason": "no champion yet", "gate": []})
    assert "Promoted: no champion yet." in page and "The gate" not in page
    assert "<tr><th>metric</th><th>challenger</th></tr><tr><td>bits_per_byte</td><td>3.1</td></tr>" in page
    assert polylines(page) == {COLORS[1]: 4}
