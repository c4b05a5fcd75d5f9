"""Choosing and building the tf.distribute strategy and the mixed-precision policy for the hardware."""

import contextlib
import json
import os
import socket
import time

from absl import logging
import keras
import tensorflow as tf

from trainer.config import Config
from trainer.errors import Failure
from trainer.errors import UsageError
from trainer.errors import one_line


def configure_host_devices(cpu_devices: int) -> None:
    """Splits the CPU into logical devices; must run before TensorFlow touches a device."""
    if cpu_devices < 2:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == cpu_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_devices)])
    except RuntimeError as error:
        raise UsageError(f"--cpu_devices={cpu_devices}: TensorFlow was already initialised ({error}).") from error


def resolve_strategy_name(config: Config) -> str:
    """The concrete strategy `--strategy=auto` stands for on this machine."""
    if config.strategy != "auto":
        return config.strategy
    if config.tpu:
        return "tpu"
    if _cluster_has_several_tasks():
        return "multi_worker_mirrored"
    num_gpus = len(tf.config.list_physical_devices("GPU"))
    if num_gpus > 1 or (num_gpus == 0 and config.cpu_devices > 1):
        return "mirrored"
    if num_gpus == 1:
        return "one_device"
    return "default"


def _cluster_has_several_tasks() -> bool:
    tf_config = cluster_environment()
    return bool(tf_config) and sum(len(tasks) for tasks in tf_config.get("cluster", {}).values()) > 1


# Vertex AI worker pools: pool 0 is the primary replica, pool 1 the other workers.
VERTEX_POOL_ROLES = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps", "workerpool3": "evaluator"}


def cluster_environment() -> dict | None:
    """The TF_CONFIG this process runs under, from the first of:

    - $TF_CONFIG (Kubeflow, launch.local, any scheduler that sets it);
    - Vertex AI's $CLUSTER_SPEC;
    - a Kubernetes Indexed Job (launch.gke): $WORKER_HOSTS lists every pod's host:port and
      Kubernetes sets $JOB_COMPLETION_INDEX, this pod's index.

    None outside a cluster.
    """
    if os.environ.get("TF_CONFIG"):
        return _checked_cluster(_parse_json("TF_CONFIG"), "TF_CONFIG")
    if os.environ.get("CLUSTER_SPEC"):
        return _checked_cluster(tf_config_from_cluster_spec(_parse_json("CLUSTER_SPEC")), "CLUSTER_SPEC")
    if os.environ.get("WORKER_HOSTS") and os.environ.get("JOB_COMPLETION_INDEX"):
        hosts = [host.strip() for host in os.environ["WORKER_HOSTS"].split(",") if host.strip()]
        index = _task_index(os.environ["JOB_COMPLETION_INDEX"], "$JOB_COMPLETION_INDEX")
        if not 0 <= index < len(hosts):
            raise UsageError(f"$JOB_COMPLETION_INDEX={index} is outside $WORKER_HOSTS ({len(hosts)} hosts).")
        return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
    return None


def _parse_json(variable: str) -> dict:
    try:
        value = json.loads(os.environ[variable])
    except ValueError as error:
        raise UsageError(f"${variable} is not valid JSON ({error}); it should describe the cluster and this task.") \
            from error
    if not isinstance(value, dict) or "cluster" not in value or "task" not in value:
        got = sorted(value)[:5] if isinstance(value, dict) else f"a JSON {type(value).__name__}"
        raise UsageError(f"${variable} needs 'cluster' and 'task' entries, got {got}.")
    if not isinstance(value["cluster"], dict) or not isinstance(value["task"], dict):
        raise UsageError(f"${variable}: 'cluster' and 'task' must be JSON objects, got {value['cluster']!r} and "
                         f"{value['task']!r}.")
    return value


def _task_index(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise UsageError(f"{where}={value!r} must be a task index: a whole number from 0.")
    return int(value)


def _checked_cluster(tf_config: dict, variable: str) -> dict:
    """A TF_CONFIG whose task exists in its cluster, or a UsageError naming the variable and what is wrong."""
    cluster, task = tf_config["cluster"], tf_config["task"]
    if not cluster or not all(isinstance(hosts, list) and hosts for hosts in cluster.values()):
        raise UsageError(f"${variable} describes no cluster: each role needs a list of host:port addresses, got "
                         f"{json.dumps(cluster)[:120]}.")
    for role, hosts in cluster.items():
        if not all(isinstance(host, str) and host.strip() for host in hosts):
            raise UsageError(f"${variable}: the {role} addresses must be \"host:port\" strings, got "
                             f"{json.dumps(hosts)[:120]}.")
    task_type = task.get("type")
    if task_type == "evaluator":  # TensorFlow's side-car evaluator is the one task outside the cluster.
        return tf_config
    if task_type not in cluster:
        raise UsageError(f"${variable}: the task's type {task_type!r} is not a role of the cluster "
                         f"({', '.join(cluster)}).")
    index = _task_index(task.get("index", 0), f"${variable} task index")
    if index >= len(cluster[task_type]):
        raise UsageError(f"${variable}: task index {index} is outside the cluster's {len(cluster[task_type])} "
                         f"{task_type} task(s) (indices from 0).")
    return {"cluster": cluster, "task": {**task, "type": task_type, "index": index}}


def tf_config_from_cluster_spec(cluster_spec: dict) -> dict:
    """Maps Vertex AI's CLUSTER_SPEC onto the TF_CONFIG that TensorFlow's resolver reads."""
    cluster = {VERTEX_POOL_ROLES[pool]: list(addresses) for pool, addresses in cluster_spec["cluster"].items()
               if pool in VERTEX_POOL_ROLES and addresses}
    task = cluster_spec["task"]
    role = VERTEX_POOL_ROLES.get(task.get("type"))
    if role is None:
        raise UsageError(f"$CLUSTER_SPEC task type {task.get('type')!r} is not a Vertex AI worker pool "
                         f"({', '.join(VERTEX_POOL_ROLES)}).")
    return {"cluster": cluster, "task": {"type": role, "index": _task_index(task.get("index", 0),
                                                                            "$CLUSTER_SPEC task index")}}


def create_strategy(config: Config) -> tf.distribute.Strategy:
    """Builds the strategy named by --strategy, checking that its devices exist."""
    name = resolve_strategy_name(config)
    if name == "tpu":
        strategy = _tpu_strategy(config.tpu)
    elif name == "multi_worker_mirrored":
        strategy = _multi_worker_strategy(config)
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=_checked_devices(config.devices) or None)
    elif name == "one_device":
        devices = _checked_devices(config.devices) or [_default_device()]
        if len(devices) != 1:
            raise UsageError(f"--strategy=one_device takes exactly one device, not --devices={','.join(devices)}.")
        strategy = tf.distribute.OneDeviceStrategy(devices[0])
    else:
        if config.devices:
            raise UsageError("--devices applies to --strategy=one_device or mirrored only.")
        strategy = tf.distribute.get_strategy()
    logging.info("Strategy %s (%s) with %d replica(s); this machine has %d GPU(s).", name, type(strategy).__name__,
                 strategy.num_replicas_in_sync, len(tf.config.list_physical_devices("GPU")))
    return strategy


COMMUNICATION = {
    "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
}


def _multi_worker_strategy(config: Config) -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy over the cluster in the environment, failing fast when a peer dies."""
    tf_config = cluster_environment()
    if tf_config is not None:
        roles = set(tf_config["cluster"]) - {"chief", "worker"}
        if roles:
            raise UsageError(f"--strategy=multi_worker_mirrored runs chief and worker tasks only; the cluster also "
                             f"has {', '.join(sorted(roles))}.")
        if tf_config["task"]["type"] not in ("chief", "worker"):
            raise UsageError(f"This task is a {tf_config['task']['type']}; multi_worker_mirrored runs chief and "
                             "worker tasks only.")
        os.environ["TF_CONFIG"] = json.dumps(tf_config)
        wait_for_peers(tf_config, config.cluster_start_timeout)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if resolver.cluster_spec().jobs:
        _configure_failure_detection(resolver, config.heartbeat_timeout)
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                     communication_options=communication_options(config))


# How often a waiting task tries the others' ports (each try waits up to a second), and how long its own listener
# stays up once it has seen them all: longer than a poll, so that every task still waiting sees it.
_POLL_SECONDS, _LINGER_SECONDS = 0.5, 3.0


def wait_for_peers(tf_config: dict, timeout: int) -> None:
    """Waits until every other task of the cluster listens on its port, or fails after `timeout` seconds naming
    the missing ones.

    Creating the strategy blocks inside TensorFlow, holding the interpreter, until every task has joined: a task
    that never comes would hang the job, deaf to SIGTERM and Ctrl-C. This wait is in Python, so signals end it.
    A task is up when its port answers: TensorFlow's server once it creates its strategy, before that this wait's
    own listener on the same port, which never accepts. It stays up a little after the others are seen, for those
    still polling, then closes before TensorFlow binds the port.
    """
    task_type, index = tf_config["task"]["type"], tf_config["task"]["index"]
    missing = {f"{role} {number} ({address})": address for role, addresses in tf_config["cluster"].items()
               for number, address in enumerate(addresses) if (role, number) != (task_type, index)}
    if not missing:
        return
    listener = _listen(tf_config["cluster"][task_type][index])
    deadline = time.monotonic() + timeout
    try:
        while missing := {name: address for name, address in missing.items() if not _answers(address)}:
            if time.monotonic() > deadline:
                raise Failure(f"{', '.join(missing)} of the cluster did not start within --cluster_start_timeout="
                              f"{timeout} seconds; start it, or check the addresses in the cluster's environment.")
            logging.log_every_n_seconds(logging.INFO, "Waiting for %s to start.", 30, ", ".join(missing))
            time.sleep(_POLL_SECONDS)
        if listener is not None:
            time.sleep(_LINGER_SECONDS)
    finally:
        if listener is not None:
            listener.close()


def _host_and_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _listen(address: str) -> socket.socket | None:
    """A socket listening on this task's port, so that the others see it up; None when the port is taken."""
    try:
        port = _host_and_port(address)[1]
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except (OSError, ValueError) as error:
        logging.warning("Cannot listen on %s while the cluster forms (%s); the other tasks wait for TensorFlow's "
                        "server there instead.", address, error)
        return None


def _answers(address: str) -> bool:
    try:
        with socket.create_connection(_host_and_port(address), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def communication_options(config: Config) -> tf.distribute.experimental.CommunicationOptions:
    """The all-reduce --communication names, and --collective_timeout (0 waits forever)."""
    return tf.distribute.experimental.CommunicationOptions(
        implementation=COMMUNICATION[config.communication], timeout_seconds=config.collective_timeout or None)


def _configure_failure_detection(resolver, heartbeat_timeout: int) -> None:
    """Sets the coordination service up as MultiWorkerMirroredStrategy would, plus a heartbeat timeout,
    so that when a worker dies the others stop with an error instead of waiting forever.

    The strategy only configures the service when nobody has; the timeout has no public API.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cluster_spec = resolver.cluster_spec()
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster_spec.num_tasks(job))
            for job in ("chief", "worker") if job in cluster_spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(cluster_spec),
        coordinated_jobs=jobs, heartbeat_timeout_in_ms=heartbeat_timeout * 1000,
        shutdown_barrier_timeout_in_ms=heartbeat_timeout * 1000)


def _default_device() -> str:
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name


def _checked_devices(requested: tuple[str, ...]) -> list[str]:
    """Canonical names of the requested devices; an unknown one is a usage error."""
    available = {(device.device_type, tf.DeviceSpec.from_string(device.name).device_index): device.name
                 for device in tf.config.list_logical_devices()}
    names = []
    for text in requested:
        try:
            spec = tf.DeviceSpec.from_string(text if text.startswith("/") else "/device:" + text)
        except ValueError:
            spec = None
        key = spec and ((spec.device_type or "").upper(), spec.device_index or 0)
        if key not in available:
            valid = ", ".join(sorted(available.values()))
            raise UsageError(f"--devices: {text} does not exist on this machine; available: {valid}.")
        names.append(available[key])
    return names


def _tpu_strategy(tpu: str | None) -> tf.distribute.TPUStrategy:
    if not tpu:
        raise UsageError("--strategy=tpu needs a TPU: give --tpu=NAME (or 'local' on a TPU VM), or set TPU_NAME.")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as error:  # The TPU client raises URL, gRPC, runtime and op errors alike.
        raise UsageError(
            f"--strategy=tpu: cannot reach TPU '{tpu}' ({one_line(error, 160)}). On a TPU VM use --tpu=local; "
            "elsewhere pick another --strategy.") from error
    return tf.distribute.TPUStrategy(resolver)


def resolve_precision(config: Config, strategy: tf.distribute.Strategy) -> str:
    """The Keras dtype policy for --precision; auto follows the accelerator (see the README's measurements)."""
    if config.precision != "auto":
        return config.precision
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    if tf.config.list_logical_devices("GPU"):
        return "mixed_float16"
    # oneDNN runs bfloat16 natively on CPUs with AVX512_BF16 or AMX, where it trained every model here faster
    # at the same accuracy; elsewhere it emulates bfloat16 around float32 and is several times slower.
    return "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Builds the models inside it under the Keras dtype policy `precision`; the previous policy comes back after."""
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def cpu_has_native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (the avx512_bf16 or amx_bf16 flag)."""
    try:
        with open(cpuinfo) as file:
            flags = next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:  # Not Linux: no way to tell, so stay with float32.
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def task_id(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs:
        return 0
    return int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's shared outputs (only one worker may)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs or isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in resolver.cluster_spec().jobs)


def resolve_jit_compile(requested: bool | None, strategy: tf.distribute.Strategy) -> bool | None:
    """XLA on GPU unless turned off; off on CPU unless asked for; TPUs compile regardless (None)."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return None
    if requested is not None:
        return requested
    return bool(tf.config.list_logical_devices("GPU"))
