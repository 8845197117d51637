"""What a stage and the CLI print alike.

Redacted, warnings on one line, no progress bars in a log; and the programs a child starts by name taken from this
interpreter's folder."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from tasks.plumbing.redaction import redact_output


def quiet_progress_bars() -> None:
    """No progress bars from transformers and the Hugging Face libraries.

    In a terminal a bar redraws one line, but in a log (a Prefect flow's, CI's, a file) every redraw adds one, e.g.
    "Writing model shards: 0%|"."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by the libraries imported from here on
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # read at each download
    if "transformers" in sys.modules:  # imported already (the train stage's module does): it read the variable
        from transformers.utils import logging

        logging.disable_progress_bar()


def tools_first(bin_dir: Path, path: str | None = None) -> str:
    """PATH with bin_dir first (default: after it, this process's PATH).

    The programs a child starts by name (dvc's `python`, mlflow's `uvicorn`, torchrun) are then the project
    interpreter's."""
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '') if path is None else path}"


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, line=None) -> str:
    """A Python warning as one line, naming where it was raised.

    The default adds the source line below it, two lines a log reader takes for an error's traceback."""
    return f"warning: {category.__name__}: {' '.join(str(message).split())} ({Path(filename).name}:{lineno})\n"


def console_output() -> None:
    """What a stage and the CLI print alike: redacted, warnings on one line, and no progress bars in a log."""
    redact_output()
    warnings.formatwarning = one_line_warning
    if not sys.stderr.isatty():
        quiet_progress_bars()
