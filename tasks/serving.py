"""The served model's loader: MLflow's transformers pyfunc, with each request's generation settings checked first.

Register ships this file with every model version (the `code/` folder of its MLmodel) and names it the
python_function loader, so `mlflow models serve` answers an out-of-range setting with HTTP 400 and a message
naming it, where transformers would fail deep inside generate (an IndexError for top_p 2) or with a 500-style
traceback. It imports nothing of the pipeline: the served model must load without the project.
"""

from __future__ import annotations

import math
from typing import Any

# name: (lowest, highest, whether lowest itself is allowed): what transformers' generate accepts, and a cap on a
# request's length
LIMITS: dict[str, tuple[float, float, bool]] = {
    "max_new_tokens": (1, 4096, True),
    "temperature": (0, math.inf, False),
    "top_k": (0, math.inf, True),
    "top_p": (0, 1, False),
    "repetition_penalty": (0, math.inf, False),
}


def out_of_range(params: dict[str, Any] | None) -> str | None:
    """The first setting outside LIMITS, described for the caller, or None."""
    for name, value in (params or {}).items():
        if name not in LIMITS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        low, high, low_allowed = LIMITS[name]
        if value < low or value > high or (value == low and not low_allowed):
            bounds = f"{'>=' if low_allowed else '>'} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
            return f"params.{name}: must be {bounds} (got {value})"
    return None


class CheckedGeneration:
    """The transformers pyfunc model, refusing out-of-range generation settings before it generates."""

    def __init__(self, model):
        self.model = model

    def predict(self, data, params: dict[str, Any] | None = None):
        problem = out_of_range(params)
        if problem:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(problem, error_code=INVALID_PARAMETER_VALUE)
        return self.model.predict(data, params=params)

    def __getattr__(self, name: str):  # everything else as MLflow's own wrapper has it
        return getattr(self.model, name)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> CheckedGeneration:
    """The python_function loader MLflow calls (the MLmodel's loader_module is this module)."""
    from mlflow import transformers

    return CheckedGeneration(transformers._load_pyfunc(path, model_config))
