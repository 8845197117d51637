"""The layers of tasks/ are enforced by import-linter (`make lint`), and docs/architecture.md is generated from them."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import BIN, ROOT


def lint_imports(folder) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache"], cwd=folder, capture_output=True, text=True, check=False, timeout=120
    )


@pytest.mark.parametrize(
    ("module", "upward", "named"),
    [
        ("tasks/tracking/store.py", "from tasks.training import model", "tasks.tracking.store -> tasks.training.model"),
        ("tasks/train.py", "from tasks import evaluate", "tasks.train -> tasks.evaluate"),  # one stage, another
        ("tasks/plumbing/paths.py", "import flows.cli", "tasks.plumbing.paths -> flows.cli"),  # tasks up into flows
    ],
)
def test_an_upward_import_fails_the_contracts_that_the_project_keeps(tmp_path, module, upward, named):
    for name in ("tasks", "flows", "pyproject.toml"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    kept = lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout
    with (tmp_path / module).open("a") as source:
        source.write(f"\n{upward}  # noqa\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode != 0
    assert named in broken.stdout, broken.stdout


def test_the_architecture_page_is_as_generated_and_names_every_module():
    from tools.architecture import PAGE, page

    assert PAGE.read_text() == page(), "run `make reference` and commit docs/architecture.md"
    modules = [path for path in (ROOT / "tasks").rglob("*.py") if path.stem != "__init__"]
    assert len(modules) > 30
    missing = [str(path) for path in modules if f"| `{path.stem}` |" not in PAGE.read_text()]
    assert missing == []
