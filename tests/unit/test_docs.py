"""The front door and the site: a README a newcomer reads in minutes, without history, and a documentation site
that builds strictly and draws in a browser, offline."""

from __future__ import annotations

import fnmatch
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


def repo_files() -> set[str]:
    """The project's files as a clone has them (and new ones not yet committed), not what a run made here."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    return {path for path in listed if path and (ROOT / path).exists()}


def run_made() -> set[str]:
    """Paths a run makes, which the docs may name though no clone has them: glob patterns."""
    from tasks.plumbing import paths

    outputs = [paths.PREPARED_DIR, paths.INGEST_STATS, paths.TOKENIZER_DIR, paths.TOKENIZED_DIR, paths.DATA_STATS,
               paths.TOKENIZED_DIR / "manifest.json", paths.MODEL_DIR, paths.MODEL_DIR / paths.RUN_RECORD,
               paths.CHECKPOINT_DIR.parent, paths.CHECKPOINT_DIR, paths.EVAL_METRICS, paths.SAMPLES_FILE,
               paths.REGISTERED_FILE]  # fmt: skip
    outputs += [paths.PREPARED_DIR / split / pattern for split in paths.SPLITS for pattern in ("", "*.jsonl")]
    return {str(path) for path in outputs} | {
        "models/.gpt2.tmp-*",  # a stage's output while it is written (tasks/plumbing/outputs.py)
        ".runs/*",  # run workspaces and their locks (flows/workspace.py)
        "mlartifacts",  # the local MLflow store's artifacts
        ".dvc/cache",  # DVC's cache of the outputs
        ".dvc/plots/offline.html",  # the page make install writes for `dvc plots` (tools/plots_template.py)
        "infra/.env",  # the user's copy of infra/.env.example
        "data/corpora/openwebtext",  # where the user puts params/gpt2-124m-openwebtext.yaml's corpus
        "data/corpora/tinyshakespeare/*",  # the held-out split python -m tools.corpora shakespeare-tail writes
        "data/tasks/*",  # benchmark tasks' data python -m tools.task_data fetches (and dvc add's files beside it)
        "models/gpt2-chinese-like",  # what examples/bert_gpt2.py writes in docs/guides/chinese.md
        "data/big.json", "data/big.jsonl", "data/deep.jsonl",  # a user's files in reliability.md's messages
    }  # fmt: skip


def mentioned(path: str) -> list[str]:
    """The paths a mention names: {a,b} expanded, placeholders (<hash>, NNNNN, PID) as globs, no trailing slash."""
    path = re.sub(r"<[^>]*>?|N{3,}|PID", "*", path.rstrip(".,:;)")).rstrip("/")
    braces = re.search(r"\{([^}]*)\}", path)
    if not braces:
        return [path]
    return [n for part in braces.group(1).split(",") for n in mentioned(path.replace(braces.group(0), part, 1))]


def exists(path: str, files: set[str], made: set[str]) -> bool:
    if any(fnmatch.fnmatchcase(path, pattern) for pattern in made):
        return True
    if "*" in path:
        return any(fnmatch.fnmatchcase(file, path) or fnmatch.fnmatchcase(file, path + "/*") for file in files)
    return path in files or any(file.startswith(path + "/") for file in files)


def module_exists(dotted: str) -> bool:
    """tasks.x.y names a module or package, or a name defined at the top of one (tasks.plumbing.redaction.redact)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if source.is_file():
            rest = parts[cut:]
            return not rest or (
                len(rest) == 1
                and bool(re.search(rf"^(?:def|class) {rest[0]}\b|^{rest[0]}\b\s*[:=]", source.read_text(), re.M))
            )
    return False


def docs_text() -> dict[str, str]:
    """README.md, every docs page, and the comments of params.yaml and params/*.yaml."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    texts = {path.relative_to(ROOT).as_posix(): path.read_text() for path in pages}
    for path in [ROOT / "params.yaml", *sorted((ROOT / "params").glob("*.yaml"))]:
        comments = [line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line]
        texts[path.relative_to(ROOT).as_posix()] = "\n".join(comments)
    return texts


def test_every_path_and_module_the_docs_name_exists():
    """A path under one of the project's folders (tasks/x/y.py, data/prepared/validation/) or a module
    (python -m tasks.ingest) named in the README, the docs or the params files' comments is in a clone, or is one
    that a run makes (run_made: the stages' outputs from tasks/plumbing/paths.py, and a few named one by one)."""
    files, made = repo_files(), run_made()
    roots = {file.split("/")[0] for file in files if "/" in file} | {path.split("/")[0] for path in made}
    folders = "|".join(map(re.escape, sorted(roots)))
    path_mention = re.compile(r"(?<![\w./:@~$<-])((?:" + folders + r")/[\w./{},*<>-]*)")
    module_mention = re.compile(r"(?<![\w./-])((?:tasks|flows|tools|tests)(?:\.\w+)+)")
    missing = []
    for page, text in docs_text().items():
        for mention in path_mention.findall(text):
            missing += [f"{page}: {path}" for path in mentioned(mention) if not exists(path, files, made)]
        missing += [f"{page}: {name}" for name in module_mention.findall(text) if not module_exists(name)]
    assert not missing, "named but not in the project:\n" + "\n".join(sorted(set(missing)))


def stage_table(page: str) -> dict[str, list[list[str]]]:
    """A page's table of the stages: stage -> the names in backticks in its module, reads and writes columns."""
    rows = re.findall(r"^\| `(\w+)` \|(.*?)\|(.*?)\|(.*?)\|$", (ROOT / page).read_text(), re.M)
    return {stage: [re.findall(r"`([^`]+)`", cell) for cell in cells] for stage, *cells in rows}


def test_the_stage_tables_say_what_dvc_yaml_says():
    """The README's table of the stages and docs/pipeline.md's: each stage's module, the params it reads (a whole
    section or its keys) and the outputs it writes are those of its stage in dvc.yaml."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def names(entries) -> set[str]:
        return {name for entry in entries for name in ([entry] if isinstance(entry, str) else entry)}

    def within(name: str, other: str) -> bool:
        return name == other or name.startswith(other + ".") or name.startswith(other + "/")

    for page in ("README.md", "docs/pipeline.md"):
        table = stage_table(page)
        assert list(table) == list(stages), page
        for stage, (modules, reads, writes) in table.items():
            spec = stages[stage]
            assert modules[0] == spec["cmd"].split()[-1].replace(".", "/") + ".py", (page, stage)
            assert set(modules) <= set(spec["deps"]), (page, stage)
            params = names(spec["params"])
            said = (page, stage, reads, sorted(params))
            assert all(any(within(key, read) for read in reads) for key in params), said
            assert all(any(within(key, read) for key in params) for read in reads), said
            outs = names(spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []))
            written = [path for write in writes for path in mentioned(write)]
            assert all(any(within(out, path) or within(path, out) for path in written) for out in outs), (page, stage)


def test_the_contributing_layout_names_every_module():
    """docs/contributing.md's layout names each module of tasks/ and its packages, flows/, tools/ and the tests'
    helpers by its name."""
    block = re.search(r"^# Layout\n\n```\n(.*?)```", (ROOT / "docs/contributing.md").read_text(), re.S | re.M)
    entries: dict[str, str] = {}
    folder = None
    for line in block.group(1).splitlines():
        top, inner = re.match(r"(\S+)/\s", line), re.match(r" {15}(\w+)/\s", line)
        if top or inner:
            folder = f"tasks/{inner.group(1)}" if inner else top.group(1)
            entries[folder] = ""
        if folder:
            entries[folder] += line
    files = repo_files()
    for folder in ("tasks", "tasks/training", "tasks/data", "tasks/tracking", "tasks/plumbing", "flows", "tools",
                   "tests"):  # fmt: skip
        inside = {file[len(folder) + 1 :] for file in files if file.startswith(folder + "/")}
        modules = {Path(name).stem for name in inside if "/" not in name and (name.endswith(".py") or "." not in name)}
        if folder == "tests":
            modules |= {name.split("/")[0] for name in inside if "/" in name}
        words = set(re.findall(r"[\w-]+", entries.get(folder, "")))
        assert sorted(modules - words - {"__init__"}) == [], folder
