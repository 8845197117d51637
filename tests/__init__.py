"""The test suite is offline by construction: these are set before the Hugging Face libraries, MLflow or Prefect
are imported (pytest imports this package before tests/conftest.py), so the offline code paths are the ones
tested, at once, instead of network retries that pass only because the hub cannot be reached. The stages the
tests start inherit them. tests/conftest.py also refuses any connection beyond the loopback."""

import os

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
os.environ.update(OFFLINE)

# Under pytest-xdist (make test) two workers share two cores: one compute thread per process (and per stage it
# starts) instead of OpenMP thread pools oversubscribing the cores and spinning against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
