"""The pipeline's stages. Importing the package first makes sure this is the project's interpreter.

`dvc repro` runs each stage's `python -m tasks.<stage>` with whatever `python` comes first on PATH, which is not
the project's when the venv is not activated (`.venv/bin/dvc repro`). Then, before any work, the stage moves
itself to the project's .venv interpreter, or stops with one line saying what to run. Standard library only:
this runs before anything else is imported.
"""

import importlib.util
import os
import sys
from pathlib import Path

from tasks.plumbing.console import tools_first
from tasks.plumbing.errors import BAD_INPUT_EXIT

REQUIRED = ("torch", "transformers", "datasets", "tokenizers", "mlflow", "pydantic", "yaml")
VENV_PYTHON = Path(".venv/bin/python")


def _ensure_project_interpreter() -> None:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    root = Path(os.environ.get("DVC_ROOT") or ".").resolve()  # a DVC experiment's temporary copy has no .venv
    for candidate in dict.fromkeys((Path.cwd() / VENV_PYTHON, root / VENV_PYTHON)):
        venv = candidate.parent.parent.resolve()
        if candidate.exists() and Path(sys.prefix).resolve() != venv:
            # The same command under the project's interpreter; its tools (torchrun, dvc) come first on PATH too.
            os.environ["PATH"] = tools_first(candidate.parent)
            os.execv(candidate, [str(candidate), *sys.orig_argv[1:]])  # noqa: S606
    print(
        f"error: {sys.executable} (Python {sys.version.split()[0]}) lacks the project's packages "
        f"({', '.join(missing)}); run `make install`, then `.venv/bin/dvc repro` or `.venv/bin/gpt2-pipeline run` "
        "from the project",
        file=sys.stderr,
    )
    sys.exit(BAD_INPUT_EXIT)


_ensure_project_interpreter()
