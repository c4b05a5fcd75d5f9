"""python -m launch.vertex tune: the HyperparameterTuningJob, parsed into google-cloud-aiplatform's message type."""

import json

import pytest

import vertex_api
from helpers import run_task
from helpers import single_error_line
from launch_fakes import printed_commands

IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-gpu"
BASE = ["tune", "--project=my-project", f"--image={IMAGE}", "--output_dir=gs://my-bucket/runs",
        "--job_name=cifar-tune-test"]
PARAMETERS = ("--parameter=learning_rate:log:1e-4:1e-1", "--parameter=batch_size:discrete:128,256")


def dry_run(*flags: str, trainer: tuple[str, ...] = ("--model=cnn", "--epochs=20")):
    result = run_task(*BASE, *flags, "--dry_run", "--", *trainer, module="launch.vertex", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), printed_commands(result.stderr)


def test_tuning_job_from_the_issue_example():
    body, commands = dry_run(*PARAMETERS, "--max_trials=12", "--parallel_trials=3")
    job = vertex_api.parse(body, "HyperparameterTuningJob")
    assert (job.max_trial_count, job.parallel_trial_count) == (12, 3)
    study = body["studySpec"]
    assert study["metrics"] == [{"metricId": "eval_accuracy", "goal": "MAXIMIZE"}]
    assert study["parameters"] == [
        {"parameterId": "learning_rate", "doubleValueSpec": {"minValue": 1e-4, "maxValue": 0.1},
         "scaleType": "UNIT_LOG_SCALE"},
        # An integer flag's choices go as words: Vertex AI would pass discrete values as "128.0".
        {"parameterId": "batch_size", "categoricalValueSpec": {"values": ["128", "256"]}}]
    (pool,) = body["trialJobSpec"]["workerPoolSpecs"]
    assert pool["containerSpec"]["args"] == ["--strategy=one_device", "--accelerator=gpu", "--model=cnn",
                                             "--epochs=20"]
    assert body["trialJobSpec"]["baseOutputDirectory"] == {"outputUriPrefix": "gs://my-bucket/runs/cifar-tune-test"}
    (command,) = commands
    assert command[:4] == ["gcloud", "ai", "hp-tuning-jobs", "create"]
    assert "--max-trial-count=12" in command and "--parallel-trial-count=3" in command
    assert "--config=CONFIG_FILE.json" in command  # hp-tuning-jobs create reads no stdin


def test_loss_is_minimised_and_other_spec_kinds_parse():
    body, _ = dry_run("--parameter=epochs:linear:5:30", "--parameter=dropout:discrete:0.5,0.3",
                      "--parameter=optimizer:categorical:adam,sgd", "--parameter=weight_decay:reverse_log:1e-5:1e-2",
                      "--metric=eval_loss", "--algorithm=random", "--max_failed_trials=2", "--topology=multi_gpu",
                      "--gpus=2", trainer=("--model=cnn",))
    vertex_api.parse(body, "HyperparameterTuningJob")
    assert body["studySpec"]["metrics"] == [{"metricId": "eval_loss", "goal": "MINIMIZE"}]
    assert body["studySpec"]["algorithm"] == "RANDOM_SEARCH" and body["maxFailedTrialCount"] == 2
    epochs, dropout, optimizer, decay = body["studySpec"]["parameters"]
    assert epochs["integerValueSpec"] == {"minValue": "5", "maxValue": "30"}
    assert dropout["discreteValueSpec"] == {"values": [0.3, 0.5]}
    assert optimizer["categoricalValueSpec"] == {"values": ["adam", "sgd"]}
    assert decay["scaleType"] == "UNIT_REVERSE_LOG_SCALE"


@pytest.mark.parametrize("flags, expected", [
    (("--parameter=learning_rat:log:1e-4:1e-1",), "'learning_rat' is not a trainer flag"),
    (("--parameter=model_dir:categorical:a,b",), "'model_dir' is not a trainer flag a trial can set"),
    (("--parameter=learning_rate:log:0:1e-1",), "MIN > 0 on a log scale"),
    (("--parameter=learning_rate:linear:0.1:0.01",), "needs MIN < MAX"),
    (("--parameter=batch_size:discrete:128",), "two or more values"),
    (("--parameter=learning_rate:cubic:1:2",), "TYPE must be one of"),
    (("--parameter=learning_rate:log:a:b",), "use NAME:TYPE:VALUES"),
    ((), "tune needs at least one --parameter"),
    (("--parameter=learning_rate:log:1e-4:1e-1", "--parallel_trials=20"), "--parallel_trials=20 must be 1 to"),
])
def test_bad_tuning_flags_are_one_line(flags, expected):
    result = run_task(*BASE, *flags, "--dry_run", "--", "--model=cnn", module="launch.vertex", timeout=60)
    assert result.returncode == 2 and expected in single_error_line(result)
    assert result.stdout == ""


def test_a_tuned_flag_may_not_also_be_given_to_the_trainer():
    result = run_task(*BASE, *PARAMETERS, "--dry_run", "--", "--learning_rate=0.01", module="launch.vertex",
                      timeout=60)
    assert "trainer flag --learning_rate is tuned" in single_error_line(result)


def test_grid_search_refuses_a_continuous_range():
    result = run_task(*BASE, "--parameter=learning_rate:log:1e-4:1e-1", "--parameter=epochs:linear:5:10",
                      "--algorithm=grid", "--dry_run", "--", "--model=cnn", module="launch.vertex", timeout=60)
    line = single_error_line(result)
    assert result.returncode == 2 and "--algorithm=grid" in line and "learning_rate" in line, line
    allowed = run_task(*BASE, "--parameter=learning_rate:discrete:0.01,0.1", "--parameter=epochs:linear:5:10",
                       "--algorithm=grid", "--dry_run", "--", "--model=cnn", module="launch.vertex", timeout=60)
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize("parameter, trainer, expected", [
    ("--parameter=model:categorical:cnn,cnnx", ("--epochs=2",), "model=cnnx"),
    ("--parameter=optimizer:categorical:adam,adamw_typo", ("--model=cnn",), "optimizer=adamw_typo"),
    ("--parameter=fine_tune_epochs:linear:1:3", ("--model=cnn",), "fine_tune_epochs"),
])
def test_each_tuned_value_passes_the_trainers_own_checks(parameter, trainer, expected):
    """A choice the trainer refuses (or a range no trial could run with these flags) fails before submission."""
    result = run_task(*BASE, parameter, "--dry_run", "--", *trainer, module="launch.vertex", timeout=60)
    line = single_error_line(result)
    assert result.returncode == 2 and expected in line, line
