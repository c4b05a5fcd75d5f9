"""A multi-worker job's folder dataset: the chief prepares it and tells the others through the cluster's coordination
service; they then read its copy (a shared --data_dir) or, on a disk of their own, prepare the same one themselves."""

import contextlib
import dataclasses

from absl import logging
import tensorflow as tf

from trainer.training import distribution
from trainer.errors import Failure
from trainer.errors import UsageError
from trainer.errors import one_line

# How long a worker waits for the chief's word: preparing a large folder from a bucket can take an hour or more. A chief
# that dies meanwhile ends the wait sooner, through the coordination service's heartbeats.
WAIT_SECONDS = 4 * 3600
PREPARED, REFUSED, FAILED = "prepared:", "refused:", "failed:"


@dataclasses.dataclass(frozen=True)
class Worker:
    """This process's place in a multi-worker job."""

    index: int
    is_chief: bool


def this_worker() -> Worker | None:
    """This process in a multi-worker job whose coordination service runs (set up with the strategy, before the data
    is loaded), else None: a single process, or evaluation and serving."""
    from tensorflow.python.eager import context

    tf_config = distribution.cluster_environment()
    if not tf_config or not context.context().coordination_service:
        return None
    task, cluster = tf_config["task"], tf_config["cluster"]
    is_chief = task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0 and "chief" not in cluster)
    return Worker(int(task["index"]), is_chief)


def _key(root: str, image_size: int) -> str:
    return f"trainer/image_folder/{image_size}px/{root}"


def _set(key: str, value: str) -> None:
    from tensorflow.python.eager import context

    context.context().set_config_key_value(key, value)


@contextlib.contextmanager
def telling_the_others(worker: Worker | None, root: str, image_size: int):
    """Around the chief's preparation: yields a function to call with the prepared copy's config name; a refusal or a
    failure reaches the other workers too, so they stop with the same line instead of waiting."""
    key = _key(root, image_size)
    if worker is None:
        yield lambda name: None
        return
    try:
        yield lambda name: _set(key, PREPARED + name)
    except UsageError as error:
        _set(key, REFUSED + str(error))
        raise
    except Exception as error:
        _set(key, FAILED + one_line(error))
        raise


def wait_for_chief(worker: Worker, root: str, image_size: int) -> str:
    """The config name of the copy the chief prepared; raises the chief's refusal or failure."""
    from tensorflow.python.eager import context

    logging.info("Worker %d: waiting for the chief to prepare --dataset=%s (each image is decoded once, by the chief).",
                 worker.index, root)
    try:
        value = context.context().get_config_key_value(_key(root, image_size), timeout_in_ms=WAIT_SECONDS * 1000)
    except tf.errors.DeadlineExceededError as error:
        raise Failure(f"worker {worker.index} waited {WAIT_SECONDS // 3600} h for the chief to prepare "
                      f"--dataset={root} and gave up; see the chief's log for why it took so long.") from error
    if value.startswith(REFUSED):
        raise UsageError(value[len(REFUSED):])
    if value.startswith(FAILED):
        raise Failure(f"the chief failed to prepare --dataset={root}: {value[len(FAILED):]}")
    return value[len(PREPARED):]
