"""The accelerator a run asked for (--accelerator) and found: the start-up check, its diagnosis, the device log.

A GPU or TPU job that lands on a machine where TensorFlow sees no such device must not train on the CPU: it
would run for days without a word. So --accelerator=gpu|tpu fails at start-up, naming what TensorFlow found and
the likely cause, which this module works out from the things that go wrong in practice (a CPU-only TensorFlow
build, the NVIDIA driver not on the library path, no libtpu).
"""

import ctypes
import importlib.metadata
import importlib.util
import os

from absl import logging
import tensorflow as tf

from trainer.training import distribution
from trainer.config import Config
from trainer.errors import UsageError
from trainer.errors import one_line

# Where GKE's NVIDIA device plugin mounts the driver in every GPU container (Vertex AI's GPU machines do the same);
# the images put them on LD_LIBRARY_PATH and PATH (see the Dockerfile).
NVIDIA_LIBRARY_DIR = "/usr/local/nvidia/lib64"
NVIDIA_BINARY_DIR = "/usr/local/nvidia/bin"
DRIVER_LIBRARY = "libcuda.so.1"
# The distributions TensorFlow ships under; only one is installed at a time.
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-tpu", "tensorflow-intel")


def create_strategy(config: Config) -> tf.distribute.Strategy:
    """The run's strategy (distribution.create_strategy) on the devices --accelerator asks for, or a UsageError
    that names what TensorFlow found and why the accelerator is missing."""
    if config.accelerator == "cpu":
        # Before TensorFlow initialises its devices; a GPU it never sees cannot be picked by --strategy=auto.
        tf.config.set_visible_devices([], "GPU")
    elif config.accelerator == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise UsageError(f"--accelerator=gpu: TensorFlow sees no GPU, only {found_devices()}. Likely cause: "
                         f"{gpu_cause(**gpu_probe())}")
    elif config.accelerator == "tpu":
        problem = tpu_library_problem(**tpu_probe())
        if problem:
            raise UsageError(f"--accelerator=tpu: TensorFlow cannot use a TPU ({found_devices()} only). Likely "
                             f"cause: {problem}")
    try:
        strategy = distribution.create_strategy(config)
    except UsageError as error:
        if config.accelerator != "tpu":
            raise
        reason = one_line(error.__cause__ or error, 120)
        if "Graph execution error" in reason:  # TensorFlow's wording for a failed TPU initialisation says no more.
            reason = "initialising the TPU system failed"
        raise UsageError(f"--accelerator=tpu: no TPU answered at --tpu={config.tpu} ({reason}). Likely cause: "
                         f"{TPU_NOT_ATTACHED}") from error
    if config.accelerator == "tpu" and not isinstance(strategy, tf.distribute.TPUStrategy):
        raise UsageError(f"--accelerator=tpu needs --strategy=tpu or auto, not --strategy={config.strategy}.")
    if config.accelerator == "auto" and device_kind(strategy) == "CPU":
        logging.warning("No GPU or TPU found: training on the CPU. Give --accelerator=gpu or tpu to make a job "
                        "that needs one fail instead.")
    return strategy


def found_devices() -> str:
    devices = [device.name.replace("/physical_device:", "") for device in tf.config.list_physical_devices()]
    return ", ".join(devices) or "no devices"


def gpu_probe() -> dict:
    """What gpu_cause needs to know about this machine."""
    try:
        ctypes.CDLL(DRIVER_LIBRARY)
        driver_error = None
    except OSError as error:
        driver_error = one_line(error, 120)
    return {"tensorflow": tensorflow_distribution(), "built_with_cuda": tf.test.is_built_with_cuda(),
            "driver_error": driver_error, "cuda_wheels": importlib.util.find_spec("nvidia") is not None,
            "environment": {name: os.environ.get(name) for name in
                            ("LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}}


def gpu_cause(tensorflow: str, built_with_cuda: bool, driver_error: str | None, cuda_wheels: bool,
              environment: dict) -> str:
    """Why TensorFlow sees no GPU, most basic reason first, with what to do about it."""
    if not built_with_cuda:
        return (f"this TensorFlow build ({tensorflow}) has no CUDA support; run the gpu image "
                "(python -m launch.build --accelerator=gpu) or install tensorflow[and-cuda].")
    if driver_error is not None:
        path = environment.get("LD_LIBRARY_PATH") or "unset"
        return (f"the NVIDIA driver library {DRIVER_LIBRARY} does not load ({driver_error}). On GKE the device "
                f"plugin mounts the driver in {NVIDIA_LIBRARY_DIR}, which must be on LD_LIBRARY_PATH (it is {path}); "
                "elsewhere the machine has no NVIDIA driver installed, or no GPU.")
    if not cuda_wheels:
        return ("the driver loads, but the CUDA and cuDNN libraries are missing: install tensorflow[and-cuda] "
                "(the gpu image has them).")
    hidden = [f"{name}={value!r}" for name, value in environment.items()
              if name != "LD_LIBRARY_PATH" and value is not None and value.strip() in ("", "-1", "void", "none")]
    if hidden:
        return f"{' and '.join(hidden)} hides every GPU from this process."
    return ("the driver and CUDA load but find no GPU: the machine or pod has none attached (on GKE, ask for "
            "nvidia.com/gpu), or the driver is older than this CUDA; run nvidia-smi on the machine.")


def tpu_probe() -> dict:
    library_path = os.environ.get("TPU_LIBRARY_PATH") or None
    package = importlib.util.find_spec("libtpu")
    return {"tensorflow": tensorflow_distribution(), "library_path": library_path,
            "library_exists": library_path is not None and os.path.isfile(library_path),
            "package_path": os.path.join(package.submodule_search_locations[0], "libtpu.so") if package else None}


def tpu_library_problem(tensorflow: str, library_path: str | None, library_exists: bool,
                        package_path: str | None) -> str | None:
    """Why TensorFlow cannot load the TPU runtime, or None when it should be able to."""
    if not tensorflow.startswith("tensorflow-tpu"):
        return (f"this TensorFlow build ({tensorflow}) has no TPU support; run the tpu image "
                "(python -m launch.build --accelerator=tpu) or install tensorflow-tpu.")
    if library_path is not None and not library_exists:
        return f"TPU_LIBRARY_PATH={library_path} does not exist; point it at libtpu.so."
    if library_path is None and package_path is None:
        # Without the variable, tensorflow-tpu 2.20 looks for the libtpu package's libtpu.so itself.
        return ("no libtpu: TPU_LIBRARY_PATH is unset and the libtpu package is not installed; pip install libtpu "
                "(the tpu image has it) or point TPU_LIBRARY_PATH at libtpu.so.")
    return None


TPU_NOT_ATTACHED = ("this machine has no TPU (use a TPU VM, or on GKE a pod that asks for google.com/tpu), or another "
                    "process holds it (/tmp/libtpu_lockfile).")


def tensorflow_distribution() -> str:
    """The installed TensorFlow distribution and version, e.g. 'tensorflow-cpu 2.21.0'."""
    for name in TENSORFLOW_DISTRIBUTIONS:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"tensorflow {tf.__version__}"


def worker_devices(strategy: tf.distribute.Strategy) -> list[str]:
    """The devices this worker trains on; the default strategy has no list, and runs on the first GPU if any."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:
        return [device.name for device in (tf.config.list_logical_devices("GPU")
                                           or tf.config.list_logical_devices("CPU"))[:1]]


def device_kind(strategy: tf.distribute.Strategy) -> str:
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "TPU"
    devices = worker_devices(strategy)
    return "GPU" if any(tf.DeviceSpec.from_string(name).device_type == "GPU" for name in devices) else "CPU"


def describe_devices(strategy: tf.distribute.Strategy) -> str:
    """This worker's devices with their model: '2 x GPU (NVIDIA H100 80GB HBM3, compute capability 9.0)'."""
    kind = device_kind(strategy)
    count = len(worker_devices(strategy))
    if kind == "GPU":
        gpus = tf.config.list_physical_devices("GPU")
        details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
        model = details.get("device_name", "unknown model")
        capability = details.get("compute_capability")
        if capability:
            model += f", compute capability {capability[0]}.{capability[1]}"
        return f"{count} x GPU ({model})"
    if kind == "TPU":
        # TensorFlow names TPU cores but not their generation; Cloud TPU VMs and GKE's TPU pods say it here.
        generation = os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_TYPE") or "generation unknown"
        return f"{strategy.num_replicas_in_sync} x TPU core ({generation})"
    return f"{count} x CPU ({cpu_model()})"


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as file:
            line = next((line for line in file if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or "model unknown"


def log_devices(strategy: tf.distribute.Strategy, precision: str, jit_compile: bool | None) -> None:
    """The start-up line that says what the run trains on."""
    xla = "on (TPU)" if jit_compile is None else "on" if jit_compile else "off"
    logging.info("Training on %s; precision %s; XLA %s; %s.", describe_devices(strategy), precision, xla,
                 tensorflow_distribution())
