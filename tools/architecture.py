"""Write docs/architecture.md, the map of the house, from the code itself.

The layers come from pyproject.toml's import-linter contracts (the ones `make lint` enforces), each sub-package's
charter from its __init__ docstring, each module's line from its own docstring, and the stages, their modules and
what they read and write from dvc.yaml in the flow's order. `make reference` runs it; a test fails when the
committed page differs from what it writes, so the map cannot drift from the code.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.pipeline import stages  # noqa: E402 (the project's root first on the path, for a plain `python tools/...`)

PAGE = ROOT / "docs/architecture.md"
CODE_DIRS = ("tasks", "flows")


def contracts() -> list[dict[str, Any]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def summary(path: Path) -> str:
    """The first line of a module's docstring: what it is, in its own words."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return docstring.split("\n\n")[0].replace("\n", " ").replace("|", "\\|")


def charter(package: Path) -> str:
    return (ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8"))) or "").strip()


def layer_modules(layer: str) -> list[str]:
    """The modules of one layer: siblings are joined by `|` (independent) or `:` (may import each other)."""
    return [name.strip() for name in layer.replace(":", "|").split("|")]


def layer_rows(layers: dict[str, Any]) -> list[str]:
    """A row per layer, top first: its modules, and what each may import (every layer below it)."""
    container = layers["containers"][0]
    rows = ["| layer | modules | may import |", "| --- | --- | --- |"]
    names = layers["layers"]
    for depth, layer in enumerate(names, start=1):
        modules = ", ".join(f"`{container}.{name}`" for name in layer_modules(layer))
        below = ", ".join(f"`{container}.{name}`" for lower in names[depth:] for name in layer_modules(lower))
        independent = " (not each other)" if "|" in layer else ""
        rows.append(f"| {depth} | {modules}{independent} | {below or 'the standard library and third parties'} |")
    return rows


def stage_rows() -> list[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    rows = ["| stage | module | reads | writes |", "| --- | --- | --- | --- |"]
    for name in stages(ROOT):
        stage = spec[name]
        reads = [dep for dep in stage.get("deps", []) if not dep.endswith(".py")]
        writes = [next(iter(out)) if isinstance(out, dict) else out for kind in ("outs", "metrics", "plots")
                  for out in stage.get(kind, [])]  # fmt: skip
        reads_shown, writes_shown = (", ".join(f"`{path}`" for path in paths) for paths in (reads, writes))
        rows.append(f"| `{name}` | `tasks/{name}.py` | {reads_shown} | {writes_shown} |")
    return rows


def package_sections() -> list[str]:
    """Each sub-package of tasks/ (its charter and modules), then the stage modules and flows/."""
    lines: list[str] = []
    tasks = ROOT / "tasks"
    for package in sorted(path for path in tasks.iterdir() if (path / "__init__.py").exists()):
        lines += [
            "",
            f"### `tasks/{package.name}/`",
            "",
            charter(package),
            "",
            "| module | what it is |",
            "| --- | --- |",
        ]
        lines += [
            f"| `{path.stem}` | {summary(path)} |" for path in sorted(package.glob("*.py")) if path.stem != "__init__"
        ]
    for title, folder in (
        ("The stage modules, `tasks/*.py`", tasks),
        ("The flows and the command, `flows/`", ROOT / "flows"),
    ):
        lines += ["", f"### {title}", "", "| module | what it is |", "| --- | --- |"]
        lines += [
            f"| `{path.stem}` | {summary(path)} |" for path in sorted(folder.glob("*.py")) if path.stem != "__init__"
        ]
    return lines


def page() -> str:
    rules = contracts()
    layers = next(rule for rule in rules if rule["type"] == "layers")
    others = [rule["name"] for rule in rules if rule is not layers]
    lines = [
        "# Architecture",
        "",
        "Generated from the code by `make reference` (tools/architecture.py; do not edit by hand): the layers from",
        "the import contracts in `pyproject.toml`, which `make lint` checks with import-linter, each package's",
        "charter and each module's line from their docstrings, the stages from `dvc.yaml`.",
        "",
        "## From a corpus to a registered model",
        "",
        "Each stage is a DVC stage run as `python -m tasks.<stage>`, in this order (the Prefect flow takes the same",
        "order from `dvc.yaml`). Stages hand each other nothing but these files and `params.yaml`.",
        "",
        *stage_rows(),
        "",
        "Promotion (`gpt2-pipeline promote`, the `promote-model` flow) then compares `@challenger` with `@champion`",
        "in the MLflow registry (`tasks/promote.py`).",
        "",
        "## Layers",
        "",
        "A module imports only from the layers below its own; the stage modules do not import each other. Also",
        f"checked: {'; '.join(others)}.",
        "",
        *layer_rows(layers),
        "",
        "## The packages",
        *package_sections(),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    PAGE.write_text(page(), encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
