"""The run directory: its layout (local or gs://), safe writes, and checks before a run writes anything."""

import contextlib
import dataclasses
import errno
import glob
import json
import os
import posixpath
import re
import shutil
import tempfile

from absl import logging

from trainer import config as config_lib
from trainer.training import distribution
from trainer.training import gcs
from trainer.errors import Failure
from trainer.errors import UsageError
from trainer.errors import one_line

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where each output of a run goes."""

    model_dir: str
    checkpoint_dir: str
    log_dir: str
    export_dir: str

    @classmethod
    def under(cls, model_dir: str) -> "RunPaths":
        return cls(model_dir=model_dir, checkpoint_dir=os.path.join(model_dir, "checkpoints"),
                   log_dir=os.path.join(model_dir, "logs"), export_dir=os.path.join(model_dir, "export"))

    @property
    def metrics_file(self) -> str:
        return os.path.join(self.model_dir, "metrics.json")

    @property
    def history_plot(self) -> str:
        return os.path.join(self.model_dir, "history.png")

    @property
    def config_file(self) -> str:
        return os.path.join(self.model_dir, CONFIG_FILE)


def run_locations(model_dir: str) -> dict[str, str]:
    """Where the run's outputs live: model_dir's subdirectories, or, for the directory Vertex AI
    gave in $AIP_MODEL_DIR, the checkpoint and TensorBoard directories it gave beside it."""
    join = posixpath.join if gcs.is_gcs(model_dir) else os.path.join
    locations = {"model": model_dir, "checkpoints": join(model_dir, "checkpoints"), "logs": join(model_dir, "logs")}
    vertex_model_dir = os.environ.get("AIP_MODEL_DIR", "")
    sources = {"model": "--model_dir"}
    if vertex_model_dir and vertex_model_dir.rstrip("/") == model_dir.rstrip("/"):
        sources = {"model": "$AIP_MODEL_DIR", "checkpoints": "$AIP_CHECKPOINT_DIR", "logs": "$AIP_TENSORBOARD_LOG_DIR"}
        locations["checkpoints"] = os.environ.get("AIP_CHECKPOINT_DIR") or locations["checkpoints"]
        locations["logs"] = os.environ.get("AIP_TENSORBOARD_LOG_DIR") or locations["logs"]
    for name, location in locations.items():
        # Checked before the trailing slashes go: "gs://" would become "gs:", a local path.
        if gcs.is_gcs(location) and not location[len("gs://"):].partition("/")[0]:
            raise UsageError(f"{sources.get(name, '--model_dir')}={location}: the bucket name is missing; "
                             "use gs://BUCKET/PATH.")
    return {name: location.rstrip("/") for name, location in locations.items()}


def open_run(model_dir: str, task_id: int, task_type: str | None = None,
             retry_seconds: float = gcs.RETRY_SECONDS) -> tuple[RunPaths, gcs.Mirror | None]:
    """The local paths the trainer writes to and, for gs:// locations, the mirror that uploads them.

    task_type is this process's role in its cluster (chief, worker); by default it is read from the cluster
    environment, as the strategy read it. retry_seconds is how long the mirror rides out a Cloud Storage outage.
    """
    locations = run_locations(model_dir)
    if not any(gcs.is_gcs(location) for location in locations.values()):
        return RunPaths(model_dir=locations["model"], checkpoint_dir=locations["checkpoints"],
                        log_dir=locations["logs"], export_dir=os.path.join(locations["model"], "export")), None
    if not all(gcs.is_gcs(location) for location in locations.values()):
        raise UsageError(f"The run's locations mix gs:// and local paths ({locations}); use one kind.")
    local = gcs.local_working_dir(model_dir, task_type or cluster_task_type(), task_id)
    logging.info("Working in %s; it is mirrored to %s.", local, model_dir)
    paths = RunPaths.under(local)
    mirror = gcs.Mirror([gcs.Root(paths.model_dir, locations["model"]),
                         gcs.Root(paths.checkpoint_dir, locations["checkpoints"]),
                         gcs.Root(paths.log_dir, locations["logs"])], retry_seconds=retry_seconds)
    return paths, mirror


def cluster_task_type() -> str:
    """This process's task type in its cluster; a process outside any cluster is its own chief."""
    cluster = distribution.cluster_environment()
    return cluster["task"]["type"] if cluster else "chief"


# Downloaded gs:// runs of this process, by model_dir, so files a tool adds can be sent back.
_COPIES: dict[str, gcs.Mirror] = {}


def local_copy(model_dir: str) -> str:
    """A local directory holding a finished run's files, downloading them when model_dir is gs://."""
    if not gcs.is_gcs(model_dir):
        return model_dir
    # A reader of its own: restore() empties the working directory, which must not be a trainer's on this machine.
    paths, mirror = open_run(model_dir, task_id=0, task_type="reader")
    mirror.preflight(write=False)
    mirror.restore()
    mirror.download_tree("export", paths.export_dir)
    _COPIES[model_dir] = mirror
    return paths.model_dir


def upload_copy(model_dir: str) -> None:
    """Sends the files added to a local copy made by `local_copy` back to its gs:// run."""
    _COPIES[model_dir].upload()


# What a run of ours may leave in model_dir before it writes config.json: its lock and scratch files, and the empty
# directories it makes first.
_OWN_LEFTOVERS = re.compile(r"\.run\.lock|\.tmp-.*|\.write-check-.*")
_OWN_DIRECTORIES = ("checkpoints", "logs")


def check_model_dir_is_a_run(model_dir: str, paths: RunPaths, mirror: gcs.Mirror | None) -> None:
    """Refuses, before anything is written, a --model_dir that holds files but no run of ours (no config.json and
    no checkpoints): training would overwrite or delete them (the export, metrics.json, history.png). A run of ours
    resumes, and an empty or missing directory starts one."""
    if mirror is None:
        names = _local_names(paths.model_dir)
        ours = os.path.exists(paths.config_file) or has_checkpoint(paths)
    else:
        names = [name for name in mirror.remote_names(0) if not _ours_and_empty(mirror, name)]
        checkpoint_names = mirror.remote_names(1)
        ours = CONFIG_FILE in names or any(
            name == gcs.CHECKPOINT_STATE or re.fullmatch(r"ckpt-\d+\.index", name) for name in checkpoint_names)
    if ours:
        return
    foreign = sorted(name for name in names if not _OWN_LEFTOVERS.fullmatch(name))
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise UsageError(f"--model_dir={model_dir} holds files but no run of this trainer (no {CONFIG_FILE}, no "
                         f"checkpoints): {shown}. Training would overwrite them; give a new or empty directory, or "
                         "the directory of a run to resume it.")


def _ours_and_empty(mirror: gcs.Mirror, name: str) -> bool:
    """Whether a subfolder in the bucket is one of ours holding nothing but our scratch files, as an empty one is
    locally: a chief starting the same job puts its write checks there while another worker checks the folder."""
    return (name.endswith("/") and name[:-1] in _OWN_DIRECTORIES
            and all(_OWN_LEFTOVERS.fullmatch(inner) for inner in mirror.remote_names(0, name[:-1])))


def _local_names(directory: str) -> list[str]:
    """The entries of `directory` (subdirectories with a trailing /), leaving out the empty ones of ours."""
    try:
        entries = os.listdir(directory)
    except OSError:  # Missing, or unreadable: prepare_model_dir says so.
        return []
    names = []
    for name in entries:
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            if name in _OWN_DIRECTORIES and not os.listdir(path):
                continue
            name += "/"
        names.append(name)
    return names


def prepare_model_dir(paths: RunPaths) -> list[str]:
    """Creates the run directories, or says in one line why they cannot be written.

    Returns the directories it created, so that a run failing before it writes anything can leave
    model_dir as it found it (see `remove_if_empty`).
    """
    created = []
    try:
        for directory in (paths.model_dir, paths.checkpoint_dir, paths.log_dir):
            _make_directories(directory, created)
        with tempfile.NamedTemporaryFile(dir=paths.model_dir, prefix=".write-check-"):
            pass
    except OSError as error:
        remove_if_empty(created)
        raise UsageError(f"--model_dir={paths.model_dir} is not writable ({error.strerror}); "
                         "give a directory you can write to.") from error
    return created


def _make_directories(directory: str, created: list[str]) -> None:
    """Like os.makedirs, but adds each directory it creates to `created` as soon as it exists."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        directory = parent if parent != directory else ""
    for path in reversed(missing):
        os.makedirs(path, exist_ok=True)
        created.append(path)


def remove_if_empty(directories: list[str]) -> None:
    """Removes those of `directories` that are still empty, deepest first; the others hold something and stay."""
    for directory in sorted(directories, key=len, reverse=True):
        try:
            os.rmdir(directory)
        except OSError:
            pass


def check_resume(paths: RunPaths, config: config_lib.Config) -> bool:
    """Whether the run resumes a checkpoint; refuses to resume one under different flags.

    config.json is written only once the run has started, so a run that failed before its
    first checkpoint never blocks the corrected command.
    """
    if not has_checkpoint(paths):
        return False
    try:
        previous = read_json(paths.config_file)
    except UsageError as error:
        raise UsageError(f"{error} It records the flags the run started with, to check a rerun against them: put "
                         "it back, or delete it to resume under the flags given now.") from error
    if previous is not None:
        check_resumable(previous, config, paths.model_dir)
    return True


def has_checkpoint(paths: RunPaths) -> bool:
    """Whether the run has checkpoints, by their files: a lost or damaged state file does not make a run new."""
    return (os.path.exists(os.path.join(paths.checkpoint_dir, "checkpoint"))
            or bool(glob.glob(os.path.join(glob.escape(paths.checkpoint_dir), "ckpt-*.index"))))


def check_resumable(previous: dict, config: config_lib.Config, model_dir: str) -> None:
    current = json.loads(json.dumps(config.to_dict()))  # Tuples become lists, as in the file.
    # A flag missing from the file did not exist when the run started, so there is nothing to compare it with.
    changed = [f"--{name}={previous.get(name)!r} before, {value!r} now" for name, value in current.items()
               if name not in config_lib.RESUMABLE_OPTIONS and name in previous and previous[name] != value]
    if changed:
        raise UsageError(f"--model_dir={model_dir} holds a run started with other flags ({'; '.join(changed)}); "
                         "rerun with the same flags to resume it, or give a new --model_dir.")


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when there is no such file; a damaged file is a UsageError naming it."""
    try:
        with open(path, "rb") as file:
            value = json.loads(file.read())
    except FileNotFoundError:
        return None
    except ValueError as error:  # Cut short, emptied, or not JSON (UnicodeDecodeError is a ValueError too).
        raise UsageError(f"{path} is damaged: it does not hold the JSON object it should ({one_line(error, 120)}).") \
            from error
    if not isinstance(value, dict):
        raise UsageError(f"{path} is damaged: it holds {type(value).__name__}, not the JSON object it should.")
    return value


# What a full disk looks like: TensorFlow's file writers raise ResourceExhaustedError, Python an OSError.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in DISK_FULL_ERRNOS
    import tensorflow as tf

    return isinstance(error, tf.errors.ResourceExhaustedError) and any(
        text in str(error) for text in ("No space left", "space", "quota", "File too large"))


@contextlib.contextmanager
def disk_space_guard(what: str, directory: str, leftovers: str | None = None):
    """Turns a full disk while writing `what` into one line (exit status 1), removing the half-written files that
    match the glob `leftovers` first; the files written before stay as they were."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        for path in glob.glob(leftovers) if leftovers else []:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        free = shutil.disk_usage(directory).free if os.path.isdir(directory) else 0
        raise Failure(f"the disk of {directory} is full ({free / 2**20:.0f} MiB free) while writing {what}; "
                      "free some space and rerun the same command: it resumes from the last checkpoint.") from error


def write_json(path: str, payload) -> None:
    """Writes JSON atomically, so a crash never leaves half a file behind."""
    directory = os.path.dirname(path) or "."
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".tmp-", suffix=".json", delete=False) as file:
        json.dump(payload, file, indent=2, sort_keys=True)
        file.write("\n")
    publish(file.name, path)


def publish(temporary_path: str, path: str) -> None:
    """Moves a finished temporary file into place with the usual permissions (temp files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary_path, 0o666 & ~umask)
    os.replace(temporary_path, path)


@contextlib.contextmanager
def replacing(path: str, mode: str = "w", suffix: str = ""):
    """A temporary file beside `path` to write, moved onto `path` when the block ends normally.

    When the block or the move fails (a full disk, a read-only folder, `path` being a directory, Ctrl-C), the
    temporary file is removed and `path` stays as it was: never half a file, never an empty one.
    """
    directory = os.path.dirname(path) or "."
    file = tempfile.NamedTemporaryFile(mode, dir=directory, prefix=".tmp-", suffix=suffix, delete=False)
    try:
        with file:
            yield file
        publish(file.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(file.name)
        raise
