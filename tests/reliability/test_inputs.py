"""Bad input: one error line naming the file, line, key or value, and nothing lost. Each case runs the stage that
refuses it in-process, through the same run_cli a stage's `python -m` uses; the cases in THROUGH_DVC also go
through `dvc repro` (an interpreter per stage, DVC recording what ran before the failure)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import BIN, merge, run, write_params

pytestmark = pytest.mark.slow

# name: (files to write under the project, params overrides, the error line it must give)
BAD_DATA = {
    "missing source": (
        {},
        ["data/corpora/bad/missing.txt"],
        r"data\.sources\[0\]: 'data/corpora/bad/missing\.txt' does not exist",
    ),
    "glob matching nothing": (
        {},
        ["data/corpora/bad/*.nothing"],
        r"data\.sources\[0\]: 'data/corpora/bad/\*\.nothing' matches no files",
    ),
    "empty file": (
        {"data/corpora/bad/empty.txt": b""},
        ["data/corpora/bad/empty.txt"],
        r"no text in data/corpora/bad/empty\.txt \(empty, or only",
    ),
    "whitespace only": (
        {"data/corpora/bad/ws.txt": b"  \n\n\t \n"},
        ["data/corpora/bad/ws.txt"],
        r"no text in data/corpora/bad/ws\.txt",
    ),
    "binary file": (
        {"data/corpora/bad/image.txt": bytes([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0xFF, 0x00] * 50)},
        ["data/corpora/bad/image.txt"],
        r"data/corpora/bad/image\.txt:1: not valid UTF-8 \(byte 0 of the file\); convert it to UTF-8",
    ),
    "invalid UTF-8": (
        {"data/corpora/bad/latin1.txt": "Some text.\n\nCafé au lait\n".encode("latin-1")},
        ["data/corpora/bad/latin1.txt"],
        r"data/corpora/bad/latin1\.txt:3: not valid UTF-8 \(byte 15 of the file\)",
    ),
    "malformed JSONL line": (
        {"data/corpora/bad/records.jsonl": b'{"text": "one"}\n{"text": "two"\n{"text": "three"}\n'},
        ["data/corpora/bad/records.jsonl"],
        r"data/corpora/bad/records\.jsonl:2: not valid JSON \(.+\); fix or remove the line",
    ),
    "JSON without the text field": (
        {"data/corpora/bad/records.json": json.dumps([{"text": "a"}, {"body": "b"}]).encode()},
        ["data/corpora/bad/records.json"],
        r"data/corpora/bad/records\.json: record 1: record has no field 'text' \(data\.text_field\); its fields are: "
        r"body",
    ),
    "CSV without the column": (
        {"data/corpora/bad/table.csv": b"id,body\n1,hello\n"},
        ["data/corpora/bad/table.csv"],
        r"data/corpora/bad/table\.csv: no column 'text' \(data\.text_field\); columns are: id, body",
    ),
    "unsupported file type": (
        {"data/corpora/bad/book.pdf": b"%PDF-1.7"},
        ["data/corpora/bad/book.pdf"],
        r"data\.sources\[0\]: 'data/corpora/bad/book\.pdf' has an unsupported type; use \.csv, \.json, \.jsonl",
    ),
}


THROUGH_DVC = {"missing source", "malformed JSONL line", "wrong type", "corpus smaller than one block"}


def refuse(trained, case: str, stage: str, overrides: dict):
    return trained.repro(overrides) if case in THROUGH_DVC else trained.stage(stage, overrides)


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_and_loses_nothing(trained, case):
    files, sources, message = BAD_DATA[case]
    for name, content in files.items():
        (trained.project / name).parent.mkdir(exist_ok=True)
        (trained.project / name).write_bytes(content)
    result = refuse(trained, case, "ingest", {"data": {"sources": sources}})
    trained.assert_failed_cleanly(result, message)


BAD_PARAMS = {
    "wrong type": (
        {"train": {"max_steps": "many"}},
        r"params\.yaml: train\.max_steps: input should be a valid integer",
    ),
    "unknown key": ({"train": {"learnig_rate": 0.1}}, r"train\.learnig_rate: unknown key; check its spelling"),
    "zero": ({"train": {"batch_size": 0}}, r"train\.batch_size: input should be greater than 0 \(got 0\)"),
    "negative": ({"train": {"learning_rate": -1.0}}, r"train\.learning_rate: input should be greater than 0"),
    "block_size > n_positions": (
        {"tokenizer": {"block_size": 128}},
        r"params\.yaml: tokenizer\.block_size: 128 exceeds model\.config\.n_positions \(64\); lower block_size",
    ),
    "n_embd % n_head": (
        {"model": {"config": {"n_embd": 65}}},
        r"model\.config\.n_embd \(65\) must be divisible by model\.config\.n_head \(2\)",
    ),
    "vocab too small for the specials": (
        {"tokenizer": {"vocab_size": 100}},
        r"tokenizer\.vocab_size: 100 is too small for byte-level BPE; it needs at least 258",
    ),
    "corpus smaller than one block": (
        {"data": {"sources": ["data/corpora/bad/tiny.txt"], "validation_fraction": 0.5, "seed": 3}},
        r"data/prepared/(train|validation): fewer tokens than one block \(tokenizer\.block_size=64",
    ),
    "empty validation split": (
        {"data": {"validation_fraction": 0.0001}},
        r"data\.sources: the validation split is empty \(\d+ records kept in all\)",
    ),
    "hub model offline": (
        {"model": {"init": "pretrained", "name_or_path": "gpt2"}, "tokenizer": {"kind": "pretrained"}},
        r"gpt2.+offline, point it at a local save_pretrained folder",
    ),
    "missing registered model": (
        {"model": {"init": "pretrained", "name_or_path": "models:/no-such-model@champion"}},
        r"model\.name_or_path: models:/no-such-model@champion is not in the MLflow registry at sqlite:////\S+/mlflow\.db",
    ),
    "missing alias": (
        {"model": {"init": "pretrained", "name_or_path": "models:/gpt2-lm@nonexistent"}},
        r"model\.name_or_path: models:/gpt2-lm@nonexistent is not in the MLflow registry",
    ),
}


# The stage that refuses a case (every stage validates the whole params.yaml: the first to run refuses those).
REFUSED_BY = {
    "vocab too small for the specials": "tokenize",
    "empty validation split": "ingest",
    "hub model offline": "tokenize",
    "missing registered model": "train",
    "missing alias": "train",
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_params_are_one_line_and_lose_nothing(trained, case):
    overrides, message = BAD_PARAMS[case]
    (trained.project / "data/corpora/bad").mkdir(exist_ok=True)
    (trained.project / "data/corpora/bad/tiny.txt").write_text("Too short for a block.\n\nAnother line.\n")
    result = refuse(trained, case, REFUSED_BY.get(case, "ingest"), overrides)
    # Stages before the failing one that succeed are recorded by DVC: the tiny corpus passes ingest, and with a
    # models:/ URI tokenize (which reads model.*) reruns before train refuses the URI.
    upstream = ("data/prepared",) if case == "corpus smaller than one block" else ()
    trained.assert_failed_cleanly(result, message, upstream)


def test_a_single_1gb_line_is_streamed_in_bounded_memory(trained):
    """1 GiB without a line break: ingest cuts it into records and never holds the whole line."""
    huge = trained.project / "data/corpora/bad/one-line.txt"
    huge.parent.mkdir(exist_ok=True)
    sentence = "To be, or not to be, that is the question; whether 'tis nobler in the mind to suffer. "
    with huge.open("w") as handle:
        for number in range((1 << 30) // (len(sentence) * 1000) + 1):
            handle.write(f"{number} " + sentence * 1000)  # the number keeps records from all being duplicates
    assert huge.stat().st_size >= 1 << 30 and b"\n" not in huge.read_bytes()[: 1 << 20]
    write_params(trained.project, merge(trained.params, {"data": {"sources": ["data/corpora/bad/one-line.txt"]}}))
    # A fresh interpreter whose only child is the stage, so its peak RSS is the stage's own.
    measure = (
        "import resource, subprocess, sys; subprocess.run([sys.executable, '-m', 'tasks.ingest'], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)"
    )
    try:
        result = run([str(BIN / "python"), "-c", measure], trained.project)
    finally:
        write_params(trained.project, trained.params)
        huge.unlink()
    peak_mib = int(result.stdout.strip().splitlines()[-1])
    stats = json.loads((trained.project / "data/prepared/stats.json").read_text())
    assert stats["train"]["chars"] + stats["validation"]["chars"] > 1 << 29
    assert peak_mib < 1024, f"peak RSS {peak_mib} MiB"
    trained.restore()  # the kept output back (ingest ran for real, outside dvc: dvc.lock is unchanged)
