"""Benchmark tasks of any local GPT-2 folder, scored the way the evaluate stage scores them, beside published GPT-2
scores; and the harness path's examples/s beside the perplexity path's on the same model.

Scores: tasks.evaluation.harness (lm-evaluation-harness on local split files) on --model, each task on its data
under --data (data/tasks/<task>/ by default; fetch it with `python -m tools.task_data`). Throughput: each task's
examples repeated --repeat times, so the harness's fixed cost (its task index, building each task) is taken out:
examples/s is (examples at --repeat - examples at 1) / (seconds at --repeat - seconds at 1). The perplexity path
is tasks.evaluate.evaluate over the project's validation blocks (data/tokenized), an example being one block.
Run: python bench/tasks.py [--model models/gpt2] [--tasks hellaswag,lambada_openai] [--data data/tasks/samples]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import add_save_option, machine, save
from tasks.plumbing.paths import TASK_DATA_DIR, TOKENIZED_DIR

# Published zero-shot scores through lm-evaluation-harness, with where each is stated.
REFERENCES = [
    ("GPT-2 124M", "hellaswag", "acc", 0.2892, "llm.c, dev/data/hellaswag.py"),
    ("GPT-2 124M", "hellaswag", "acc_norm", 0.3114, "llm.c, dev/data/hellaswag.py"),
    ("GPT-2 1.5B (xl)", "hellaswag", "acc_norm", 0.5089, "llm.c, dev/data/hellaswag.py"),
    ("GPT-2 124M", "lambada_openai", "acc", 0.3256, "lm-evaluation-harness issue #2159"),
    ("GPT-2 124M", "lambada_openai", "perplexity", 40.06, "lm-evaluation-harness issue #2159"),
]


def repeated(source: Path, root: Path, times: int) -> None:
    """root/data/tasks/<task>/: each split file of source, its records repeated `times` times."""
    target = root / TASK_DATA_DIR / source.name
    target.mkdir(parents=True, exist_ok=True)
    for split in source.glob("*.jsonl"):
        (target / split.name).write_text(split.read_text(encoding="utf-8") * times, encoding="utf-8")


def harness_rate(model, tokenizer, task: str, data: Path, times: int, batch: int) -> dict:
    from tasks.evaluation import harness
    from tasks.plumbing.params import BenchmarkTask

    runs = []
    for scale in (1, times):
        with tempfile.TemporaryDirectory(prefix="bench-tasks-") as scratch:
            repeated(data / task, Path(scratch), scale)
            started = time.perf_counter()
            found = harness.evaluate(model, tokenizer, [BenchmarkTask(name=task)], batch, Path(scratch))
            runs.append((found.metrics[f"{task}/examples"], time.perf_counter() - started))
    (few, early), (many, late) = runs
    return {"path": f"harness: {task}", "examples": many, "seconds": late, "examples_s": (many - few) / (late - early)}


def perplexity_rate(model, batch: int) -> dict:
    from tasks.evaluate import evaluate, load_validation

    blocks = len(load_validation(TOKENIZED_DIR))
    started = time.perf_counter()
    scored = evaluate(model, TOKENIZED_DIR, batch_size=batch, device="cpu")
    seconds = time.perf_counter() - started
    return {"path": "perplexity (validation blocks)", "examples": blocks, "seconds": seconds,
            "examples_s": blocks / seconds, "tokens_s": scored["eval_tokens"] / seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/gpt2"), help="a save_pretrained GPT-2 folder")
    parser.add_argument("--tasks", default="hellaswag,lambada_openai", help="harness tasks, comma-separated")
    parser.add_argument("--data", type=Path, default=TASK_DATA_DIR, help="the folder holding <task>/<split>.jsonl")
    parser.add_argument("--repeat", type=int, default=20, help="times each task's examples are repeated for speed")
    parser.add_argument("--batch", type=int, default=32)
    add_save_option(parser)
    args = parser.parse_args()
    from tasks.evaluation import harness
    from tasks.plumbing.params import BenchmarkTask
    from tasks.tracking.loading import load_pretrained

    print(f"machine: {machine()}", flush=True)
    model, tokenizer = load_pretrained(str(args.model), key=str(args.model))
    names = args.tasks.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as scratch:  # the data as it is, under a data/tasks
        for name in names:
            shutil.copytree(args.data / name, Path(scratch) / TASK_DATA_DIR / name)
        tasks = [BenchmarkTask(name=name) for name in names]
        scores = harness.evaluate(model, tokenizer, tasks, args.batch, Path(scratch)).metrics
    for key, value in scores.items():
        print(f"{args.model}: {key} {value:.4g}", flush=True)
    rates = [perplexity_rate(model, args.batch)] if (TOKENIZED_DIR / "dataset_dict.json").exists() else []
    rates += [harness_rate(model, tokenizer, name, args.data, args.repeat, args.batch) for name in names]
    for rate in rates:
        print(f"{rate['path']}: {rate['examples']} examples in {rate['seconds']:.1f} s, {rate['examples_s']:.1f}/s")
    references = [dict(zip(("model", "task", "metric", "value", "source"), row, strict=True)) for row in REFERENCES]
    save(args.save, {"model": str(args.model), "data": str(args.data), "scores": scores, "rates": rates,
                     "references": [r for r in references if r["task"] in names]})  # fmt: skip


if __name__ == "__main__":
    main()
