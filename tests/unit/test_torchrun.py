"""How the train stage launches torchrun: one node standalone, several through one c10d rendezvous."""

from __future__ import annotations

import pytest

from tasks.plumbing.errors import PipelineError
from tasks.plumbing.params import parse_params
from tasks.training.launch import Role, rendezvous_endpoint, role, torchrun_command
from tests.helpers import merge, tiny_params


def train_params(**train):
    return parse_params(merge(tiny_params(), {"train": train}))


def test_one_node_runs_standalone():
    command = torchrun_command(train_params(num_processes=4))
    assert command[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone", "-m", "tasks.train"]


def test_several_nodes_meet_at_one_rendezvous_whose_id_follows_the_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tokenized data here: the id comes from the params alone
    params = train_params(nodes=3, num_processes=2, rendezvous="node-0.train:29400")
    command = torchrun_command(params)
    assert command[3:8] == ["--nproc-per-node=2", "--nnodes=3", "--rdzv-backend=c10d",
                            "--rdzv-endpoint=node-0.train:29400", command[7]]  # fmt: skip
    assert command[7].startswith("--rdzv-id=") and command[-2:] == ["-m", "tasks.train"]
    assert torchrun_command(params)[7] == command[7]  # every node computes the same id
    assert (
        torchrun_command(train_params(nodes=3, num_processes=2, rendezvous="node-0.train:29400", seed=7))[7]
        != (command[7])
    )  # another job's nodes never join this one


@pytest.mark.parametrize(
    ("rendezvous", "environ", "endpoint"),
    [
        ("10.0.0.5:29500", {"MASTER_ADDR": "elsewhere"}, "10.0.0.5:29500"),  # params first
        (None, {"PET_RDZV_ENDPOINT": "head:1234", "MASTER_ADDR": "m"}, "head:1234"),  # torchrun's own variable
        (None, {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}, "job-master-0:23456"),  # a PyTorchJob
        (None, {"MASTER_ADDR": "job-master-0"}, "job-master-0:29500"),
    ],
)
def test_the_rendezvous_comes_from_params_or_the_scheduler(rendezvous, environ, endpoint):
    assert rendezvous_endpoint(train_params(nodes=2, rendezvous=rendezvous).train, environ) == endpoint


def test_several_nodes_with_nowhere_to_meet_is_one_line():
    with pytest.raises(PipelineError, match=r"^train.nodes: 2 nodes need a place to meet: set train.rendezvous"):
        rendezvous_endpoint(train_params(nodes=2).train, {})


@pytest.mark.parametrize("bad", ["node-0", "host:port", "a b:1", "h:123456"])
def test_a_rendezvous_that_is_not_host_port_is_refused(bad):
    with pytest.raises(PipelineError, match=r"train\.rendezvous"):
        train_params(nodes=2, rendezvous=bad)


@pytest.mark.parametrize(
    ("train", "environ", "expected"),
    [
        ({}, {}, Role.SINGLE),
        ({"num_processes": 4}, {}, Role.LAUNCHER),
        ({"nodes": 2, "num_processes": 4}, {}, Role.NODE_LAUNCHER),
        ({"num_processes": 4}, {"LOCAL_RANK": "1", "RANK": "1", "GPT2_PIPELINE_RUN_ID": "r"}, Role.WORKER),
        ({"num_processes": 4}, {"LOCAL_RANK": "0", "RANK": "0", "GPT2_PIPELINE_RUN_ID": "r"}, Role.WORKER),
        ({"nodes": 2, "num_processes": 4}, {"LOCAL_RANK": "3", "RANK": "7"}, Role.WORKER),
        ({"nodes": 2, "num_processes": 4}, {"LOCAL_RANK": "0", "RANK": "0"}, Role.GLOBAL_RANK_0),
    ],
)
def test_each_process_of_the_train_stage_knows_its_role(train, environ, expected):
    """torchrun's variables and the launcher's run id decide what a process does; one function says it."""
    assert role(train_params(**train).train, environ) is expected
