"""Fetch lm-evaluation-harness tasks' data once, on a machine that reaches the Hugging Face hub, into data/tasks.

Each split a task names is written as data/tasks/<task>/<split>.jsonl, in the hub dataset's own fields: what
evaluate.tasks reads offline. Track it with `dvc add data/tasks/<task>` and `dvc push`, so every other machine
gets the same bytes with `dvc pull`.
Run: python -m tools.task_data hellaswag lambada_openai xcopa_zh [--out data/tasks]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.evaluation.harness import INSTALL, SPLIT_KEYS
from tasks.plumbing.paths import TASK_DATA_DIR


def fetch(name: str, out: Path, index) -> list[Path]:
    """Write each split of one task; the files written."""
    import datasets

    entry = index.get(name)
    if entry is None or entry.kind.name != "TASK" or entry.cfg.get("dataset_path") in (None, "json"):
        raise SystemExit(f"{name}: not a harness task with a hub dataset; `lm-eval ls tasks` lists them")
    config = entry.cfg
    written = []
    # The harness's own pin where its task config has one; the bytes written are pinned by DVC's hash either way.
    revision = (config.get("dataset_kwargs") or {}).get("revision")
    for split in sorted({config[key] for key in SPLIT_KEYS if config.get(key)}):
        try:
            rows = datasets.load_dataset(
                config["dataset_path"], config.get("dataset_name"), split=split, revision=revision
            )
        except (ConnectionError, OSError, ValueError) as error:
            raise SystemExit(
                f"{name}: {config['dataset_path']} split {split} could not be fetched ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); run this where the Hugging Face hub answers"
            ) from None
        path = out / name / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_json(str(path), force_ascii=False)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+", help="harness task names (lm-eval ls tasks)")
    parser.add_argument("--out", type=Path, default=TASK_DATA_DIR, help="where the task folders go")
    args = parser.parse_args()
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit(f"fetching tasks needs lm-evaluation-harness: {INSTALL}") from None
    index = TaskManager().task_index
    for name in args.tasks:
        for path in fetch(name, args.out, index):
            print(f"{name}: {path}", file=sys.stderr)
    print(f"now: dvc add {' '.join(str(args.out / name) for name in args.tasks)}", file=sys.stderr)


if __name__ == "__main__":
    main()
