"""The promotion report.

Two models side by side in one HTML page that needs nothing but itself (charts are inline SVG; no script, no
stylesheet or font from elsewhere), so it opens offline and as an MLflow artifact.

It shows what a person deciding a promotion asks: the decision in words, each rule of the gate with its verdict,
what both models measured on the same text and tasks, the two training curves overlaid, the evaluation metrics,
samples for the same prompts and seed, the params that differ and whether the data differs. tasks.promote measures
the models; this module reads what MLflow recorded about them and draws the page.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tasks.plumbing.redaction import redact
from tasks.tracking import mlflow_runs, store
from tasks.tracking.charts import COLORS, line_chart

CURVES = {"train/loss": "training loss", "train/eval_loss": "validation loss"}
DATA_TAGS = ("data_md5", "tokenized_md5")


@dataclass
class ModelView:
    """One model as the report shows it: where it is, what it scored here, and what MLflow recorded of it."""

    uri: str
    role: str  # "champion", "challenger", or A/B for `gpt2-pipeline compare`
    figures: dict[str, float]  # what promotion measured: bits_per_byte, perplexity... and the gate's task metrics
    samples: list[dict[str, str]]
    version: str | None = None
    run_id: str | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def bits_per_byte(self) -> float:
        return self.figures["bits_per_byte"]

    @property
    def name(self) -> str:
        return f"{self.role}: {self.uri}" + (f" (version {self.version})" if self.version else "")


def recorded(uri: str) -> tuple[str | None, str | None, dict[str, str]]:
    """(run id, registered version, version tags) behind a model URI.

    Models:/name/N, models:/name@alias, runs:/ID/path, or a save_pretrained folder with its mlflow_run.json; unknown
    parts are None or empty."""
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/")[0], None, {}
    if not uri.startswith("models:/"):
        return mlflow_runs.read_record(Path(uri)), None, {}
    name, _, alias = uri.removeprefix("models:/").partition("@")
    client = store.client()
    if alias:
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    return version.run_id, str(version.version), dict(version.tags)


def model_view(uri: str, role: str, figures: dict[str, float], samples: list[dict[str, str]]) -> ModelView:
    """The view of a measured model, with its run's curves, metrics and params where the store has them."""
    run_id, version, tags = recorded(uri)
    view = ModelView(uri, role, figures, samples, version, run_id, tags=tags)
    if run_id is None:
        return view
    client = store.client()
    try:
        data = client.get_run(run_id).data
    except Exception:  # a folder trained against another store: the report says "not recorded"
        return view
    view.params = dict(data.params)
    view.metrics = {key: value for key, value in data.metrics.items() if key.startswith("eval/")}
    for key in CURVES:
        by_step = {m.step: m.value for m in client.get_metric_history(run_id, key)}  # a resumed run repeats none
        view.curves[key] = sorted(by_step.items())
    return view


def render(reference: ModelView | None, candidate: ModelView, decision: dict) -> str:
    """The report page. decision: promoted, reason and gate, the rules' verdicts (as tasks.promote.decide gives)."""
    views = [v for v in (reference, candidate) if v is not None]
    verdict = "Promoted" if decision["promoted"] else "Not promoted"
    title = f"{candidate.name} against " + (reference.name if reference else "no champion")
    body = [
        f"<h1>{_text(title)}</h1>",
        f'<p class="decision {verdict.lower().replace(" ", "-")}">{verdict}: {_text(decision["reason"])}.</p>',
        _gate(reference, candidate, decision["gate"]),
        "<h2>Training curves</h2>",
        '<div class="charts">' + "".join(_chart(label, key, views) for key, label in CURVES.items()) + "</div>",
        "<h2>Evaluation</h2>",
        _table(["metric", *(v.role for v in views)], _rows(views, lambda v: v.metrics, "{:.6g}")),
        "<h2>Samples (same prompts, same seed)</h2>",
        _samples(views),
        "<h2>What differs</h2>",
        _differences(views),
    ]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = PAGE.format(generator=GENERATOR, title=_text(title), body="\n".join(body), stamp=stamp)
    return redact(page)  # a model's address may hold one


def _text(value: object) -> str:
    return html.escape(str(value))


def _gate(reference: ModelView | None, candidate: ModelView, verdicts: list[dict]) -> str:
    """Each rule of the gate with its verdict, then every figure promotion measured of both models."""
    views = [v for v in (reference, candidate) if v is not None]
    rules = [[v["metric"], v["text"]] for v in verdicts]
    gate = f"<h2>The gate: every rule must be met</h2>{_table(['metric', 'verdict'], rules)}" if reference else ""
    figures = _table(["metric", *(v.role for v in views)], _rows(views, lambda v: v.figures, "{:.6g}"))
    return f"{gate}<h2>Measured on the same text and tasks</h2>{figures}"


def _rows(views: list[ModelView], values, spec: str) -> list[list[str]]:
    keys = sorted({key for view in views for key in values(view)})
    return [[key, *(_format(values(view).get(key), spec) for view in views)] for key in keys]


def _format(value: object, spec: str) -> str:
    if value is None:
        return "—"
    return spec.format(value) if isinstance(value, int | float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return '<p class="missing">not recorded</p>'
    head = "".join(f"<th>{_text(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _samples(views: list[ModelView]) -> str:
    prompts = [s["prompt"] for s in views[-1].samples]
    rows = []
    for index, prompt in enumerate(prompts):
        texts = [view.samples[index]["text"] if index < len(view.samples) else "" for view in views]
        cells = "".join(f"<td><pre>{_text(text)}</pre></td>" for text in texts)
        rows.append(f"<tr><td><pre>{_text(prompt)}</pre></td>{cells}</tr>")
    head = "".join(f"<th>{_text(view.role)}</th>" for view in views)
    return f"<table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"


def _differences(views: list[ModelView]) -> str:
    if len(views) < 2:
        return '<p class="missing">nothing to compare with</p>'
    first, second = (view.params for view in views)
    changed = [[key, first.get(key, "—"), second.get(key, "—")] for key in sorted(first.keys() | second.keys())]
    changed = [row for row in changed if row[1] != row[2]]
    data = [[key, *(view.tags.get(key, "—") for view in views)] for key in DATA_TAGS]
    same = [[*row, "same" if row[1] == row[2] != "—" else "different or not recorded"] for row in data]
    header = ["param", *(view.role for view in views)]
    params = _table(header, changed) if changed else "<p>No param differs.</p>"
    return params + _table(["data", *(view.role for view in views), ""], same)


def _chart(label: str, key: str, views: list[ModelView]) -> str:
    series = [(view.role, COLORS[-len(views) + i], view.curves.get(key, [])) for i, view in enumerate(views)]
    points = [point for _, _, curve in series for point in curve]
    if not points:
        return f'<figure><figcaption>{_text(label)}</figcaption><p class="missing">not recorded</p></figure>'
    return f"<figure><figcaption>{_text(label)}</figcaption>{line_chart(series, label)}</figure>"


GENERATOR = '<meta name="generator" content="gpt2-pipeline report">'  # marks a page this module wrote
PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{generator}<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif, "Noto Sans CJK SC"; margin: 2em; color: #222; max-width: 1200px; }}
.decision {{ font-size: 1.3em; padding: .6em 1em; border-radius: 4px; }}
.promoted {{ background: #e3f4e1; }} .not-promoted {{ background: #fbe5e1; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: .3em .7em; text-align: left; vertical-align: top; }}
pre {{ white-space: pre-wrap; margin: 0; max-width: 40em; font-family: inherit; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
figure {{ margin: 0; }} figcaption {{ font-weight: 600; }}
.missing {{ color: #888; }}
</style></head>
<body>
{body}
<p class="missing">Written by gpt2-pipeline at {stamp}.</p>
</body></html>
"""
