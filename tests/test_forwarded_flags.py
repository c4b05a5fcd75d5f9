"""Every launcher checks the trainer's and the server's flags after `--` with their own definitions before it submits
anything (launch/forwarded_flags.py); the real gcloud path is in test_launch_gcloud.py."""

import pytest

from helpers import run_task
from helpers import single_error_line
from launch import forwarded_flags
from trainer.errors import UsageError

GPU_IMAGE = "us-central1-docker.pkg.dev/my-project/training/cifar-trainer:0123456789ab-gpu"
CPU_IMAGE = GPU_IMAGE.replace("-gpu", "-cpu")
RUN = "gs://my-bucket/runs/cifar-job/model"
LAUNCHERS = {
    "vertex": ("launch.vertex", "--project=my-project", f"--image={GPU_IMAGE}", "--output_dir=gs://my-bucket/runs",
               "--dry_run"),
    "tune": ("launch.vertex", "tune", "--project=my-project", f"--image={GPU_IMAGE}",
             "--output_dir=gs://my-bucket/runs", "--parameter=learning_rate:log:1e-4:1e-1", "--dry_run"),
    "gke": ("launch.gke", f"--image={GPU_IMAGE}", "--output_dir=gs://my-bucket/runs", "--dry_run"),
    "local": ("launch.local", "--workers=2"),
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("trainer, named", [("--modle=cnn", "modle"), ("--epochs=abc", "--epochs=abc"),
                                            ("--model=cnnx", "--model=cnnx")])
def test_a_bad_trainer_flag_is_one_line_before_anything_runs(launcher, trainer, named, tmp_path):
    module, *flags = LAUNCHERS[launcher]
    result = run_task(*flags, "--", trainer, module=module, timeout=60, cwd=str(tmp_path))
    line = single_error_line(result)
    assert result.returncode == 2 and "trainer flags after --" in line and named in line, line
    assert result.stdout == "" and list(tmp_path.iterdir()) == []  # launch.local started no worker.


@pytest.mark.parametrize("launcher", [("launch.vertex", "deploy", "--project=my-project", f"--model_dir={RUN}",
                                       f"--image={CPU_IMAGE}", "--dry_run"),
                                      ("launch.gke", "serve", f"--image={CPU_IMAGE}", f"--model_dir={RUN}",
                                       "--dry_run")], ids=["vertex-deploy", "gke-serve"])
def test_a_bad_server_flag_is_one_line(launcher):
    module, *flags = launcher
    result = run_task(*flags, "--", "--max_batch_sise=3", module=module, timeout=120)
    line = single_error_line(result)
    assert result.returncode == 2 and "trainer.serve flags after --" in line and "max_batch_sise" in line, line
    assert result.stdout == ""


def test_a_server_flag_value_is_checked_by_the_servers_rules():
    with pytest.raises(UsageError, match="--max_batch_size=0 must be from 1 to 4096"):
        forwarded_flags.check_serve_flags(["--max_batch_size=0"])
    forwarded_flags.check_serve_flags(["--max_batch_size=8", "--batch_timeout_ms=5"])


def test_rules_between_trainer_flags_are_checked():
    with pytest.raises(UsageError, match="--fine_tune_epochs applies to --model=resnet50 only"):
        forwarded_flags.check_trainer_flags(["--model=cnn", "--fine_tune_epochs=2"])


def test_a_weights_file_is_looked_for_in_the_container_not_here():
    """A cloud job reads --weights inside its image; launch.local reads it on this machine."""
    forwarded_flags.check_trainer_flags(["--model=resnet50", "--weights=/app/weights.h5"])
    with pytest.raises(UsageError, match="no such file"):
        forwarded_flags.check_trainer_flags(["--model=resnet50", "--weights=/app/weights.h5"], local_files=True)


def test_valid_flags_pass_with_the_launchers_own():
    forwarded_flags.check_trainer_flags(["--model=airbench", "--epochs=3", "--precision=mixed_bfloat16"],
                                        ["--strategy=tpu", "--accelerator=tpu", "--tpu=local"])
