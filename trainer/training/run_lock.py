"""The run lock: one job at a time trains in a model_dir (an OS file lock locally, a lock object on gs://)."""

import datetime
import errno
import fcntl
import json
import os
import posixpath
import socket
import uuid

from absl import logging

from trainer.training import gcs
from trainer.errors import UsageError

LOCK_NAME = ".run.lock"
# Tells this process from an earlier one that had the same pid (a restarted container often gets the same pid).
_PROCESS_TOKEN = uuid.uuid4().hex
# The job a process belongs to, which a later attempt of it shares: Vertex AI sets CLOUD_ML_JOB_ID in every replica
# of a CustomJob; launch.gke sets KUBERNETES_JOB_UID from the JobSet's (or Job's) uid label on its pods.
VERTEX_JOB_ID = "CLOUD_ML_JOB_ID"
KUBERNETES_JOB_UID = "KUBERNETES_JOB_UID"
# How often to try again when another process takes or frees the lock between our read and our write.
LOCK_ATTEMPTS = 5


def job_identity() -> str | None:
    """The cloud job this process runs in, the same for every attempt of it; None outside one."""
    if os.environ.get(VERTEX_JOB_ID):
        return f"Vertex AI job {os.environ[VERTEX_JOB_ID]}"
    if os.environ.get(KUBERNETES_JOB_UID):
        return f"Kubernetes job {os.environ[KUBERNETES_JOB_UID]}"
    return None


def identity() -> dict:
    """Who holds a lock: enough for a person to find the process, and for a restarted one to know itself."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "process": _PROCESS_TOKEN}
    job = job_identity()
    return {**holder, "job": job} if job else holder


def describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not written its name yet"
    job = f"{holder['job']}, " if holder.get("job") else ""
    return f"{job}host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def acquire(model_dir: str, local_dir: str, mirror, force_unlock: bool):
    """Locks the run for this process: gs:// runs in the bucket (through `mirror`), local runs in `local_dir`.
    Returns the lock, whose release() ends it; raises UsageError naming the holder when another job has it."""
    if mirror is not None:
        lock = BucketLock(posixpath.join(model_dir.rstrip("/"), LOCK_NAME), mirror)
        lock.acquire(force_unlock)
        return lock
    lock = LocalLock(os.path.join(local_dir, LOCK_NAME))
    lock.acquire()
    return lock


class LocalLock:
    """An flock(2) on a file in model_dir: the kernel frees it when its process dies, however it dies."""

    def __init__(self, path: str):
        self.path = path
        self._descriptor: int | None = None

    def acquire(self) -> None:
        for _ in range(LOCK_ATTEMPTS):
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(descriptor)
                if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise UsageError(f"{os.path.dirname(self.path)} is in use by another run ({describe(self._holder())}); "
                                 "wait for it to end, or give another --model_dir.") from None
            # The previous holder removes the file when it releases; a lock on a removed file locks nothing.
            if _same_file(descriptor, self.path):
                os.ftruncate(descriptor, 0)
                os.write(descriptor, json.dumps(identity()).encode())
                self._descriptor = descriptor
                return
            os.close(descriptor)
        raise UsageError(f"{self.path}: the run lock kept changing hands; is another run starting there?")

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as file:
                return json.loads(file.read() or "null")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._descriptor is None:
            return
        try:
            os.unlink(self.path)  # Under the lock, so nobody holds the file that goes.
        except FileNotFoundError:
            pass
        os.close(self._descriptor)
        self._descriptor = None


def _same_file(descriptor: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


class BucketLock:
    """A lock object in the bucket, created only if absent (a generation precondition), so of two launches
    exactly one creates it. Nothing frees it when its process dies, so a lock is taken over when its holder
    is known to be gone (see `_gone`) or with --force_unlock."""

    def __init__(self, uri: str, mirror):
        self.uri, self.mirror = uri, mirror
        self._generation: int | None = None

    def _blob(self):
        bucket, name = gcs.split_uri(self.uri)
        return self.mirror.client.bucket(bucket).blob(name)

    def acquire(self, force_unlock: bool) -> None:
        from google.api_core import exceptions as api_exceptions

        payload = json.dumps(identity())
        for _ in range(LOCK_ATTEMPTS):
            expected = 0  # "Create only if absent."
            holder, generation = self._read()
            if generation is not None:
                reason = "--force_unlock" if force_unlock else _gone(holder)
                if reason is None:
                    raise UsageError(
                        f"{posixpath.dirname(self.uri)} is in use by another run ({describe(holder)}), which holds "
                        f"{self.uri}. Wait for it to end, or give another --model_dir; if that run is dead, rerun "
                        "with --force_unlock.")
                logging.warning("Taking over the run lock %s from %s (%s).", self.uri, describe(holder), reason)
                expected = generation
            blob = self._blob()
            try:
                gcs.retry_transient(lambda: blob.upload_from_string(payload, if_generation_match=expected),
                                    f"{self.uri}: taking the run lock", self.mirror.retry_seconds)
            except api_exceptions.PreconditionFailed:
                continue  # Someone else created or replaced it meanwhile: look again.
            self._generation = blob.generation
            return
        raise UsageError(f"{self.uri}: the run lock kept changing hands; is another run starting there?")

    def _read(self) -> tuple[dict | None, int | None]:
        from google.api_core import exceptions as api_exceptions

        def read():
            blob = self._blob().bucket.get_blob(self._blob().name)
            if blob is None:
                return None, None
            try:
                text = blob.download_as_bytes(if_generation_match=blob.generation)
            except api_exceptions.NotFound:
                return None, None
            try:
                return json.loads(text), blob.generation
            except ValueError:
                return None, blob.generation

        return gcs.retry_transient(read, f"{self.uri}: reading the run lock", self.mirror.retry_seconds)

    def release(self) -> None:
        if self._generation is None:
            return
        try:
            _, generation = self._read()
            if generation == self._generation:
                gcs.retry_transient(lambda: self._blob().delete(if_generation_match=generation),
                                    f"{self.uri}: releasing the run lock", self.mirror.retry_seconds)
            else:
                logging.warning("%s was taken over by another run (--force_unlock?) before this one ended.", self.uri)
        except Exception as error:  # noqa: BLE001  (releasing must not hide why the run ended)
            logging.warning("Could not release the run lock %s (%s); the next run there may need --force_unlock.",
                            self.uri, gcs.service_reason(error, 160))
        self._generation = None


def _gone(holder: dict | None) -> str | None:
    """Why the holder of a lock can be taken to be dead, or None.

    In a cloud job the job's identity decides: a later attempt of the same job (a restarted Vertex AI replica, a
    JobSet's next attempt) takes over its own lock, since the cloud ends an attempt before it starts the next; no
    other job does, whatever its host is called (host names such as workerpool0-0 repeat across jobs). Outside one,
    the holder is gone when it ran on this host and its process is not a trainer any more.
    """
    if not holder:
        return None
    ours, theirs = job_identity(), holder.get("job")
    if ours or theirs:
        if ours == theirs and holder.get("process") != _PROCESS_TOKEN:
            return f"an earlier attempt of the same job ({ours})"
        return None
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if pid == os.getpid():
        return "an earlier process on this host with this pid" if holder.get("process") != _PROCESS_TOKEN else None
    if not isinstance(pid, int) or not _is_trainer_process(pid):
        return f"its process {pid} on this host is gone"
    return None


def _is_trainer_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return b"trainer" in file.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir("/proc")  # No /proc to ask: trust that a live pid is the holder.
