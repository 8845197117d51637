"""Promotion's gate: each rule compares one metric of the challenger and @champion, in its unit, against its margin."""

from __future__ import annotations

import pytest

from tasks.plumbing.params import GateRule, parse_params
from tasks.promote import Measured, decide, version_tags

BPB = GateRule(metric="bits_per_byte", require="improve", margin=0.01, unit="fraction")


def text(bits_per_byte: float) -> Measured:
    return Measured({"bits_per_byte": bits_per_byte}, [])


def task(acc_norm: float, stderr: float, perplexity: float = 40.0) -> Measured:
    figures = {
        "hellaswag/acc_norm": acc_norm,
        "hellaswag/acc_norm_stderr": stderr,
        "lambada_openai/perplexity": perplexity,
    }
    return Measured(figures, [], {"hellaswag/acc_norm": True, "lambada_openai/perplexity": False})


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "promoted"),
    [
        (0.9901, 1.0, 0.01, False),  # 0.99% better: just under the 1% asked
        (0.9899, 1.0, 0.01, True),  # 1.01% better: just over
        (1.0, 1.0, 0.01, False),  # equal scores never pass a positive threshold
        (1.2, 1.0, 0.01, False),  # worse
        (1.0, 1.0, 0.0, False),  # "improve" needs a change above 0, whatever the margin
        (0.999, 1.0, 0.0, True),
    ],
)
def test_the_default_rule_at_its_threshold(challenger, champion, margin, promoted):
    rule = BPB.model_copy(update={"margin": margin})
    decision, reason, (verdict,) = decide([rule], text(challenger), text(champion))
    assert decision is promoted and verdict["met"] is promoted
    assert verdict["change"] == pytest.approx((champion - challenger) / champion)
    assert reason == verdict["text"] and reason.endswith(": met" if promoted else ": NOT met")


def test_the_default_gate_is_today_s_threshold():
    assert parse_params({}).promote.gate == [BPB]


def test_no_champion_promotes_the_first_challenger_whatever_it_measures():
    assert decide([BPB], text(5.0), None) == (True, "no champion yet", [])


def test_a_worse_challenger_is_said_to_be_worse_in_the_rule_s_words():
    promoted, reason, _ = decide([BPB], text(1.3371), text(1.0))
    assert not promoted
    assert reason == "bits_per_byte 1 → 1.337, 33.71% worse (must improve by at least 1.00%): NOT met"


def test_a_task_rule_in_standard_errors_of_the_difference():
    """hellaswag acc_norm 0.30 ± 0.03 against 0.35 ± 0.04: 0.05 lower is exactly 1 standard error of the difference
    (hypot(0.03, 0.04) = 0.05), so "at most 1 worse" holds and "at most 0.9 worse" does not."""
    rule = GateRule(metric="hellaswag/acc_norm", require="not_worse", margin=1.0, unit="stderr")
    promoted, _, (verdict,) = decide([rule], task(0.30, 0.03), task(0.35, 0.04))
    assert promoted and verdict["change"] == pytest.approx(-1.0)
    assert verdict["text"] == (
        "hellaswag/acc_norm 0.35 → 0.3, 1 standard errors worse (must be worse by at most 1 standard errors): met"
    )
    promoted, _, (verdict,) = decide([rule.model_copy(update={"margin": 0.9})], task(0.30, 0.03), task(0.35, 0.04))
    assert not promoted and not verdict["met"]


def test_lower_is_better_where_the_harness_says_so_and_every_rule_must_hold():
    rules = [
        GateRule(metric="lambada_openai/perplexity", require="not_worse", margin=0.05),  # 5% higher at most
        GateRule(metric="hellaswag/acc_norm", require="not_worse", margin=0.0, unit="absolute"),
    ]
    promoted, _, verdicts = decide(rules, task(0.40, 0.05, perplexity=41.0), task(0.35, 0.05, perplexity=40.0))
    assert promoted and [v["met"] for v in verdicts] == [True, True]  # 2.5% higher perplexity, better accuracy
    promoted, reason, verdicts = decide(rules, task(0.40, 0.05, perplexity=43.0), task(0.35, 0.05, perplexity=40.0))
    assert not promoted and [v["met"] for v in verdicts] == [False, True]
    assert reason == "lambada_openai/perplexity 40 → 43, 7.50% worse (must be worse by at most 5.00%): NOT met"


def test_the_decision_becomes_one_tag_a_rule():
    _, reason, verdicts = decide([BPB], text(0.9), text(1.0))
    tags = version_tags({"promoted": True, "reason": reason, "gate": verdicts})
    assert tags == {"promotion_promoted": True, "promotion_reason": reason, "promotion_rule_1": verdicts[0]["text"]}


@pytest.mark.parametrize(
    ("promote", "tasks", "says"),
    [
        ({"gate": [{"metric": "hellaswag/acc"}]}, [], "promote.gate.0.metric: hellaswag/acc names task hellaswag"),
        ({"gate": [{"metric": "ppl"}]}, [], "metric 'ppl': one of bits_per_byte, bits_per_char, perplexity"),
        ({"gate": [{"metric": "perplexity", "unit": "stderr"}]}, [], "unit stderr is for a task's metric"),
        ({"min_improvement": 0.02}, [], "min_improvement is now a rule of promote.gate"),
        ({"gate": []}, [], "at least 1 item"),
    ],
)
def test_a_bad_gate_is_refused_with_one_line(promote, tasks, says):
    from tasks.plumbing.errors import PipelineError

    with pytest.raises(PipelineError, match=f"^params.yaml: .*{__import__('re').escape(says)}") as refused:
        parse_params({"promote": promote, "evaluate": {"tasks": tasks}})
    assert "\n" not in str(refused.value)
