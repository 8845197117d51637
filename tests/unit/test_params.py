"""params.yaml validation: one line naming the key, for every kind of mistake."""

from __future__ import annotations

import functools

import pytest
import yaml

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import apply_overrides, flatten, load_params, parse_override, parse_params
from tests.helpers import ROOT, default_params, merge


def error_for(overrides: dict) -> str:
    with pytest.raises(PipelineError) as info:
        parse_params(merge(default_params(), overrides))
    return str(info.value)


def test_the_shipped_params_files_are_valid():
    assert load_params(ROOT / "params.yaml").model.config.n_layer == 4
    tang = load_params(ROOT / "params/tang-poetry.yaml")
    assert tang.data.text_field == ["title", "paragraphs"]
    assert load_params(ROOT / "params/tang-poetry-uer.yaml").tokenizer.kind == "pretrained"
    recipe = load_params(ROOT / "params/recipe-search.yaml")
    assert recipe.sweep.objective == "bits_per_char" and "train.lr_scheduler" in recipe.sweep.space


def test_unknown_key_is_named():
    assert error_for({"train": {"learnig_rate": 0.1}}) == (
        "params.yaml: train.learnig_rate: unknown key; check its spelling against the documented params"
    )


def test_wrong_type_is_named_with_the_value():
    message = error_for({"train": {"batch_size": "sixteen"}})
    assert message.startswith("params.yaml: train.batch_size: ") and "'sixteen'" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train": {"learning_rate": 0}}, "params.yaml: train.learning_rate: input should be greater than 0 (got 0)"),
        ({"data": {"validation_fraction": 1.0}}, "params.yaml: data.validation_fraction: input should be less than 1"),
        ({"train": {"max_steps": 0}}, "params.yaml: train.max_steps: must be a positive number of steps"),
        (
            {"tokenizer": {"block_size": 256}},
            "params.yaml: tokenizer.block_size: 256 exceeds model.config.n_positions (128)",
        ),
        (
            {"model": {"config": {"n_embd": 100, "n_head": 3}}},
            "params.yaml: model.config.n_embd (100) must be divisible",
        ),
        ({"model": {"config": {"n_layers": 2}}}, "params.yaml: model.config.n_layers: unknown key; check its spelling"),
        ({"model": {"config": {"n_layer": 2.5}}}, "params.yaml: model.config.n_layer: input should be a valid integer"),
        ({"model": {"config": {"n_layer": 257}}}, "params.yaml: model.config.n_layer: input should be less than or"),
        ({"model": {"config": {"dropout": 1}}}, "params.yaml: model.config.dropout: input should be less than 1"),
        ({"model": {"config": {"activation_function": "gelu2"}}}, "params.yaml: model.config.activation_function: "),
        ({"model": {"config": {"tie_word_embeddings": "no"}}}, "params.yaml: model.config.tie_word_embeddings: input"),
        ({"model": {"config": [1, 2]}}, "params.yaml: model.config: must be a mapping of GPT2Config fields"),
        ({"train": {"max_steps": 10**9}}, "params.yaml: train.max_steps: input should be less than or equal to 1000"),
        ({"train": {"batch_size": 10**6}}, "params.yaml: train.batch_size: input should be less than or equal to"),
        ({"tokenizer": {"vocab_size": 10**7}}, "params.yaml: tokenizer.vocab_size: input should be less than or"),
        (
            {"evaluate": {"generation": {"max_new_tokens": 10**6}}},
            "params.yaml: evaluate.generation.max_new_tokens: input should be less than or equal to 131072",
        ),
        ({"tokenizer": {"vocab_size": 200}}, "params.yaml: tokenizer.vocab_size: 200 is too small for byte-level BPE"),
        ({"train": {"device": "tpu"}}, "params.yaml: train.device: input should be 'auto', 'cpu' or 'cuda'"),
        ({"tokenizer": {"framing": "uer"}}, "params.yaml: tokenizer.framing: uer is the framing of a BERT-vocabulary"),
        ({"tokenizer": {"framing": "bert"}}, "params.yaml: tokenizer.framing: input should be 'auto', 'eos', 'uer'"),
        ({"register": {"model_name": "team/gpt2"}}, "params.yaml: register.model_name: must be a plain name without"),
        ({"register": {"model_name": "gpt2@v1"}}, "params.yaml: register.model_name: must be a plain name without"),
        ({"register": {"model_name": ".."}}, "params.yaml: register.model_name: must be a plain name without"),
        ({"register": {"model_name": "g" * 257}}, "params.yaml: register.model_name: must be at most 256 characters"),
        ({"register": {"model_name": "gpt2 "}}, "params.yaml: register.model_name: must not start or end with spaces"),
        ({"mlflow": {"experiment": "a\tb"}}, "params.yaml: mlflow.experiment: must not start or end with spaces nor"),
        ({"mlflow": {"experiment": "e" * 501}}, "params.yaml: mlflow.experiment: must be at most 500 characters"),
        ({"train": {"method": "qlora"}}, "params.yaml: train.method: input should be 'full' or 'lora' (got 'qlora')"),
        (
            {"train": {"lora": {"target_modules": ["c_attn", "q_proj"]}}},
            "params.yaml: train.lora.target_modules: 'q_proj' is not a GPT-2 layer LoRA adapts; use c_attn, c_proj, "
            "c_fc (got ['c_attn', 'q_proj'])",
        ),
        ({"train": {"lora": {"target_modules": ["c_fc", "c_fc"]}}}, "params.yaml: train.lora.target_modules: names a"),
        ({"train": {"lora": {"target_modules": []}}}, "params.yaml: train.lora.target_modules: list should have at"),
        ({"train": {"lora": {"rank": 0}}}, "params.yaml: train.lora.rank: input should be greater than 0 (got 0)"),
        ({"train": {"lora": {"alpha": 0}}}, "params.yaml: train.lora.alpha: input should be greater than 0 (got 0)"),
        ({"train": {"lora": {"dropout": 1}}}, "params.yaml: train.lora.dropout: input should be less than 1 (got 1)"),
        ({"train": {"lora": {"ranks": 8}}}, "params.yaml: train.lora.ranks: unknown key; check its spelling"),
    ],
)
def test_impossible_values_are_refused(overrides, expected):
    assert error_for(overrides).startswith(expected)


def test_exponent_floats_are_floats(tmp_path):
    raw = default_params()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw).replace("learning_rate: 0.003", "learning_rate: 1e-3"))
    assert load_params(path).train.learning_rate == pytest.approx(1e-3)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  sources: [a\n")
    with pytest.raises(PipelineError, match=r"params.yaml:\d+: not valid YAML"):
        load_params(path)


def test_flatten_gives_dotted_mlflow_params():
    flat = flatten(load_params(ROOT / "params.yaml"))
    assert flat["train.learning_rate"] == "0.003"
    assert flat["model.config.n_embd"] == "128"
    assert flat["data.sources"] == "['data/samples/tinyshakespeare.txt']"


def test_overrides_parse_as_dvc_set_param_does():
    assert parse_override("train.max_steps=200") == ("train.max_steps", 200)
    assert parse_override("train.learning_rate=1e-3") == ("train.learning_rate", 0.001)
    assert parse_override("data.sources=[a.txt, b.json]") == ("data.sources", ["a.txt", "b.json"])
    with pytest.raises(PipelineError, match=r"override 'train\.max_steps': expected KEY=VALUE"):
        parse_override("train.max_steps")


def test_overrides_change_a_copy_and_are_validated():
    raw = default_params()
    changed = apply_overrides(raw, {"train.max_steps": 7, "model.config.n_layer": 1})
    assert (changed["train"]["max_steps"], changed["model"]["config"]["n_layer"]) == (7, 1)
    assert raw["train"]["max_steps"] == 800
    with pytest.raises(PipelineError) as unknown:
        apply_overrides(raw, {"train.max_step": 7})
    assert str(unknown.value).startswith("override train.max_step: unknown key; keys there: batch_size, ")
    with pytest.raises(PipelineError, match=r"^override train\.max_steps\.x: train\.max_steps is not a section"):
        apply_overrides(raw, {"train.max_steps.x": 7})
    with pytest.raises(PipelineError, match=r"^override: train\.learning_rate: input should be greater than 0"):
        apply_overrides(raw, {"train.learning_rate": 0})


def test_model_config_keeps_only_the_keys_set_and_every_activation_exists():
    from transformers.activations import ACT2FN

    from tasks.plumbing.params import ACTIVATIONS

    params = parse_params(merge(default_params(), {"model": {"config": {"n_layer": 3, "dropout": 0}}}))
    assert params.model.config.overrides() == {"n_layer": 3, "n_head": 4, "n_embd": 128, "n_positions": 128,
                                               "dropout": 0.0, "initializer_range": 0.038}  # fmt: skip
    assert sorted(k for k in flatten(params) if k.startswith("model.config.")) == [
        "model.config.dropout", "model.config.initializer_range", "model.config.n_embd", "model.config.n_head",
        "model.config.n_layer", "model.config.n_positions",
    ]  # fmt: skip
    assert set(ACTIVATIONS) <= set(ACT2FN)


def test_a_bad_value_is_shown_short_however_large():
    message = error_for({"data": {"sources": [["x" * 10_000] * 10_000]}})
    assert message.startswith("params.yaml: data.sources.0: input should be a valid string (got ['xxx")
    assert len(message) < 250


@pytest.mark.parametrize(
    ("text", "line"),
    [("data:\n  sources: &files [a.txt]\n", 2), ("a: &x 1\ndata:\n  sources: [*x]\n", 1)],
)
def test_yaml_anchors_and_aliases_are_refused_with_their_line(tmp_path, text, line):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=rf"^{path}:{line}: YAML anchors and aliases \(&\w+, \*\w+\) are not"):
        load_params(path)
    with pytest.raises(PipelineError, match=r"^override data\.sources: YAML anchors and aliases \(&x, \*x\)"):
        parse_override("data.sources=[&x a, *x]")


def test_a_params_file_over_the_limit_is_refused_before_it_is_read(tmp_path):
    from tasks.plumbing.params import PARAMS_MAX_BYTES

    path = tmp_path / "params.yaml"
    path.write_text("#" * (PARAMS_MAX_BYTES + 1))
    with pytest.raises(PipelineError, match=r"params\.yaml: 1,048,577 bytes is over the 1,048,576-byte limit"):
        load_params(path)


def leaves(tree: dict, prefix: str = ""):
    """The dotted keys of a params tree's values (a mapping's keys are walked into, model.config's too; sweep.space
    is one value: its keys are params keys, dots and all)."""
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" != "sweep.space":
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def effective(params) -> dict:
    """What a run does with params: every value, model.config as GPT2Config gets it."""
    return {**params.model_dump(exclude={"model"}), "model": (params.model.init, params.model.name_or_path,
                                                               params.model.gpt2_config())}  # fmt: skip


def test_a_key_left_out_of_params_yaml_means_what_params_yaml_says():
    """One source of defaults: deleting any line of the shipped params.yaml changes nothing a run does."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    expected = effective(parse_params(shipped))
    changed = []
    for key in leaves(shipped):
        if key == "data.sources":
            continue  # required: no default could mean the user's corpus
        trimmed = yaml.safe_load((ROOT / "params.yaml").read_text())
        *path, last = key.split(".")
        section = trimmed
        for part in path:
            section = section[part]
        del section[last]
        if effective(parse_params(trimmed)) != expected:
            changed.append(key)
    assert changed == [], "tasks/plumbing/params.py's defaults differ from params.yaml"


def test_the_schema_checks_every_params_file_and_a_broken_copy_fails():
    """params.yaml and params/*.yaml validate against the committed JSON Schema editors use; a wrong type, a value
    out of bounds and a misspelt key each fail it, as they fail load_params."""
    import json

    from jsonschema import Draft202012Validator

    schema = json.loads((ROOT / "docs/reference/params.schema.json").read_text())
    validator = Draft202012Validator(schema)
    for path in [ROOT / "params.yaml", *sorted((ROOT / "params").glob("*.yaml"))]:
        assert path.read_text().startswith("# yaml-language-server: $schema="), path
        assert list(validator.iter_errors(yaml.safe_load(path.read_text()))) == [], path
    for broken in ({"train": {"learning_rate": "fast"}}, {"train": {"batch_size": 0}}, {"train": {"learnig_rate": 1}}):
        assert list(validator.iter_errors(merge(default_params(), broken))), broken


def test_the_reference_and_schema_are_as_generated_and_every_key_is_described():
    import json

    from tools.params_reference import PARAMS, REFERENCE, SCHEMA, params_yaml, reference, schema

    assert PARAMS.read_text() == params_yaml(), "run `make reference` and commit params.yaml"
    assert REFERENCE.read_text() == reference(), "run `make reference` and commit docs/reference/"
    assert json.loads(SCHEMA.read_text()) == schema(), "run `make reference` and commit docs/reference/"
    generated = schema()
    sections = [generated, *generated["$defs"].values()]
    undescribed = [
        name for section in sections for name, spec in section["properties"].items() if "description" not in spec
    ]
    assert undescribed == []


def test_params_yaml_sets_every_key_the_model_accepts_at_its_default():
    """Every key is in params.yaml (so `dvc exp run -S key=value` needs no `+`), set to the model's default."""
    from tasks.plumbing.params import Params

    def keys(value: dict, prefix: str = "") -> dict:
        return {key: value_at(value, key) for key in leaves(value, prefix)}

    def value_at(tree: dict, key: str):
        return tree["sweep"]["space"] if key == "sweep.space" else functools.reduce(dict.get, key.split("."), tree)

    def model_keys(model, prefix: str = "") -> dict:
        flat = {}
        for name in type(model).model_fields:
            inner = getattr(model, name)
            if hasattr(inner, "model_fields"):
                flat.update(model_keys(inner, f"{prefix}{name}."))
            elif name == "space":  # sweep.space: its distributions as params.yaml writes them
                flat[prefix + name] = {k: v.model_dump(exclude_defaults=True) for k, v in inner.items()}
            else:  # promote.gate: its rules in full
                flat[prefix + name] = [v.model_dump() for v in inner] if name == "gate" else inner
        return flat

    shipped = keys(default_params())
    assert shipped == model_keys(Params())
    assert {"train.loss_kernel", "model.config.n_inner", "data.max_record_bytes"} <= set(shipped)


def test_a_null_gpt2_config_key_keeps_the_pretrained_checkpoints_value():
    from tasks.plumbing.params import ModelParams

    config = {"n_inner": None, "attn_pdrop": None, "dropout": 0.1}
    assert ModelParams(init="pretrained", config=config).gpt2_config() == {"dropout": 0.1}
    assert ModelParams(init="scratch", config=config).gpt2_config()["n_layer"] == 4
