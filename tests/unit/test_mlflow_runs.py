"""The run of a model is found from the record in its folder, in any store, and is never left RUNNING."""

from __future__ import annotations

import contextlib

import pytest

from tasks.plumbing.errors import PipelineError, Stopped
from tasks.plumbing.params import parse_params
from tasks.tracking import mlflow_runs, store
from tests.helpers import tiny_params


@pytest.fixture
def params():
    return parse_params(tiny_params())


def test_the_recorded_run_is_the_models_run(tmp_path, mlflow_run, params):
    mlflow_runs.write_record(tmp_path, mlflow_run)
    assert mlflow_runs.model_run(params, tmp_path) == mlflow_run


def test_a_model_from_another_store_gets_one_stand_in_run(tmp_path, mlflow_run, params, capsys):
    mlflow_runs.write_record(tmp_path, "0123456789abcdef0123456789abcdef")  # recorded where this store never was
    stand_in = mlflow_runs.model_run(params, tmp_path)
    assert stand_in != mlflow_run and "is not in sqlite:///" in capsys.readouterr().out
    assert store.client().get_run(stand_in).data.tags["trained_in_run"] == "0123456789abcdef0123456789abcdef"
    assert mlflow_runs.model_run(params, tmp_path) == stand_in  # evaluate and register log to the same one


@pytest.mark.parametrize(
    ("error", "status"), [(None, "FINISHED"), (PipelineError("bad"), "FAILED"), (Stopped(), "KILLED")]
)
def test_a_stage_closes_the_run_it_opened(mlflow_run, error, status):
    client = store.client()
    with pytest.raises(type(error)) if error else contextlib.nullcontext(), mlflow_runs.active(mlflow_run):
        assert client.get_run(mlflow_run).info.status == "RUNNING"
        if error:
            raise error
    assert client.get_run(mlflow_run).info.status == status
