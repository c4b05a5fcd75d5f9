"""--accelerator: a GPU or TPU job on a machine without one fails in one line naming the likely cause; device log."""

import logging
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from helpers import ROOT
from helpers import fails_in_process
from trainer.training import accelerators
from trainer import config as config_lib
from trainer import task
from trainer.errors import UsageError

CUDA_BUILD = dict(tensorflow="tensorflow 2.21.0", built_with_cuda=True, driver_error=None, cuda_wheels=True,
                  environment={"LD_LIBRARY_PATH": "/usr/local/nvidia/lib64", "CUDA_VISIBLE_DEVICES": None,
                               "NVIDIA_VISIBLE_DEVICES": None})


def test_gpu_job_on_this_cpu_machine_fails_in_one_line_naming_what_it_found(capsys, tmp_path):
    line = fails_in_process(capsys, task, "--accelerator=gpu", f"--model_dir={tmp_path / 'run'}")
    assert line.startswith("error: --accelerator=gpu: TensorFlow sees no GPU, only CPU:0. Likely cause: ")
    # This machine's TensorFlow is built with CUDA and has no driver: the line says where GKE puts it.
    if tf.test.is_built_with_cuda():
        assert "libcuda.so.1 does not load" in line and "/usr/local/nvidia/lib64" in line
    assert not (tmp_path / "run").exists()  # It stopped before the run wrote anything.


def test_the_images_default_makes_a_plain_run_check_its_accelerator(capsys, monkeypatch, tmp_path):
    """The images set $TRAINER_ACCELERATOR, so `docker run IMAGE` with no flags cannot fall back to the CPU."""
    monkeypatch.setenv("TRAINER_ACCELERATOR", "gpu")
    line = fails_in_process(capsys, task, f"--model_dir={tmp_path}")
    assert line.startswith("error: --accelerator=gpu: TensorFlow sees no GPU")
    monkeypatch.setenv("TRAINER_ACCELERATOR", "cpu")  # An explicit flag still wins.
    assert fails_in_process(capsys, task, "--accelerator=tpu", f"--model_dir={tmp_path}").startswith(
        "error: --accelerator=tpu")


def test_tpu_job_without_a_tpu_build_names_the_build(capsys, tmp_path):
    line = fails_in_process(capsys, task, "--accelerator=tpu", f"--model_dir={tmp_path}")
    assert "--accelerator=tpu: TensorFlow cannot use a TPU" in line and "has no TPU support" in line


def test_unknown_accelerator_in_the_environment_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINER_ACCELERATOR", "npu")
    with pytest.raises(UsageError, match=r"\$TRAINER_ACCELERATOR=npu is unknown; use one of auto, cpu, gpu, tpu"):
        config_lib.build_config(model_dir=str(tmp_path))


def test_accelerator_tpu_means_the_attached_tpu_unless_one_is_named(monkeypatch, tmp_path):
    monkeypatch.delenv("TPU_NAME", raising=False)
    assert config_lib.build_config(accelerator="tpu", model_dir=str(tmp_path)).tpu == "local"
    assert config_lib.build_config(accelerator="tpu", tpu="my-tpu", model_dir=str(tmp_path)).tpu == "my-tpu"
    assert config_lib.build_config(model_dir=str(tmp_path)).tpu is None


@pytest.mark.parametrize("probe, expected", [
    (dict(CUDA_BUILD, tensorflow="tensorflow-cpu 2.21.0", built_with_cuda=False),
     "this TensorFlow build (tensorflow-cpu 2.21.0) has no CUDA support"),
    (dict(CUDA_BUILD, driver_error="libcuda.so.1: cannot open shared object file",
          environment={**CUDA_BUILD["environment"], "LD_LIBRARY_PATH": None}),
     "libcuda.so.1 does not load (libcuda.so.1: cannot open shared object file). On GKE the device plugin mounts "
     "the driver in /usr/local/nvidia/lib64, which must be on LD_LIBRARY_PATH (it is unset)"),
    (dict(CUDA_BUILD, cuda_wheels=False), "the CUDA and cuDNN libraries are missing: install tensorflow[and-cuda]"),
    (dict(CUDA_BUILD, environment={**CUDA_BUILD["environment"], "CUDA_VISIBLE_DEVICES": "-1"}),
     "CUDA_VISIBLE_DEVICES='-1' hides every GPU"),
    (CUDA_BUILD, "the machine or pod has none attached (on GKE, ask for nvidia.com/gpu)"),
])
def test_gpu_cause_names_the_most_basic_problem_first(probe, expected):
    assert expected in accelerators.gpu_cause(**probe)


@pytest.mark.parametrize("probe, expected", [
    (dict(tensorflow="tensorflow 2.21.0", library_path=None, library_exists=False, package_path=None),
     "this TensorFlow build (tensorflow 2.21.0) has no TPU support"),
    (dict(tensorflow="tensorflow-tpu 2.20.0", library_path="/opt/venv/lib/libtpu.so", library_exists=False,
          package_path=None), "TPU_LIBRARY_PATH=/opt/venv/lib/libtpu.so does not exist"),
    (dict(tensorflow="tensorflow-tpu 2.20.0", library_path=None, library_exists=False, package_path=None),
     "no libtpu: TPU_LIBRARY_PATH is unset and the libtpu package is not installed"),
    (dict(tensorflow="tensorflow-tpu 2.20.0", library_path=None, library_exists=False,
          package_path="/opt/venv/lib/python3.11/site-packages/libtpu/libtpu.so"), None),
    (dict(tensorflow="tensorflow-tpu 2.20.0", library_path="/lib/libtpu.so", library_exists=True, package_path=None),
     None),
])
def test_tpu_library_problem(probe, expected):
    problem = accelerators.tpu_library_problem(**probe)
    assert problem == expected if expected is None else expected in problem


def test_start_up_log_names_the_devices_precision_and_xla(caplog):
    strategy = tf.distribute.get_strategy()
    with caplog.at_level(logging.INFO, logger="absl"):
        accelerators.log_devices(strategy, "mixed_bfloat16", False)
    (message,) = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Training on")]
    assert message.startswith(f"Training on 1 x CPU ({accelerators.cpu_model()}); precision mixed_bfloat16; XLA off; "
                              "tensorflow")
    assert accelerators.cpu_model() != "model unknown"  # Linux names its CPU in /proc/cpuinfo.


def test_without_tpu_chips_libtpu_does_not_wait_for_a_metadata_server():
    """tensorflow-tpu's libtpu would ask the Cloud TPU metadata server, for minutes, on a machine with no TPU; this
    one has no /dev/accel* or /dev/vfio/N, so importing the package must tell it not to."""
    environment = {name: value for name, value in os.environ.items() if name != "TPU_SKIP_MDS_QUERY"}
    result = subprocess.run([sys.executable, "-c", "import os, trainer; print(os.environ.get('TPU_SKIP_MDS_QUERY'))"],
                            capture_output=True, text=True, env={**environment, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.stdout.strip() == "1", result.stderr
