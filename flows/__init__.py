"""The Prefect side of gpt2-pipeline: the flows, the `gpt2-pipeline` command and the run workspaces."""

import os

# The ephemeral Prefect server a command starts records a telemetry session as it starts, racing its own
# services for the SQLite database (a "database is locked" traceback in a command that succeeds), and then calls
# Prefect's telemetry endpoint ("Failed to send telemetry" offline). Off unless the user asks for it; set before
# any module here imports prefect, which reads its settings then.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
