"""The front door and the site: a README a newcomer reads in minutes, without history, and a documentation site
that builds strictly and draws in a browser, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.browser import chromium, pixels_near
from tests.helpers import ROOT

MATERIAL_HEADER = "#4051b5"  # Material for MkDocs' default primary colour (indigo)


def test_the_readme_is_short_and_holds_no_history():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a date: history lives in git"
    assert not re.search(r"randomly-seed|\bseed \d{3,}", text), "a test seed"
    commits = set(subprocess.run(["git", "rev-list", "--all"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    hexes = set(re.findall(r"\b[0-9a-f]{7,40}\b", text))
    assert not {h for h in hexes if any(commit.startswith(h) for commit in commits)}, "a commit hash"
    for link in re.findall(r"\]\(((?:docs|infra)/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_the_site_builds_strictly_and_its_pages_draw_offline(tmp_path):
    site = tmp_path / "site"
    build = [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--quiet", "--site-dir", str(site)]
    result = subprocess.run(
        build, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    home, reference = site / "index.html", site / "reference/params/index.html"
    for page in (home, reference):
        assert not re.search(r'(src|href)="https?://(?!127\.0\.0\.1)[^"]*\.(js|css)', page.read_text()), page
    dom, png = chromium(home, tmp_path)
    assert "ingest → tokenize → train → evaluate → register" in dom and pixels_near(png, MATERIAL_HEADER) > 5000
    dom, png = chromium(reference, tmp_path)
    assert "<code>train.learning_rate</code>" in dom and pixels_near(png, MATERIAL_HEADER) > 5000


FIGURE = re.compile(r"\d[\d,.]*\s?(?:tokens/s|MB/s|GB/s|TFLOP/s)|\d+(?:\.\d+)?% MFU|\d+ min \d+ s|\btook \d")
FENCE = re.compile(r"```.*?```", re.S)


def test_the_benchmark_tables_are_the_saved_figures_and_no_figure_is_typed_elsewhere():
    from tools import bench_tables

    page = bench_tables.PAGE.read_text()
    assert bench_tables.render(page) == page, "docs/benchmarks.md differs from bench/results/: run make bench-tables"
    blocks = set(re.findall(r"<!-- bench: ([\w-]+) -->", page))
    assert blocks == {"summary", *bench_tables.CASES}, "every case has its table, and only those"
    saved = {path.stem for path in bench_tables.RESULTS.glob("*.json")}
    assert saved <= set(bench_tables.CASES), f"results no table shows: {saved - set(bench_tables.CASES)}"
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        prose = FENCE.sub("", bench_tables.BLOCK.sub("", path.read_text()))
        assert not FIGURE.findall(prose), f"{path.relative_to(ROOT)}: a figure typed by hand: {FIGURE.findall(prose)}"


def test_a_saved_result_becomes_its_table_and_a_missing_one_says_how_to_measure_it(tmp_path, monkeypatch):
    import json

    from tools import bench_tables

    monkeypatch.setattr(bench_tables, "RESULTS", tmp_path)
    on = {"date": "2026-01-02", "cores": 2, "cpu": "Test CPU", "native_bf16": False, "memory_gib": 8, "gpu": None}
    on |= {"python": "3.11.0", "torch": "2.13.0", "transformers": "5.0.0"}
    whole = {"text_mb": 49.5, "rounds": 3, "median_s": {"script": 30.0, "dvc repro": 40.0}}
    result = {"command": "python bench/tokenize_whole.py --save tokenize-whole", "measured_on": on, "figures": whole}
    (tmp_path / "tokenize-whole.json").write_text(json.dumps(result))
    page = "<!-- bench: tokenize-whole -->\nold\n<!-- /bench -->\n<!-- bench: summary -->\n<!-- /bench -->\n"
    page += "<!-- bench: eval-cpu -->\n<!-- /bench -->\n"
    # another case measured on another machine: the summary tells the two machines apart
    other = {"command": "python bench/overhead.py --save overhead", "measured_on": on | {"native_bf16": True}}
    other["figures"] = {
        "noop": {"noop_repro_s": 1.2, "one_stage_noop_s": 1.0, "ratio": 1.2},
        "flow": {"running_overhead_s": 1.0},
        "logging": {"share_waited": 0.01, "share_ab": 0.03},
        "register": {"ratio": 1.5},
    }
    (tmp_path / "overhead.json").write_text(json.dumps(other))
    rendered = bench_tables.render(page)
    assert "| 49.5 MB | 40.0 s | 30.0 s | 0.750 × |" in rendered and "old" not in rendered
    assert "Measured on 2026-01-02: 2 cores (Test CPU, without native bf16), 8 GiB" in rendered
    summary_row = "| tokenize as a user waits for it, against a hand-written script | ≥ 0.8 × | 0.750 × | **no** | A |"
    assert summary_row in rendered
    assert "| no-op `dvc repro` against a one-stage DVC project's | ≤ 1.5 × | 1.200 × | yes | B |" in rendered
    legend = (
        "Machines: A: 2 cores (Test CPU, without native bf16), 8 GiB; B: 2 cores (Test CPU, with native bf16), 8 GiB."
    )
    assert legend in rendered
    assert "| MLflow logging every step, training against none | ≤ 2% | +3.00% | **no** | B |" in rendered
    assert f"Not measured: run `{bench_tables.CASES['eval-cpu'].command}`, then `make bench-tables`." in rendered
    assert bench_tables.render(rendered) == rendered


def test_a_larger_corpus_run_on_one_worker_count_is_judged_by_its_memory_against_the_smaller_one(tmp_path, monkeypatch):
    """The 10 GB case runs one worker count: no speed-up or same-bytes claim, and its peak memory over the 1 GB
    case's with the same workers is the figure (flat: at most 1.5 times)."""
    import json

    from tools import bench_tables

    monkeypatch.setattr(bench_tables, "RESULTS", tmp_path)

    def result(case, text_mb, runs, identical):
        stages = {"seconds": 10.0, "peak_rss_mb": 1.0}
        figures = [{"text_mb": text_mb, "input_mb": text_mb, "identical": identical, "dvc_status_s": 1.0,
                    "dvc_repro_noop_s": 1.0, "output_mb": {"data/prepared": 1.0, "data/tokenized": 2.0},
                    "runs": {str(w): {s: stages | {"peak_private_mb": mb} for s in ("ingest", "tokenize")}
                             for w, mb in runs.items()}}]  # fmt: skip
        (tmp_path / f"{case}.json").write_text(json.dumps({"command": "c", "measured_on": None, "figures": figures}))

    result("data-scaling", 1000, {1: 300, 2: 800}, True)
    result("data-scaling-10gb", 10000, {2: 1000}, None)
    rows = bench_tables.data_summary(bench_tables.load("data-scaling-10gb")["figures"])
    assert rows == [(f"{stage}'s peak memory, 10,000 MB against 1,000 MB, 2 workers", "≤ 1.5 ×", "1.250 ×", True)
                    for stage in ("ingest", "tokenize")]  # fmt: skip
    assert "| 10,000 MB | 2 | 10.0 s (1000.0 MB/s) | 10.0 s (1000.0 MB/s) | 1,000 / 1,000 MB | — | — |" in (
        bench_tables.markdown(*bench_tables.data_table(bench_tables.load("data-scaling-10gb")["figures"]))
    )
    result("data-scaling-10gb", 10000, {2: 1300}, None)
    assert [row[3] for row in bench_tables.data_summary(bench_tables.load("data-scaling-10gb")["figures"])] == [
        False, False]  # fmt: skip
