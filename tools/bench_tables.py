"""docs/benchmarks.md's tables, written from the bench scripts' saved figures (bench/results/<case>.json).

Each case below is one bench command. `make bench` runs the cases this machine can run (`--run`) and then
rewrites every block between `<!-- bench: CASE -->` and `<!-- /bench -->` in docs/benchmarks.md; `make
bench-tables` only rewrites. A case without saved figures reads "not measured" with the exact command. A test
fails when the committed page differs from what this writes, or when a figure is typed outside the blocks.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench/results"
PAGE = ROOT / "docs/benchmarks.md"
BLOCK = re.compile(r"(<!-- bench: (?P<case>[\w-]+) -->\n).*?(<!-- /bench -->)", re.S)

Table = tuple[list[str], list[list[str]]]


@dataclass(frozen=True)
class Case:
    command: str
    device: str  # "cpu" runs anywhere; "cuda" needs a GPU
    table: Callable[[Any], Table | list[Table]]  # one table, or several shown one after another
    summary: Callable[[Any], list[tuple[str, str, str, bool]]]  # (figure, target, measured, met)


def x(value: float) -> str:
    return f"{value:.3f} ×"


def train_table(f: dict) -> Table:
    shape = f"{f['layers']} × {f['width']}, {f['parameters'] / 1e6:,.1f} M parameters, vocabulary {f['vocab']:,}"
    compiled = (", compiled" if f["compile"] else "") + (f", dropout {f['dropout']}" if f.get("dropout") else "")
    run = f"block {f['block']}, batch {f['batch']}, {f['device']} {f['precision']}{compiled}"
    row = [shape, run, f"{f['project_tokens_s']:,.0f}", f"{f['bare_tokens_s']:,.0f}", x(f["ratio"]), f"{f['mfu']:.1%}"]
    head = ["model", "run", "project tokens/s", "bare loop tokens/s", "ratio", "project MFU"]
    return head, [row]


def train_summary(f: dict) -> list:
    return [("train stage tokens/s against a bare PyTorch loop", "≥ 0.9 ×", x(f["ratio"]), f["ratio"] >= 0.9)]


FLAGSHIP_TOKENS = 19_073 * 524_288  # params/gpt2-124m-openwebtext.yaml: max_steps x tokens a step


def gpu_tables(f: dict) -> list[Table]:
    """The measurement, and what it makes of the flagship recipe's 10 B tokens on 1 and 8 GPUs (8: at best 8 x)."""
    hours = FLAGSHIP_TOKENS / f["project_tokens_s"] / 3600
    estimate = [
        ["params/gpt2-124m-openwebtext.yaml on 1 GPU", f"{FLAGSHIP_TOKENS / 1e9:.1f} B", f"{hours:,.1f} h"],
        [
            "the same on 8 GPUs, if data-parallel scaled perfectly",
            f"{FLAGSHIP_TOKENS / 1e9:.1f} B",
            f"{hours / 8:,.1f} h",
        ],
    ]
    return [train_table(f), (["run", "tokens", "time at the measured tokens/s"], estimate)]


def gpu_summary(f: dict) -> list:
    return [("GPT-2 124M MFU on one GPU, block 1024, bf16", "≥ 40%", f"{f['mfu']:.1%}", f["mfu"] >= 0.40)]


def eval_table(f: dict) -> Table:
    peaks = f["peak_rss_mb"]
    head = ["model", "evaluate tokens/s", "bare loop tokens/s", "ratio", "peak RSS 1 ×", "peak RSS 10 ×"]
    model = f"{f['layers']} × {f['width']}, block {f['block']}, batch {f['batch']}"
    rates = [f"{f['stage_tokens_s']:,.0f}", f"{f['bare_tokens_s']:,.0f}", x(f["ratio"])]
    return head, [[model, *rates, f"{peaks['1']:,.0f} MB", f"{peaks['10']:,.0f} MB"]]


def eval_summary(f: dict) -> list:
    growth = f["peak_rss_mb"]["10"] / f["peak_rss_mb"]["1"]
    return [
        ("evaluate tokens/s against a bare `inference_mode` loop", "≥ 0.9 ×", x(f["ratio"]), f["ratio"] >= 0.9),
        ("evaluate peak memory, 10 × against 1 × the tokens", "≤ 1.1 ×", x(growth), growth <= 1.1),
    ]


def scaling_table(rows: list) -> Table:
    head = ["text", "stage", "bare `encode_batch`", "ratio", "hand-written script", "ratio", "stage peak RSS (private)"]
    body = []
    for r in rows:
        stage, bare, script = r["stage"], r["bare"], r["script"]
        body.append([
            f"{r['text_mb']:,.0f} MB",
            f"{stage['mb_per_s']:.2f} MB/s ({stage['seconds']:.1f} s)",
            f"{bare['mb_per_s']:.2f} MB/s",
            x(r["ratio"]),
            f"{script['mb_per_s']:.2f} MB/s",
            x(r["ratio_script"]),
            f"{stage['peak_rss_mb']:,.0f} MB ({stage['peak_private_mb']:,.0f} MB)",
        ])  # fmt: skip
    return head, body


def scaling_summary(rows: list) -> list:
    worst = min(r["ratio"] for r in rows)
    return [("tokenize stage against bare `encode_batch`, every size", "≥ 0.8 ×", x(worst), worst >= 0.8)]


def whole_table(f: dict) -> Table:
    m = f["median_s"]
    row = [f"{f['text_mb']:.1f} MB", f"{m['dvc repro']:.1f} s", f"{m['script']:.1f} s", x(m["script"] / m["dvc repro"])]
    return ["text", "`dvc repro` of the stage", "hand-written script", "stage speed / script speed"], [row]


def whole_summary(f: dict) -> list:
    ratio = f["median_s"]["script"] / f["median_s"]["dvc repro"]
    return [("tokenize as a user waits for it, against a hand-written script", "≥ 0.8 ×", x(ratio), ratio >= 0.8)]


def overhead_table(f: dict) -> Table:
    noop, flow, logged, reg = f["noop"], f["flow"], f["logging"], f["register"]
    rows = [
        [
            "no-op `dvc repro`",
            f"{noop['noop_repro_s']:.2f} s ({x(noop['ratio'])})",
            f"a one-stage DVC project's no-op `dvc repro`: {noop['one_stage_noop_s']:.2f} s",
        ],
        [
            "Prefect flow beyond its stages, running server",
            f"{flow['running_overhead_first_s']:.2f} s first run, {flow['running_overhead_s']:.2f} s after",
            "the same five `dvc repro --single-item` commands in a loop",
        ],
        [
            "Prefect flow beyond its stages, ephemeral server",
            f"{flow['ephemeral_overhead_first_s']:.2f} s first run, {flow['ephemeral_overhead_s']:.2f} s after",
            "the same loop",
        ],
        [
            f"MLflow logging of {logged['steps']:,} steps' metrics",
            f"training waits {logged['waited_s']:.2f} s on MLflow ({logged['share_waited']:.2%}); "
            f"{logged['in_mlflow_s']:.2f} s in MLflow calls in their own thread; "
            f"training {logged['share_ab']:+.2%} against the bare reference",
            f"the same training without MLflow: {logged['bare_s']:.1f} s",
        ],
        [
            f"register a {reg['parameters'] / 1e6:.0f} M-parameter GPT-2",
            f"{reg['register_s']:.2f} s ({x(reg['ratio'])})",
            f"`save_pretrained`: {reg['save_s']:.2f} s",
        ],
    ]
    return ["figure", "measured", "bare reference"], rows


def overhead_summary(f: dict) -> list:
    noop, share, ratio = f["noop"]["ratio"], f["logging"]["share_waited"], f["register"]["ratio"]
    running, ab = f["flow"]["running_overhead_s"], f["logging"]["share_ab"]
    return [
        # a ratio, not seconds: DVC's own start-up is most of a no-op and differs from machine to machine
        ("no-op `dvc repro` against a one-stage DVC project's", "≤ 1.5 ×", x(noop), noop <= 1.5),
        ("Prefect flow overhead, running server", "≤ 5 s", f"{running:.2f} s", running <= 5),
        ("MLflow logging every step, training's wait on it", "≤ 2%", f"{share:.2%}", share <= 0.02),
        # the sends' own work, in their thread, still takes CPU from training where the cores are few
        ("MLflow logging every step, training against none", "≤ 2%", f"{ab:+.2%}", ab <= 0.02),
        ("register against `save_pretrained`", "≤ 2 ×", x(ratio), ratio <= 2),
    ]


def data_table(rows: list) -> Table:
    head = ["text", "workers", "ingest", "tokenize", "peak private memory ingest / tokenize", "speed-up", "same bytes"]
    body = []
    for r in rows:
        runs = {int(workers): run for workers, run in r["runs"].items()}
        one = runs[min(runs)]
        for workers, run in sorted(runs.items()):
            total, base = (sum(run[stage]["seconds"] for stage in ("ingest", "tokenize")) for run in (run, one))
            body.append([
                f"{r['text_mb']:,.0f} MB",
                str(workers),
                f"{run['ingest']['seconds']:.1f} s ({r['text_mb'] / run['ingest']['seconds']:.1f} MB/s)",
                f"{run['tokenize']['seconds']:.1f} s ({r['text_mb'] / run['tokenize']['seconds']:.1f} MB/s)",
                f"{run['ingest']['peak_private_mb']:,.0f} / {run['tokenize']['peak_private_mb']:,.0f} MB",
                x(base / total) if len(runs) > 1 else "—",
                "—" if r["identical"] is None else "yes" if r["identical"] else "**no**",
            ])  # fmt: skip
    return head, body


def data_dvc_table(rows: list) -> Table:
    head = ["text", "input on disk", "prepared", "tokenized", "`dvc status`", "no-op `dvc repro`"]
    body = [
        [
            f"{r['text_mb']:,.0f} MB",
            f"{r['input_mb']:,.0f} MB",
            f"{r['output_mb']['data/prepared']:,.0f} MB",
            f"{r['output_mb']['data/tokenized']:,.0f} MB",
            f"{r['dvc_status_s']:.1f} s",
            f"{r['dvc_repro_noop_s']:.1f} s",
        ]
        for r in rows
    ]
    return head, body


def data_both(rows: list) -> list[Table]:
    return [data_table(rows), data_dvc_table(rows)]


def data_summary(rows: list) -> list:
    out = []
    for r in rows:
        runs = {int(workers): run for workers, run in r["runs"].items()}
        if 1 in runs and 2 in runs:
            speed = sum(runs[1][s]["seconds"] for s in runs[1]) / sum(runs[2][s]["seconds"] for s in runs[2])
            out.append((f"ingest and tokenize, {r['text_mb']:,.0f} MB: 2 workers against 1", "≥ 1.8 ×", x(speed),
                        speed >= 1.8))  # fmt: skip
        if r["identical"] is not None:  # None: one worker count, nothing to compare
            out.append((f"the same outputs for every worker count, {r['text_mb']:,.0f} MB", "yes",
                        "yes" if r["identical"] else "no", r["identical"]))  # fmt: skip
        out.extend(_memory_against_smaller(r, runs))
    return out


def _memory_against_smaller(row: dict, runs: dict) -> list:
    """A larger corpus's peak memory over the data-scaling case's with the same workers: flat is at most 1.5 times."""
    smaller = load("data-scaling")
    if smaller is None or row["text_mb"] <= smaller["figures"][0]["text_mb"]:
        return []
    base = smaller["figures"][0]
    out = []
    for workers, run in runs.items():
        reference = {int(count): figures for count, figures in base["runs"].items()}.get(workers)
        for stage in ("ingest", "tokenize") if reference is not None else ():
            ratio = run[stage]["peak_private_mb"] / reference[stage]["peak_private_mb"]
            out.append((f"{stage}'s peak memory, {row['text_mb']:,.0f} MB against {base['text_mb']:,.0f} MB, "
                        f"{workers} workers", "≤ 1.5 ×", x(ratio), ratio <= 1.5))  # fmt: skip
    return out


def compressed_table(rows: list) -> Table:
    head = ["text", "as", "input on disk", "ingest (2 workers)", "ingest peak private memory",
            "bare gzip + json.loads", "bare peak memory"]  # fmt: skip
    body = [
        [
            f"{r['text_mb']:,.0f} MB",
            f"{r['layout']} ({r['files']:,})",
            f"{r['input_mb']:,.0f} MB",
            f"{r['ingest']['seconds']:.1f} s ({r['text_mb'] / r['ingest']['seconds']:.1f} MB/s)",
            f"{r['ingest']['peak_private_mb']:,.0f} MB",
            f"{r['bare']['seconds']:.1f} s ({r['text_mb'] / r['bare']['seconds']:.1f} MB/s)",
            f"{r['bare']['peak_private_mb']:,.0f} MB",
        ]
        for r in rows
    ]
    return head, body


def compressed_summary(rows: list) -> list:
    """Flat memory: the largest corpus's ingest peak at most 1.5 times the smallest's, for each layout."""
    out = []
    for layout in dict.fromkeys(r["layout"] for r in rows):
        same = sorted((r for r in rows if r["layout"] == layout), key=lambda r: r["text_mb"])
        small, large = same[0], same[-1]
        if large is small:
            continue
        ratio = large["ingest"]["peak_private_mb"] / small["ingest"]["peak_private_mb"]
        out.append((f"ingest's peak memory on .jsonl.gz as {layout}, {large['text_mb']:,.0f} MB against "
                    f"{small['text_mb']:,.0f} MB", "≤ 1.5 ×", x(ratio), ratio <= 1.5))  # fmt: skip
    return out


def lora_table(f: dict) -> Table:
    """One row a method; the model and the run head the first column."""
    methods, adapters = f["methods"], f["lora"]
    full = methods["full"]
    model = (
        f"{f['layers']} × {f['width']}, {full['parameters'] / 1e6:,.1f} M parameters, vocabulary {f['vocab']:,}; "
        f"block {f['block']}, batch {f['batch']}, {full['device']} {full['precision']}"
    )
    names = {
        "full": "full fine-tuning",
        "lora": f"LoRA: rank {adapters['rank']}, alpha {adapters['alpha']:g}, dropout {adapters['dropout']:g} on "
        f"{', '.join(adapters['target_modules'])}",
    }
    head = [model, "trainable parameters", "peak RSS (of it training)", "memory check's estimate", "time per step",
            "training loss at step 1", f"validation loss after {f['warmup'] + f['steps']} steps"]  # fmt: skip
    rows = [
        [
            names[method],
            f"{m['trainable_parameters']:,}",
            f"{m['peak_rss_mb']:,.0f} MB ({m['training_mb']:,.0f} MB)",
            f"{m['estimate_mb']:,.0f} MB",
            f"{m['step_s']:.2f} s",
            f"{m['first_loss']:.3f}",
            f"{m['eval_loss']:.3f}",
        ]
        for method, m in methods.items()
    ]
    return head, rows


def lora_summary(f: dict) -> list:
    # Frozen weights keep 4 of the 16 bytes a trained one does; their weights' gradients are 2 of the 6 FLOPs.
    memory, time = f["memory_ratio"], f["time_ratio"]
    return [
        ("LoRA's peak memory against full fine-tuning, gpt2-medium's shape", "≤ 0.5 ×", x(memory), memory <= 0.5),
        ("LoRA's time per step against full fine-tuning, gpt2-medium's shape", "≤ 0.8 ×", x(time), time <= 0.8),
    ]


def pruning_table(f: dict) -> Table:
    """One row a study: the reference without a pruner, then the pruner under test."""
    head = [f"{f['trials']} trials of up to {f['steps']} steps, {f['startup']} before any is pruned", "wall time",
            "complete / pruned / failed", "steps trained", "best bits per byte"]  # fmt: skip
    names = {"none": "no pruner (every trial to the end)"}
    rows = [
        [
            names.get(s["pruner"], f"{s['pruner']} pruner"),
            f"{s['seconds']:,.0f} s",
            f"{s['complete']} / {s['pruned']} / {s['failed']}",
            f"{s['steps_trained']:,}",
            f"{s['best']:.3f}",
        ]
        for s in f["studies"]
    ]
    return head, rows


def pruning_summary(f: dict) -> list:
    full, pruned = f["studies"]
    time, best = pruned["seconds"] / full["seconds"], pruned["best"] / full["best"]
    return [
        ("a sweep's wall time with the pruner against without, same trials", "< 1 ×", x(time), time < 1),
        ("the best value it finds against without (lower is better)", "≤ 1.01 ×", x(best), best <= 1.01),
    ]


def schedule(keys: dict) -> str:
    return f"{keys['train.learning_rate']:g}, {keys['train.lr_scheduler']}, {keys['train.warmup_steps']}"


def recipe_table(f: dict) -> Table:
    """One row a recipe: the one before the search (the reference) and the default."""
    names = {"previous": "the recipe before the search", "default": "the default (params.yaml)"}
    head = ["recipe on Shakespeare's held-out last 10%", "steps", "learning rate, schedule, warmup",
            "training time", "bits per character"]  # fmt: skip
    rows = [
        [
            names[r["recipe"]],
            f"{r['steps']:,}",
            schedule(r["keys"]),
            f"{r['train_seconds']:,.0f} s",
            f"{r['bits_per_char']:.3f}",
        ]
        for r in f["recipes"]
    ]
    return head, rows


def recipe_summary(f: dict) -> list:
    default = next(r for r in f["recipes"] if r["recipe"] == "default")
    bits, seconds = default["bits_per_char"], default["train_seconds"]
    goal_bits, goal_seconds = f["goal_bits_per_char"], f["goal_seconds"]
    return [
        ("the default recipe on Shakespeare's held-out tail, bits per character", f"≤ {goal_bits:.2f}",
         f"{bits:.3f}", bits <= goal_bits),
        ("its training time", f"≤ {goal_seconds} s", f"{seconds:,.0f} s", seconds <= goal_seconds),
    ]  # fmt: skip


def tasks_tables(f: dict) -> list[Table]:
    """The model's task scores beside the published GPT-2 rows; then examples/s of the harness and perplexity paths."""
    scores = f["scores"]
    rows = []
    for key, value in scores.items():
        task, _, metric = key.partition("/")
        if metric in ("examples",) or metric.endswith("_stderr"):
            continue
        error = scores.get(f"{key}_stderr")
        shown = "—" if error is None else f"{error:.3g}"
        model = f"`{f['model']}` (data: `{f['data']}`)"
        rows.append([model, task, metric, f"{value:.4g}", shown, str(scores[f"{task}/examples"]), "measured here"])
    rows += [[r["model"], r["task"], r["metric"], f"{r['value']:.4g}", "", "", r["source"]] for r in f["references"]]
    head = ["model", "task", "metric", "value", "standard error", "examples", "source"]
    rates = [[r["path"], f"{r['examples']:,}", f"{r['seconds']:.1f} s", f"{r['examples_s']:,.1f}"] for r in f["rates"]]
    return [(head, rows), (["path", "examples", "time", "examples a second"], rates)]


def tasks_summary(f: dict) -> list:
    return []  # what it measures has no target: the rows sit beside the published ones


def serving_table(f: dict) -> Table:
    """Each server at each level of closed-loop clients."""
    head = [
        "server",
        "clients",
        "answers/s",
        "tokens/s",
        "p50",
        "p99",
        "first token p50",
        "refused (503)",
        "other errors",
    ]
    rows = []
    for r in f["rows"]:
        first = "—" if r.get("first_token_p50") is None else f"{r['first_token_p50']:.3f} s"
        rows.append(
            [
                r["server"],
                str(r["clients"]),
                f"{r['requests_s']:,.1f}",
                f"{r['tokens_s']:,.0f}",
                f"{r['p50']:.3f} s",
                f"{r['p99']:.3f} s",
                first,
                f"{r['refused']:,}",
                f"{r['errors']:,}",
            ]
        )
    return head, rows


def serving_summary(f: dict) -> list:
    """The goals: at 32 clients 5 x the MLflow server's tokens/s; p99 at 8 no worse than the MLflow server's at 8."""
    found = {(r["server"].split(" (")[0], r["clients"]): r for r in f["rows"]}
    old, new = "serve-model --api mlflow", "serve-model"
    if (old, 32) not in found or (new, 32) not in found:
        return []
    ratio = found[new, 32]["tokens_s"] / found[old, 32]["tokens_s"]
    p99_new, p99_old = found[new, 8]["p99"], found[old, 8]["p99"]
    errors = sum(r["errors"] for r in f["rows"] if r["server"].startswith(new))
    return [
        ("serve-model tokens/s at 32 clients against --api mlflow", "≥ 5 ×", x(ratio), ratio >= 5),
        ("serve-model p99 at 8 clients against --api mlflow at 8", "no worse", f"{p99_new:.2f} s vs {p99_old:.2f} s",
         p99_new <= p99_old),
        ("serve-model errors other than 503 under load", "0", str(errors), errors == 0),
    ]  # fmt: skip


GPT2_124M = "--layers 12 --width 768 --heads 12 --block 1024 --vocab 50257"
CASES = {
    "train-cpu": Case("python bench/train_throughput.py --save train-cpu", "cpu", train_table, train_summary),
    "eval-cpu": Case("python bench/eval_throughput.py --save eval-cpu", "cpu", eval_table, eval_summary),
    "tokenize-scaling": Case(
        "python bench/tokenize_scaling.py --sizes 10,100 --save tokenize-scaling", "cpu", scaling_table, scaling_summary
    ),
    "tokenize-whole": Case(
        "python bench/tokenize_whole.py --mb 50 --rounds 3 --save tokenize-whole", "cpu", whole_table, whole_summary
    ),
    "overhead": Case("python bench/overhead.py --steps 2000 --save overhead", "cpu", overhead_table, overhead_summary),
    "data-scaling": Case(
        "python bench/data_scaling.py --sizes-mb 1000 --workers 1,2 --save data-scaling", "cpu", data_both, data_summary
    ),
    "data-scaling-10gb": Case(
        "python bench/data_scaling.py --sizes-mb 10000 --workers 2 --save data-scaling-10gb",
        "cpu",
        data_both,
        data_summary,
    ),
    "ingest-compressed": Case(
        "python bench/ingest_compressed.py --sizes-mb 300,3000 --save ingest-compressed",
        "cpu",
        compressed_table,
        compressed_summary,
    ),
    "lora": Case("python bench/lora.py --save lora", "cpu", lora_table, lora_summary),
    "pruning": Case("python bench/pruning.py --save pruning", "cpu", pruning_table, pruning_summary),
    "recipe": Case("python bench/recipe.py --save recipe", "cpu", recipe_table, recipe_summary),
    "tasks": Case("python bench/tasks.py --data data/tasks/samples --save tasks", "cpu", tasks_tables, tasks_summary),
    "serving": Case("python bench/serving.py --save serving", "cpu", serving_table, serving_summary),
    "train-gpu-124m": Case(
        f"python bench/train_throughput.py {GPT2_124M} --batch 32 --precision bf16 --compile --device cuda "
        "--save train-gpu-124m",
        "cuda",
        gpu_tables,
        gpu_summary,
    ),
    # The levers towards llm.c's pace, each its own row (the same command with one thing changed).
    "train-gpu-124m-batch64": Case(
        f"python bench/train_throughput.py {GPT2_124M} --batch 64 --precision bf16 --compile --device cuda "
        "--save train-gpu-124m-batch64",
        "cuda",
        gpu_tables,
        gpu_summary,
    ),
    "train-gpu-124m-dropout": Case(
        f"python bench/train_throughput.py {GPT2_124M} --batch 32 --precision bf16 --compile --device cuda "
        "--dropout 0.1 --save train-gpu-124m-dropout",
        "cuda",
        gpu_tables,
        gpu_summary,
    ),
    "train-gpu-124m-cut-cross-entropy": Case(
        f"python bench/train_throughput.py {GPT2_124M} --batch 32 --precision bf16 --compile --device cuda "
        "--loss-kernel cut_cross_entropy --save train-gpu-124m-cut-cross-entropy",
        "cuda",
        gpu_tables,
        gpu_summary,
    ),
    "train-gpu-124m-fp8-head": Case(
        f"python bench/train_throughput.py {GPT2_124M} --batch 32 --precision bf16 --compile --device cuda "
        "--fp8-lm-head --save train-gpu-124m-fp8-head",
        "cuda",
        gpu_tables,
        gpu_summary,
    ),
}


def load(case: str) -> dict | None:
    path = RESULTS / f"{case}.json"
    return json.loads(path.read_text()) if path.exists() else None


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine_of(result: dict) -> str:
    """The machine a result was measured on, in words: two results with the same words came from alike machines."""
    on = result["measured_on"]
    cpu = f"{on['cores']} cores ({on['cpu']}, {'with' if on['native_bf16'] else 'without'} native bf16)"
    device = f"{on['gpu']}, " if on["gpu"] else ""
    return f"{device}{cpu}, {on['memory_gib']} GiB"


def where(result: dict) -> str:
    on = result["measured_on"]
    return (
        f"Measured on {on['date']}: {machine_of(result)}; python {on['python']}, "
        f"torch {on['torch']}, transformers {on['transformers']}. Command: `{result['command']}`"
    )


def block(case: str) -> str:
    """One case's generated text: its table and where it was measured, or how to measure it."""
    if case == "summary":
        return summary()
    result = load(case)
    if result is None:
        on = " on a machine with a GPU" if CASES[case].device == "cuda" else ""
        return f"Not measured: run `{CASES[case].command}`{on}, then `make bench-tables`."
    tables = CASES[case].table(result["figures"])
    tables = tables if isinstance(tables, list) else [tables]
    return "\n\n".join([*(markdown(*table) for table in tables), where(result)])


def summary() -> str:
    """Every case's figures against their targets, each row naming the machine it was measured on.

    Cases measured on different machines (one CPU with native bf16, one without) are told apart by a letter, so a
    reader never takes two machines' rows for one's."""
    rows, machines = [], {}
    for name, case in CASES.items():
        result = load(name)
        if result is None:
            rows.append([f"`{name}`", "", "not measured", "—", ""])
            continue
        letter = machines.setdefault(machine_of(result), "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[len(machines)])
        for figure, target, measured, met in case.summary(result["figures"]):
            rows.append([figure, target, measured, "yes" if met else "**no**", letter])
    legend = "; ".join(f"{letter}: {machine}" for machine, letter in machines.items())
    return markdown(["figure", "target", "measured", "met", "machine"], rows) + f"\n\nMachines: {legend}."


def render(page: str) -> str:
    """The page with every generated block rewritten from bench/results."""

    def fill(match: re.Match) -> str:
        case = match["case"]
        if case != "summary" and case not in CASES:
            raise SystemExit(f"{PAGE.relative_to(ROOT)}: unknown bench case {case!r}; known: {', '.join(CASES)}")
        return f"{match[1]}{block(case)}\n{match[3]}"

    return BLOCK.sub(fill, page)


def run(names: list[str]) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in names:
        case = CASES[name]
        if case.device != device and case.device != "cpu":
            print(f"skipped {name}: needs {case.device}")
            continue
        print(f"$ {case.command}", flush=True)
        subprocess.run([sys.executable, *shlex.split(case.command)[1:]], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cases = ", ".join(CASES)
    parser.add_argument("--run", nargs="*", metavar="CASE", help=f"run these cases first (none named: all): {cases}")
    args = parser.parse_args()
    if args.run is not None:
        run(args.run or list(CASES))
    PAGE.write_text(render(PAGE.read_text()))
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
