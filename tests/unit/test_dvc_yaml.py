"""dvc.yaml is the one description of the stages: its deps are exactly the code each stage runs, stages do not
import each other, and the Prefect flow takes its tasks from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from flows.pipeline import stages
from tasks.plumbing.errors import PipelineError
from tests.helpers import ROOT

STAGE_MODULE = re.compile(r"python3? -m (tasks\.\w+)")


def dvc_stages(root: Path = ROOT) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def project_imports(path: Path) -> set[str]:
    """The project modules (tasks.*, flows.*) a file imports anywhere in it, functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from tasks import runs`
    return {name for name in found if module_file(name) is not None}


def module_file(name: str) -> Path | None:
    if not name.startswith(("tasks", "flows")):
        return None
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def closure(module: str) -> set[str]:
    """Every project file `python -m module` runs: the module, what it imports, transitively, and the packages'
    __init__ files on the way."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo.extend(".".join(parts[:depth]) for depth in range(1, len(parts)) if ".".join(parts[:depth]) != name)
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(project_imports(path))
    return {str(path.relative_to(ROOT)) for path in seen}


@pytest.mark.parametrize("stage", list(dvc_stages()))
def test_each_stage_lists_exactly_the_code_it_runs(stage):
    spec = dvc_stages()[stage]
    module = STAGE_MODULE.search(spec["cmd"]).group(1)
    code = {dep for dep in spec["deps"] if dep.endswith(".py")}
    assert code == closure(module), f"dvc.yaml's {stage} deps differ from what python -m {module} imports"


def test_stages_do_not_import_each_other():
    names = set(dvc_stages())
    for stage in names:
        imported = {Path(path).stem for path in closure(f"tasks.{stage}")} & names
        assert imported == {stage}, f"tasks.{stage} imports the stage module(s) {sorted(imported - {stage})}"


def test_an_edit_reruns_only_the_stages_that_import_it():
    users = {stage: closure(f"tasks.{stage}") for stage in dvc_stages()}
    assert [s for s, files in users.items() if "tasks/tracking/registry.py" in files] == ["register"]
    assert [s for s, files in users.items() if "tasks/ingest.py" in files] == ["ingest"]  # normalize() lives there
    assert [s for s, files in users.items() if "tasks/plumbing/stage.py" in files] == list(dvc_stages())


def test_the_flow_takes_its_stages_from_dvc_yaml(tmp_path):
    assert stages(ROOT) == ["ingest", "tokenize", "train", "evaluate", "register"]
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    report = {"cmd": "python3 -m tasks.tracking.report", "deps": ["metrics/eval.json"], "outs": ["reports/report.html"]}
    spec["stages"] = {"report": report, **spec["stages"]}  # listed first, runs after what it reads
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert stages(tmp_path) == ["ingest", "tokenize", "train", "evaluate", "report", "register"]
    spec["stages"]["ingest"]["deps"].append("reports/report.html")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(PipelineError, match=r"form a cycle"):
        stages(tmp_path)


def test_ingest_reads_every_data_key_but_those_that_change_only_speed():
    """Changing data.workers (or the executor) must rerun nothing: no stage lists them; every other data key
    decides the shards, so ingest lists it."""
    from tasks.plumbing.params import SPEED_ONLY, DataParams

    listed = {stage: set(spec.get("params", [])) for stage, spec in dvc_stages().items()}
    assert all(not keys & set(SPEED_ONLY) and "data" not in keys for keys in listed.values()), listed
    assert listed["ingest"] == {f"data.{key}" for key in DataParams.model_fields} - set(SPEED_ONLY)


@pytest.mark.parametrize("recipe", sorted((ROOT / "params").glob("*.yaml")), ids=lambda path: path.name)
def test_every_recipe_holds_every_key_a_stage_lists(recipe):
    """DVC stops a stage whose listed params key is missing from params.yaml: `run --params` a recipe would fail."""
    params = yaml.safe_load(recipe.read_text())
    for stage, spec in dvc_stages().items():
        for key in spec.get("params", []):
            value = params
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"{recipe.name} lacks {key} ({stage} lists it)"
                value = value[part]
