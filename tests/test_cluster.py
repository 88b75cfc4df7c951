"""Roles from the environment, and the command lines the local launcher hands its processes."""

import json
import sys

import mlflow
import pytest
from mlflow.entities import RunStatus

from pipeline import cluster, config, train, tune
from pipeline.errors import PipelineError


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    for name in (cluster.TUNER_ID_ENV, cluster.ORACLE_IP_ENV, cluster.ORACLE_PORT_ENV, cluster.TF_CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)


def set_tuner(monkeypatch, tuner_id):
    monkeypatch.setenv(cluster.ORACLE_IP_ENV, "127.0.0.1")
    monkeypatch.setenv(cluster.ORACLE_PORT_ENV, "8000")
    monkeypatch.setenv(cluster.TUNER_ID_ENV, tuner_id)


def test_tuner_role_follows_keras_tuners_rule(monkeypatch):
    assert cluster.tuner_role() is None
    set_tuner(monkeypatch, "chief")
    assert cluster.tuner_role() == cluster.CHIEF
    set_tuner(monkeypatch, "tuner3")
    assert cluster.tuner_role() == "tuner3"
    monkeypatch.delenv(cluster.ORACLE_PORT_ENV)
    with pytest.raises(PipelineError, match=cluster.ORACLE_PORT_ENV):
        cluster.tuner_role()


@pytest.mark.parametrize(
    ("tf_config", "chief"),
    [
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, True),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, False),
        ({"cluster": {"chief": ["c:3"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, False),
        ({"cluster": {"chief": ["c:3"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, True),
    ],
)
def test_the_chief_is_worker_0_unless_the_cluster_names_one(monkeypatch, tf_config, chief):
    monkeypatch.setenv(cluster.TF_CONFIG_ENV, json.dumps(tf_config))
    assert cluster.is_chief() is chief


@pytest.mark.parametrize(
    "text",
    ["{", '{"cluster": {}}', '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}'],
)
def test_a_tf_config_that_cannot_drive_a_worker_is_refused(monkeypatch, text):
    monkeypatch.setenv(cluster.TF_CONFIG_ENV, text)
    with pytest.raises(PipelineError, match="TF_CONFIG must look like"):
        cluster.tf_config()


def test_tf_config_for_names_every_worker_and_the_task():
    value = json.loads(cluster.tf_config_for(["127.0.0.1:1", "127.0.0.1:2"], 1))
    assert value == {
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "task": {"type": "worker", "index": 1},
    }


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        (tune, ["--max-trials", "3", "--augment", "false", "--workers", "2", "--onehot-run-id", "abc"]),
        (
            train,
            ["--learning-rate", "0.0003", "--strategy", "multiworker", "--workers", "3", "--augment", "no"],
        ),
    ],
)
def test_options_survive_the_trip_to_a_child_command_line(module, argv):
    options = vars(module.parse_args(argv))
    assert vars(module.parse_args(cluster.to_argv(options))) == options


def test_a_tuner_worker_without_its_search_run_exits_2_and_logs_nothing(mlflow_store, monkeypatch, caplog):
    set_tuner(monkeypatch, "tuner0")
    with pytest.raises(SystemExit) as exit_info:
        tune.main([])
    assert exit_info.value.code == 2
    assert "needs --parent-run-id" in caplog.text
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_tuner_worker_refuses_a_search_run_that_has_ended(mlflow_store, monkeypatch, caplog):
    with mlflow.start_run() as ended:
        mlflow.set_tag(config.STAGE_TAG, "tune")
    set_tuner(monkeypatch, "tuner0")
    with pytest.raises(SystemExit):
        tune.main(["--parent-run-id", ended.info.run_id])
    assert "is a FINISHED tune run, not the RUNNING tune run" in caplog.text


def test_multiworker_training_with_a_broken_tf_config_exits_2(mlflow_store, monkeypatch, caplog):
    monkeypatch.setenv(cluster.TF_CONFIG_ENV, '{"task": {}}')
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--strategy", "multiworker"])
    assert exit_info.value.code == 2
    assert "TF_CONFIG must look like" in caplog.text


def test_end_running_children_ends_only_the_matching_running_ones(mlflow_store):
    client = mlflow.MlflowClient()
    with mlflow.start_run() as parent:
        experiment = parent.info.experiment_id

        def child(tuner_id):  # created, never ended: what a killed process leaves behind
            tags = {"mlflow.parentRunId": parent.info.run_id, tune.TUNER_ID_TAG: tuner_id}
            return client.create_run(experiment, tags=tags).info.run_id

        other, orphan, finished = child("tuner0"), child("tuner1"), child("tuner1")
        client.set_terminated(finished)
        ended = cluster.end_running_children(
            parent.info.run_id, {tune.TUNER_ID_TAG: "tuner1"}, RunStatus.KILLED
        )
    assert ended == [orphan]
    status = {run_id: client.get_run(run_id).info.status for run_id in (other, orphan, finished)}
    assert status == {other: "RUNNING", orphan: "KILLED", finished: "FINISHED"}


def test_wait_for_port_names_a_process_that_died_while_starting(tmp_path):
    process = cluster.Process(
        "chief", [sys.executable, "-c", "print('no oracle today'); raise SystemExit(3)"], {}, tmp_path
    )
    process.start()
    with pytest.raises(PipelineError, match="chief exited with 3 while starting:(.|\n)*no oracle today"):
        cluster.wait_for_port(cluster.free_port(), process, timeout=60)
