"""Create the pipeline's own MLflow user on a basic-auth server, as its admin.

The compose stack's mlflow-users job runs it: the worker then holds this user's password, not the admin's. Running
it again changes nothing.

Reads MLFLOW_TRACKING_URI and the admin's MLFLOW_TRACKING_USERNAME/PASSWORD, and PIPELINE_USER/PIPELINE_PASSWORD.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    user, password = os.environ["PIPELINE_USER"], os.environ["PIPELINE_PASSWORD"]
    client = AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"])
    try:
        client.create_user(user, password)
        print(f"MLflow user {user} created")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            print(f"error: cannot create MLflow user {user}: {exc.message.splitlines()[0]}", file=sys.stderr)
            return 1
        print(f"MLflow user {user} exists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
