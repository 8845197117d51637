"""The ingest stage on small inputs: formats, normalization, deduplication, the split, clear errors."""

from __future__ import annotations

import functools
import json
import re

import pytest

from tasks.data.sources import MAX_RECORD_CHARS, first_invalid_utf8, read_source, record_text, resolve_sources
from tasks.ingest import in_validation, ingest, normalize
from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import DataParams
from tasks.plumbing.paths import prepared_shards


@pytest.fixture(autouse=True)
def in_a_project(tmp_path, monkeypatch):
    """Each test's files are in its project (its working directory): sources outside a project are refused."""
    monkeypatch.chdir(tmp_path)


def params(sources, **kw) -> DataParams:
    return DataParams(sources=[str(s) for s in sources], **kw)


def read_split(folder, split):
    return [json.loads(line)["text"] for shard in prepared_shards(split, folder) for line in shard.open()]


def test_normalize_nfc_trailing_space_and_empty_lines():
    assert normalize("cafe\u0301  \n\n  \nline two\t\n") == "caf\u00e9\nline two"


def test_record_text_joins_fields_and_lists():
    poem = {"title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]}
    assert (
        record_text(poem, ["title", "paragraphs"], "x") == "靜夜思\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
    )


def test_missing_field_names_file_and_fields(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text('{"body": "hello there"}\n')
    with pytest.raises(PipelineError) as info:
        ingest(params([source]), tmp_path / "out")
    assert str(info.value) == f"{source}:1: record has no field 'text' (data.text_field); its fields are: body"


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(PipelineError, match=rf"^{source}:2: not valid JSON"):
        ingest(params([source]), tmp_path / "out")


def test_csv_without_the_column(tmp_path):
    source = tmp_path / "a.csv"
    source.write_text("title,body\nx,y\n")
    with pytest.raises(PipelineError, match=r"no column 'text' \(data.text_field\); columns are: title, body"):
        ingest(params([source]), tmp_path / "out")


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(PipelineError, match=r"data.sources\[0\]: '.*nope.txt' does not exist"):
        resolve_sources([str(tmp_path / "nope.txt")])
    with pytest.raises(PipelineError, match=r"data.sources\[1\]: '.*\*.parquet' matches no files"):
        resolve_sources(["hf:wikitext", str(tmp_path / "*.parquet")])


def test_formats_dedup_min_chars_and_stats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text(
        "first paragraph\nstill first\n\nsecond paragraph\n\nok\n\nfirst paragraph\nstill first\n"
    )
    (tmp_path / "b.csv").write_text("text\nfrom a csv row\n")
    pq.write_table(pa.table({"text": ["from parquet", "漢字也算"]}), tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "from a json array"}]))
    stats = ingest(params([tmp_path / "*.*"], min_chars=3, validation_fraction=0.5), tmp_path / "out")
    texts = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "validation")
    assert sorted(texts) == sorted(
        [
            "first paragraph\nstill first",
            "second paragraph",
            "from a csv row",
            "from parquet",
            "漢字也算",
            "from a json array",
        ]
    )
    assert stats["dropped"] == {"short": 1, "duplicate": 1}
    total_bytes = stats["train"]["bytes"] + stats["validation"]["bytes"]
    assert total_bytes == sum(len(t.encode()) for t in texts)
    assert stats["train"]["chars"] + stats["validation"]["chars"] == sum(len(t) for t in texts)


def test_split_is_deterministic_and_near_the_fraction():
    texts = [f"record number {i}" for i in range(5000)]
    picked = [in_validation(t, 0.1, seed=7) for t in texts]
    assert picked == [in_validation(t, 0.1, seed=7) for t in texts]
    assert 0.08 < sum(picked) / len(picked) < 0.12
    assert picked != [in_validation(t, 0.1, seed=8) for t in texts]


def test_empty_validation_split_is_an_error(tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("only one record here\n")
    with pytest.raises(PipelineError, match="split is empty"):
        ingest(params([source], validation_fraction=0.01), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_is_refused_with_a_fix(tmp_path):
    source = tmp_path / "a.txt"
    source.write_bytes(b"good text\n\n\xff\xfe bad bytes\n")
    with pytest.raises(PipelineError, match=r"a\.txt:3: not valid UTF-8 \(byte 11 of the file\); convert it to UTF-8"):
        ingest(params([source]), tmp_path / "out")


def test_the_offset_of_bad_bytes_is_exact_across_read_blocks(tmp_path):
    source = tmp_path / "big.txt"
    good = ("line of text é\n" * 200_000).encode()  # over 1 MiB, with multi-byte characters across block ends
    source.write_bytes(good + b"\xff")
    assert first_invalid_utf8(source) == (200_001, len(good))


def test_a_text_without_line_breaks_becomes_records_of_bounded_size(tmp_path):
    source = tmp_path / "one-line.txt"
    source.write_text("x" * (MAX_RECORD_CHARS * 2 + 5))
    records = [text for _, text in read_source(str(source), ["text"], params([source]))]
    assert [len(r) for r in records] == [MAX_RECORD_CHARS, MAX_RECORD_CHARS, 5]


def test_hub_source_offline_says_what_to_do(tmp_path):
    with pytest.raises(PipelineError, match=r"cannot load hf:no-such/dataset from the Hugging Face Hub .*save the"):
        ingest(params(["hf:no-such/dataset"]), tmp_path / "out")


def test_dialog_records_keep_their_turns(tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_text(
        json.dumps(["你好", "你好呀  ", ""], ensure_ascii=False)
        + "\n"
        + json.dumps({"dialog": ["在吗", "在"]}, ensure_ascii=False)
        + "\n"
    )
    with pytest.raises(PipelineError, match=r"chat.jsonl:2: record has no field 'text'"):
        ingest(params([source], format="dialog"), tmp_path / "out")
    source.write_text(json.dumps(["你好", "你好呀  ", ""], ensure_ascii=False) + "\n" + '["ok", 3]\n')
    with pytest.raises(PipelineError, match=r"chat.jsonl:2: a dialogue record must be a list of turns"):
        ingest(params([source], format="dialog", text_field="dialog"), tmp_path / "out")
    source.write_text("\n".join(json.dumps({"dialog": [f"问{i}", f"答{i}"]}, ensure_ascii=False) for i in range(50)))
    ingest(params([source], format="dialog", text_field="dialog", validation_fraction=0.2), tmp_path / "out")
    records = [json.loads(line) for shard in prepared_shards("train", tmp_path / "out") for line in shard.open()]
    assert all(r["turns"] == r["text"].split("\n") and len(r["turns"]) == 2 for r in records)


def test_hub_source_reads_a_local_dataset_offline_with_fields_as_for_files(tmp_path):
    """`hf:<dataset>` runs datasets.load_dataset: a dataset folder of data files loads offline (the suite sets
    HF_DATASETS_OFFLINE), and its records become the same texts as the same records in a .jsonl file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    poems = [
        {"title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"], "author": "李白"},
        {"title": "春曉", "paragraphs": ["春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。"], "author": "孟浩然"},
        {"title": "登鸛雀樓", "paragraphs": ["白日依山盡，黃河入海流。"], "author": "王之渙"},
    ]
    dataset = tmp_path / "tang-poems"
    (dataset / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(poems), dataset / "data/train-00000-of-00001.parquet")
    as_file = tmp_path / "poems.jsonl"
    as_file.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in poems) + "\n", encoding="utf-8")
    fields = {"text_field": ["title", "paragraphs"], "validation_fraction": 0.5}

    ingest(params([f"hf:{dataset}"], **fields), tmp_path / "from-hub")
    ingest(params([as_file], **fields), tmp_path / "from-file")
    hub = read_split(tmp_path / "from-hub", "train") + read_split(tmp_path / "from-hub", "validation")
    assert sorted(hub) == sorted(["靜夜思\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。",
                                  "春曉\n春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。",
                                  "登鸛雀樓\n白日依山盡，黃河入海流。"])  # fmt: skip
    for split in ("train", "validation"):
        assert read_split(tmp_path / "from-hub", split) == read_split(tmp_path / "from-file", split)
    with pytest.raises(
        PipelineError,
        match=r"tang-poems: record has no field 'body' \(data\.text_field\); its fields are: author, paragraphs",
    ):
        ingest(params([f"hf:{dataset}"], text_field="body"), tmp_path / "no-field")


@pytest.mark.parametrize("shape", ["absolute", "relative", "home"])
def test_a_hub_source_that_is_a_local_path_is_confined_as_a_file_is(tmp_path, monkeypatch, capsys, shape):
    """`hf:` names a local folder as readily as a hub dataset: outside the project it is refused with the message
    and the opt-in a plain path gets, and read (and listed) with data.allow_outside_project."""
    project, outside = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the model\n")
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(tmp_path))
    named = {"absolute": str(outside), "relative": "../elsewhere", "home": "~/elsewhere"}[shape]
    with pytest.raises(PipelineError) as refused:
        resolve_sources([f"hf:{named}"])
    assert str(refused.value) == (
        f"data.sources[0]: 'hf:{named}' resolves to {outside}, outside the project ({project}); copy it into the "
        "project, or set data.allow_outside_project: true to read it where it is"
    )
    with pytest.raises(PipelineError, match=r"resolves to .*, outside the project"):
        resolve_sources([str(outside / "secret.txt")])  # the same message for a plain path
    assert resolve_sources([f"hf:{named}"], outside=True) == [f"hf:{named}"]
    assert f"reading 1 files outside the project: ['{outside}']" in capsys.readouterr().out
    assert resolve_sources(["hf:stas/openwebtext-10k"]) == ["hf:stas/openwebtext-10k"]  # a hub id passes


def test_shards_are_the_same_bytes_for_any_number_of_workers_and_as_one_pass_reads_the_sources(tmp_path):
    """Large .txt and .jsonl files are cut into pieces at record boundaries, several small files share a unit;
    duplicates across units go (the first kept), and 1, 2 or 3 workers write the same."""
    import gzip

    paragraphs = [f"paragraph {i} " + "word " * (i % 37) + ("\nsecond line" if i % 3 else "") for i in range(30000)]
    text = tmp_path / "book.txt"
    text.write_text("\n\n  \n".join(paragraphs + paragraphs[:50]) + "\n")  # 50 repeats, across pieces
    lines = tmp_path / "records.jsonl"
    lines.write_text("".join(json.dumps({"text": f"line record {i}"}) + "\n" for i in range(40000)))
    with gzip.open(tmp_path / "packed.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": f"packed {i}"}) + "\n" for i in range(500))
    sources = [text, lines, tmp_path / "packed.jsonl.gz"]
    runs = {}
    for count in (1, 2, 3):
        stats = ingest(params(sources, shard_mb=1, workers=count), tmp_path / f"out-{count}")
        files = sorted(p for p in (tmp_path / f"out-{count}").rglob("*") if p.is_file())
        runs[count] = {str(f.relative_to(tmp_path / f"out-{count}")): f.read_bytes() for f in files}
    assert runs[1] == runs[2] == runs[3]
    assert stats["shards"] == len(runs[1]) // 2 - 0 and stats["shards"] >= 4, stats["shards"]
    assert stats["dropped"]["duplicate"] == 50
    assert stats["train"]["records"] + stats["validation"]["records"] == 30000 + 40000 + 500
    one_piece = [normalize(p) for p in paragraphs] + [f"line record {i}" for i in range(40000)]
    one_piece += [f"packed {i}" for i in range(500)]
    train = read_split(tmp_path / "out-2", "train")
    assert sorted(train + read_split(tmp_path / "out-2", "validation")) == sorted(one_piece)
    in_train = set(train)
    assert [t for t in one_piece if t in in_train] == train, "the sources' order"


def test_a_piece_starts_at_a_record_and_counts_lines_from_the_file(tmp_path):
    import gzip

    from tasks.data.sources import read_piece

    lines = "".join(json.dumps({"text": "x" * 100 + str(i)}) + "\n" for i in range(30000))
    (tmp_path / "lines.jsonl").write_text(lines)
    with gzip.open(tmp_path / "lines.jsonl.gz", "wt") as handle:  # a stream: cut as it is decompressed
        handle.write(lines)
    for source in (tmp_path / "lines.jsonl", tmp_path / "lines.jsonl.gz"):
        units = planned([source], 1 << 20)
        assert len(units) == 4 and all(len(unit) == 1 for unit in units)
        located = [where for unit in units for where, _ in read_piece(unit[0], ["text"], DataParams(sources=["x"]))]
        assert located == [f"{source}:{n}" for n in range(1, 30001)]


def planned(sources, target: int, **limits) -> list:
    """plan's units, read to the end."""
    from tasks.data.pieces import plan

    limited = DataParams(sources=["x"], **limits)
    read = functools.partial(read_source, fields=["text"], limits=limited)
    return list(plan([str(s) for s in sources], target, read, limited.max_record_bytes))


def test_every_kind_of_source_is_cut_into_units_of_about_shard_mb_of_text(tmp_path):
    """A .jsonl.gz and a .txt.gz by their decompressed text, a .json list and a .csv by their records, a .parquet
    by its row groups, an hf: dataset by its records: units of about shard_mb (1 MiB here) uncompressed, each
    record in exactly one; and the shards are the same bytes for 1 and 2 workers, in the records' order."""
    import csv
    import gzip

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = {kind: [f"{kind} record {i}" + " word" * (i % 50) for i in range(12000)] for kind in KINDS}
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", compresslevel=1) as handle:
        handle.writelines(json.dumps({"text": t}) + "\n" for t in texts["jsonl.gz"])
    with gzip.open(tmp_path / "b.txt.gz", "wt", compresslevel=1) as handle:
        handle.write("\n\n".join(texts["txt.gz"]) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": t} for t in texts["json"]], indent=1))
    with (tmp_path / "d.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["text"], *([t] for t in texts["csv"])])
    pq.write_table(pa.table({"text": texts["parquet"]}), tmp_path / "e.parquet", row_group_size=1000)
    datasets.Dataset.from_dict({"text": texts["hf"]}).to_json(tmp_path / "hub" / "train.jsonl")
    sources = ["a.jsonl.gz", "b.txt.gz", "c.json", "d.csv", "e.parquet", "hf:./hub"]
    units = planned(sources, 1 << 20)
    for kind, source in zip(KINDS, sources, strict=True):
        sizes = [sum(len(t.encode()) for t in unit_texts(unit, source)) for unit in units]
        sizes = [size for size in sizes if size]
        assert len(sizes) >= 2, (source, sizes)  # each is about 2.6 MB of text
        assert max(sizes) < 1.2 * (1 << 20), (source, sizes)
        read = [t for unit in units for t in unit_texts(unit, source)]
        assert [t.strip() for t in read] == texts[kind], source
    runs = []
    for count in (1, 2):
        ingest(params(sources, shard_mb=1, workers=count), tmp_path / f"out-{count}")
        files = sorted(p for p in (tmp_path / f"out-{count}").rglob("*.jsonl"))
        runs.append({p.relative_to(tmp_path / f"out-{count}"): p.read_bytes() for p in files})
    assert runs[0] == runs[1] and len(runs[0]) == 2 * len(units)
    every = [t.strip() for kind in KINDS for t in texts[kind]]
    train = read_split(tmp_path / "out-1", "train")
    in_train = set(train)
    assert [t for t in every if t in in_train] == train


KINDS = ("jsonl.gz", "txt.gz", "json", "csv", "parquet", "hf")


def unit_texts(unit, source: str) -> list[str]:
    from tasks.data.sources import read_piece

    fields, limits = ["text"], DataParams(sources=["x"])
    return [record_text(raw, fields, where) for piece in unit if piece.source == source
            for where, raw in read_piece(piece, fields, limits)]  # fmt: skip


def test_a_json_list_is_read_item_by_item_with_its_errors_lines(tmp_path):
    """A .json list streams: an item over data.max_record_bytes, bad JSON, a list left open or nested too deep
    is named with its line; a file holding one record is that record."""
    source = tmp_path / "a.json"
    source.write_text('[\n{"text": "one"},\n\n {"text": 22}  ,{"text": "three"}\n]\n')
    assert [(w, r["text"]) for w, r in read_source(str(source), ["text"], DataParams(sources=["x"]))] == [
        (f"{source}: record 0", "one"), (f"{source}: record 1", 22), (f"{source}: record 2", "three")
    ]  # fmt: skip
    source.write_text('{"text": "alone"}\n')
    assert [r for _, r in read_source(str(source), ["text"], DataParams(sources=["x"]))] == [{"text": "alone"}]
    cases = {
        '[{"text": "a"},\n{"text": "b"}\n{"text": "c"}]': r":3: not valid JSON \(expected ',' or ']' after a record\)",
        '[{"text": "a"},\n{"text": "b",}]': r":2: not valid JSON \(Expecting property name",
        '[{"text": "a"},\n': r":2: not valid JSON \(the file ends inside its list\)",
        '[\n\n{"text": "' + "x" * 5000 + '"}]': r":3: a record over 1,024 bytes \(data\.max_record_bytes\)",
        '{"text": "a"} {"text": "b"}': r":1: not valid JSON \(extra data after the record\)",
        '[{"text": "a"}]\n[{"text": "b"}]': r":2: not valid JSON \(extra data after the list\)",
        '[{"text": tru},\n' + '{"text": "long enough"},\n' * 200 + "]": r":1: not valid JSON \(Expecting value\)",
    }
    for text, message in cases.items():
        source.write_text(text)
        with pytest.raises(PipelineError, match=r"^" + re.escape(str(source)) + message):
            list(read_source(str(source), ["text"], DataParams(sources=["x"], max_record_bytes=1024)))


def test_a_gzipped_source_is_read_as_its_text_and_bad_bytes_in_it_are_named(tmp_path):
    import gzip

    with gzip.open(tmp_path / "ok.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("床前明月光\n\n疑是地上霜\n")
    assert [text for _, text in read_source(str(tmp_path / "ok.txt.gz"), ["text"], DataParams(sources=["x"]))] == [
        "床前明月光\n", "疑是地上霜\n"
    ]  # fmt: skip
    with gzip.open(tmp_path / "latin1.jsonl.gz", "wb") as handle:
        handle.write('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(PipelineError, match=r"latin1\.jsonl\.gz: not valid UTF-8 once decompressed; convert it"):
        ingest(params([tmp_path / "latin1.jsonl.gz"]), tmp_path / "out")


def test_the_ray_executor_names_its_cluster_or_says_what_is_missing(monkeypatch):
    """data.executor: ray joins data.ray_address, else RAY_ADDRESS; without either, without Ray, or with nothing
    answering at the address, one line says what to do (ray.init would wait for an absent head without end)."""
    import sys

    from tasks.data.parallel import cluster, ordered_map

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster("local", "10.0.0.1:6379") is None and cluster("ray", "10.0.0.1:6379") == "10.0.0.1:6379"
    with pytest.raises(PipelineError, match=r"no cluster is named: set data\.ray_address"):
        cluster("ray", None)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert cluster("ray", None) == "auto"
    with pytest.raises(PipelineError, match=r"nothing answers at '127.0.0.1:1' \(Connection refused\)"):
        list(ordered_map(str, [1], 1, on_cluster="127.0.0.1:1"))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(PipelineError, match=r"Ray is not installed: pip install 'gpt2-pipeline\[ray\]'"):
        list(ordered_map(str, [1], 1, on_cluster="auto"))


def test_shards_past_99999_are_read_in_number_order(tmp_path):
    """Names are `{index:05d}`: shard 100000 has six digits and sorts before 10001 as a string; read in number order."""
    from tasks.plumbing.paths import prepared_shards

    split = tmp_path / "train"
    split.mkdir()
    for index in (9, 10001, 99999, 100000, 100001):
        (split / f"{index:05d}.jsonl").write_text("")
    assert [path.stem for path in prepared_shards("train", tmp_path)] == ["00009", "10001", "99999", "100000", "100001"]


def test_a_source_outside_ingest_data_deps_is_refused_and_a_hub_one_is_named(tmp_path, capsys):
    """dvc repro sees a corpus change only inside ingest's data deps (dvc.yaml): a source elsewhere would leave
    ingest "up to date" on stale data, so the stage refuses it; a hub dataset gets a line on how to reread it."""
    from tasks.data.sources import check_tracked

    deps = ["data/samples", "data/corpora"]
    check_tracked(["data/corpora/web/a.jsonl.gz", "data/samples/x.txt", "hf:./data/corpora/hub"], deps)
    with pytest.raises(PipelineError) as refused:
        check_tracked(["data/corpora/a.txt", "data/mine/b.txt"], deps)
    assert str(refused.value) == (
        "data.sources: data/mine/b.txt is not in a folder that ingest's deps in dvc.yaml name (data/samples, "
        "data/corpora), so dvc repro would not see it change; move it under data/corpora/, or add its folder to "
        "stages.ingest.deps in dvc.yaml"
    )
    with pytest.raises(PipelineError, match=r"^data\.sources: data/corpora-old/a\.txt is not in a folder"):
        check_tracked(["data/corpora-old/a.txt"], deps)  # a sibling whose name starts alike is not inside
    capsys.readouterr()
    check_tracked(["hf:stas/openwebtext-10k"], deps)
    assert "hf:stas/openwebtext-10k comes from the Hugging Face Hub" in capsys.readouterr().out


def test_a_gzipped_text_without_blank_lines_or_with_long_lines_reads_as_the_plain_file(tmp_path):
    """A .txt.gz is cut at paragraph ends when it has them, else after data.max_record_bytes more, and a line
    longer than that is cut between whole characters: the same records as the same text uncompressed."""
    import gzip

    text = "".join(f"sentence {i} 诗\n" for i in range(20000)) + "\n" + "é" * 3000 + "\n\n" + "last\n"
    (tmp_path / "plain.txt").write_text(text)
    with gzip.open(tmp_path / "packed.txt.gz", "wt") as handle:
        handle.write(text)
    expected = [t for _, t in read_source(str(tmp_path / "plain.txt"), ["text"], DataParams(sources=["x"]))]
    units = planned([tmp_path / "packed.txt.gz"], 4096, max_record_bytes=1024)
    assert len(units) > 50
    assert "".join(text for unit in units for text in unit_texts(unit, str(tmp_path / "packed.txt.gz"))) == "".join(
        expected
    )


def test_validation_sources_are_held_out_whole(tmp_path):
    """run_clm's validation_file: every record of a held-out file is validation and no other record is, whatever
    validation_fraction says; a record both sides hold stays where it first came (train), so none leaks."""
    (tmp_path / "train.txt").write_text("".join(f"train paragraph {i}\n\n" for i in range(50)) + "shared\n")
    (tmp_path / "held.txt").write_text("".join(f"held out paragraph {i}\n\n" for i in range(7)) + "shared\n")
    stats = ingest(
        params([tmp_path / "train.txt"], validation_sources=[str(tmp_path / "held.txt")], validation_fraction=0.5),
        tmp_path / "out",
    )
    assert read_split(tmp_path / "out", "validation") == [f"held out paragraph {i}" for i in range(7)]
    assert read_split(tmp_path / "out", "train") == [f"train paragraph {i}" for i in range(50)] + ["shared"]
    assert stats["validation_sources"] == [str(tmp_path / "held.txt")]
    assert stats["dropped"]["duplicate"] == 1


def test_a_file_both_trained_on_and_held_out_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    both = params([tmp_path / "*.txt"], validation_sources=[str(tmp_path / "a.txt")])
    with pytest.raises(PipelineError, match=r"^data.validation_sources: .*a.txt is also in data.sources"):
        ingest(both, tmp_path / "out")
    assert not (tmp_path / "out").exists()
