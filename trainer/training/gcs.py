"""gs:// run directories: the trainer works in a local directory that this module mirrors to Cloud Storage."""

import dataclasses
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import uuid

from absl import logging

from trainer.training import mirrored_files
from trainer.errors import Failure
from trainer.errors import TrainingError
from trainer.errors import TransientError
from trainer.errors import UsageError
from trainer.errors import one_line
from trainer.training.mirrored_files import CHECKPOINT_STATE

# Files larger than one chunk go up as resumable uploads in chunks of this size, so a failed request re-sends one
# chunk rather than the whole file. 8 MiB is the smallest chunk Cloud Storage recommends for throughput (every
# chunk is a request) and bounds the memory a chunk is buffered in; the client's default chunk, 100 MiB, would make
# most checkpoint shards a single chunk, resent whole. A file of one chunk or less gains nothing from a resumable
# session (it is resent whole either way) and would pay its extra request, so it goes up in one request.
RESUMABLE_CHUNK_BYTES = 8 * 1024 * 1024
# A CRC32C mismatch means the bytes were damaged on the way (the client has already deleted the damaged object);
# sending them again is safe, but a second mismatch points at something a retry will not fix.
UPLOAD_ATTEMPTS_AFTER_CHECKSUM_MISMATCH = 2
# How long a Cloud Storage outage may last before the job gives up (--storage_retry_seconds' default).
RETRY_SECONDS = 600
# Waits between attempts while Cloud Storage is unreachable: doubling from the first, up to the last.
BACKOFF_SECONDS = (1.0, 30.0)


def is_gcs(path: str | None) -> bool:
    return bool(path) and path.startswith("gs://")


def split_uri(uri: str) -> tuple[str, str]:
    """gs://bucket/some/prefix -> ("bucket", "some/prefix")."""
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    if not bucket:
        raise UsageError(f"{uri}: the bucket name is missing; use gs://BUCKET/PATH.")
    return bucket, prefix.strip("/")


def is_transient(error: BaseException) -> bool:
    """Whether a storage error is the world's (unreachable, overloaded, timed out) and worth retrying, rather than
    the request's (no such bucket, no permission), which fails the same way every time."""
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    import requests

    return isinstance(error, (api_exceptions.ServerError, api_exceptions.TooManyRequests, api_exceptions.RetryError,
                              requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              auth_exceptions.TransportError, ConnectionError, TimeoutError))


def retry_transient(action, what: str, retry_seconds: float):
    """Calls action() until it succeeds, retrying transient storage errors with backoff for up to retry_seconds;
    then raises TransientError naming `what`. Other errors pass through at once."""
    began, wait = time.monotonic(), BACKOFF_SECONDS[0]
    while True:
        try:
            return action()
        except Exception as error:  # noqa: BLE001  (classified right below; the rest is re-raised)
            if not is_transient(error):
                raise
            waited = time.monotonic() - began
            if waited + wait > retry_seconds:
                raise TransientError(outage_message(what, waited, error)) from error
            logging.warning("%s: Cloud Storage is unreachable (%s); retrying in %.0f s.", what,
                            service_reason(error, 160), wait)
            time.sleep(wait)
            wait = min(wait * 2, BACKOFF_SECONDS[1])


def outage_message(what: str, seconds: float, error: BaseException) -> str:
    return (f"{what}: Cloud Storage stayed unreachable for {seconds:.0f} s ({service_reason(error, 160)}). "
            "This is transient: rerun the same command later and it resumes from the last checkpoint in the "
            "bucket (--storage_retry_seconds sets how long to wait).")


def client_retry(retry_seconds: float):
    """The client's own retry policy for one request, bounded by the job's retry time."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_deadline(min(120.0, retry_seconds))


def service_reason(error: Exception, limit: int = 200) -> str:
    """What Cloud Storage said, on one line. google-api-core puts the request's method and URL first, which would
    take most of the line and push out the part that names the missing permission."""
    text = getattr(error, "message", None) or str(error)
    return one_line(re.sub(r"^[A-Z]+ \S+: ", "", text), limit).rstrip(".")


@dataclasses.dataclass(frozen=True)
class Root:
    """A local directory and the gs:// prefix it mirrors; nested roots are mirrored on their own."""

    local: str
    remote: str


class Mirror:
    """Uploads a run's local working directories to Cloud Storage, and restores them from it.

    Uploads use the google-cloud-storage client with CRC32C verification and retries; files larger
    than RESUMABLE_CHUNK_BYTES go up as resumable uploads. Only files that changed since the last
    sync are sent, and remote checkpoints the local CheckpointManager has dropped are deleted.
    """

    def __init__(self, roots: list[Root], client=None, retry_seconds: float = RETRY_SECONDS):
        self.roots = roots
        self._client = client
        self.retry_seconds = retry_seconds
        self._synced: dict[str, tuple[int, int]] = {}  # Local path -> (size, mtime_ns) when last synced.

    @property
    def _locals(self) -> list[str]:
        return [root.local for root in self.roots]

    @property
    def client(self):
        if self._client is None:
            from google.auth import exceptions as auth_exceptions
            from google.cloud import storage

            try:
                self._client = storage.Client()
            except auth_exceptions.DefaultCredentialsError as error:
                raise UsageError(f"{self.roots[0].remote}: no Google Cloud credentials ({one_line(error, 120)}). "
                                 "Run `gcloud auth application-default login` or set "
                                 "GOOGLE_APPLICATION_CREDENTIALS.") from error
        return self._client

    def _blob(self, uri: str):
        bucket, name = split_uri(uri)
        return self.client.bucket(bucket).blob(name)

    def preflight(self, write: bool) -> None:
        """Checks, before any training, that every bucket exists and (for the chief) is writable."""
        from google.api_core import exceptions as api_exceptions

        for root in self.roots:
            bucket_name, prefix = split_uri(root.remote)
            try:
                retry_transient(lambda: self._check_bucket(bucket_name, prefix, root, write),
                                f"{root.remote}: checking the bucket", self.retry_seconds)
            except api_exceptions.Forbidden as error:
                raise UsageError(f"{root.remote}: no permission to {'write' if write else 'read'} gs://{bucket_name} "
                                 f"({service_reason(error)}).") from error
            except api_exceptions.GoogleAPIError as error:
                raise UsageError(f"{root.remote}: Cloud Storage refused the request ({service_reason(error)}).") \
                    from error

    def _check_bucket(self, bucket_name: str, prefix: str, root: Root, write: bool) -> None:
        timeout = min(30.0, self.retry_seconds)
        if self.client.lookup_bucket(bucket_name, timeout=timeout, retry=client_retry(self.retry_seconds)) is None:
            raise UsageError(f"{root.remote}: bucket gs://{bucket_name} does not exist; create it "
                             f"(gcloud storage buckets create gs://{bucket_name}) or pick another.")
        if write:
            probe = self.client.bucket(bucket_name).blob(posixpath.join(prefix, f".write-check-{uuid.uuid4()}"))
            probe.upload_from_string(b"", timeout=timeout)
            probe.delete(timeout=timeout)

    def restore(self) -> None:
        """Fetches what a resumed run reads: the kept checkpoints and the top-level run files.

        Cloud Storage is the truth: the local directories are emptied first, so every worker
        resumes from the same checkpoint.
        """
        for root in self.roots:
            shutil.rmtree(root.local, ignore_errors=True)
            os.makedirs(root.local, exist_ok=True)
        for root in self.roots:
            blobs = retry_transient(lambda: self._list(root), f"{root.remote}: listing the run", self.retry_seconds)
            for blob in blobs:
                relative = blob.name[len(split_uri(root.remote)[1]):].lstrip("/")
                if mirrored_files.wanted_for_restore(root.local, relative, self._locals):
                    retry_transient(lambda: self._download(blob, os.path.join(root.local, relative)),
                                    f"{root.remote}: downloading {relative}", self.retry_seconds)

    def _list(self, root: Root):
        bucket, prefix = split_uri(root.remote)
        # Checkpoint state comes first so the latest checkpoint is known when its files are listed.
        blobs = list(self.client.list_blobs(bucket, prefix=prefix + "/" if prefix else None))
        return sorted(blobs, key=lambda blob: not blob.name.endswith("/" + CHECKPOINT_STATE))

    def remote_names(self, root_index: int, subfolder: str = "") -> list[str]:
        """The names directly under a root in the bucket, or under its `subfolder`: its objects, and its subfolders
        with a trailing /."""
        bucket, prefix = split_uri(self.roots[root_index].remote)
        prefix = posixpath.join(prefix, subfolder) if subfolder else prefix
        prefix = prefix + "/" if prefix else ""

        def top_level():
            blobs = self.client.list_blobs(bucket, prefix=prefix or None, delimiter="/",
                                           retry=client_retry(self.retry_seconds))
            return [blob.name[len(prefix):] for blob in blobs] + [name[len(prefix):] for name in blobs.prefixes]

        return retry_transient(top_level, f"{self.roots[root_index].remote}: listing it", self.retry_seconds)

    def download_tree(self, relative_dir: str, local_dir: str) -> None:
        """Fetches everything under `relative_dir` of the first (model) root, e.g. the export."""
        root = self.roots[0]
        bucket, prefix = split_uri(root.remote)
        for blob in self.client.list_blobs(bucket, prefix=posixpath.join(prefix, relative_dir) + "/"):
            self._download(blob, os.path.join(local_dir, blob.name[len(prefix):].lstrip("/")[len(relative_dir) + 1:]))

    def _download(self, blob, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        blob.download_to_filename(path, checksum="crc32c", retry=client_retry(self.retry_seconds))
        stat = os.stat(path)
        self._synced[path] = (stat.st_size, stat.st_mtime_ns)

    def upload(self) -> None:
        """Sends every new or changed file, then deletes remote checkpoints that were dropped locally."""
        sent = 0
        for root in self.roots:
            for path in mirrored_files.files_to_send(root.local, self._locals):
                try:
                    stat = os.stat(path)
                except FileNotFoundError:  # A checkpoint the manager dropped while this pass ran.
                    continue
                if self._synced.get(path) == (stat.st_size, stat.st_mtime_ns):
                    continue
                relative = os.path.relpath(path, root.local).replace(os.sep, "/")
                uri = posixpath.join(root.remote, relative)
                upload_verified(lambda: self._blob(uri), path, uri, client_retry(self.retry_seconds))
                self._synced[path] = (stat.st_size, stat.st_mtime_ns)
                sent += 1
            self._delete_dropped_checkpoints(root)
        if sent:
            logging.info("Mirrored %d file(s) to %s.", sent, ", ".join(root.remote for root in self.roots))

    def _delete_dropped_checkpoints(self, root: Root) -> None:
        kept = mirrored_files.kept_checkpoints(root.local)
        if kept is None:
            return
        _, prefix = split_uri(root.remote)
        for blob in self._list(root):
            relative = blob.name[len(prefix):].lstrip("/")
            if mirrored_files.is_dropped_checkpoint(relative, kept):
                blob.delete()
                self._synced.pop(os.path.join(root.local, relative), None)


class BackgroundUploader:
    """Mirrors the run in a thread of its own, so that training goes on while Cloud Storage is unreachable.

    `request` (after every checkpoint) asks for a pass of Mirror.upload; a pass that fails on a transient error is
    retried with backoff, and every file it did not send is sent by the next one. The main thread learns of
    trouble through `check`: an outage longer than retry_seconds is a TransientError, any other upload error
    is raised as it came. `finish` waits until everything requested is in the bucket.
    """

    def __init__(self, mirror: Mirror, retry_seconds: float):
        self.mirror, self.retry_seconds = mirror, retry_seconds
        self._guard = threading.Lock()
        self._wanted, self._idle, self._stopping = threading.Event(), threading.Event(), threading.Event()
        self._idle.set()
        self._failing_since: float | None = None
        self._last_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gcs-mirror", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self.check()
        with self._guard:
            self._idle.clear()
            self._wanted.set()

    def check(self) -> None:
        """Raises what stops the job: an outage past retry_seconds, or an upload error that is not transient."""
        if self._fatal is not None:
            raise self._fatal
        failing_since, error = self._failing_since, self._last_error
        if failing_since is not None and time.monotonic() - failing_since > self.retry_seconds:
            raise TransientError(outage_message(self.mirror.roots[0].remote, time.monotonic() - failing_since,
                                                error)) from error

    def finish(self) -> None:
        """Blocks until every requested pass has reached the bucket; raises as `check` does."""
        self.request()
        while not self._idle.wait(timeout=0.5):
            self.check()
        self.check()

    def close(self) -> None:
        self._stopping.set()
        self._wanted.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        wait = BACKOFF_SECONDS[0]
        while True:
            self._wanted.wait()
            if self._stopping.is_set():
                return
            self._wanted.clear()
            try:
                self.mirror.upload()
            except Exception as error:  # noqa: BLE001  (the main thread raises it: see check)
                if not is_transient(error):
                    self._fatal = error if isinstance(error, (Failure, TransientError, UsageError)) else Failure(
                        f"mirroring the run to {self.mirror.roots[0].remote} failed ({service_reason(error)}).")
                    self._idle.set()
                    return
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    logging.warning("Cloud Storage is unreachable (%s); training goes on, and the uploads are retried "
                                    "for up to %.0f s.", service_reason(error, 160), self.retry_seconds)
                self._last_error = error
                self._stopping.wait(wait)
                wait = min(wait * 2, BACKOFF_SECONDS[1])
                self._wanted.set()
                continue
            if self._failing_since is not None:
                logging.info("Cloud Storage is reachable again after %.0f s; the run is mirrored.",
                             time.monotonic() - self._failing_since)
            self._failing_since, self._last_error, wait = None, None, BACKOFF_SECONDS[0]
            with self._guard:
                if not self._wanted.is_set():
                    self._idle.set()


def upload_verified(new_blob, path: str, uri: str, retry) -> None:
    """Uploads one file to a blob that new_blob() makes afresh for each attempt, sending it again once if its
    CRC32C does not match on arrival."""
    from google.cloud.storage.exceptions import DataCorruption

    for attempt in range(1, UPLOAD_ATTEMPTS_AFTER_CHECKSUM_MISMATCH + 1):
        try:
            _send_file(new_blob(), path, retry)
            return
        except DataCorruption as error:
            if attempt == UPLOAD_ATTEMPTS_AFTER_CHECKSUM_MISMATCH:
                raise TrainingError(f"{uri}: the upload of {path} failed its CRC32C check {attempt} times, so "
                                    f"data is damaged on its way to Cloud Storage ({one_line(error, 160)}).") \
                    from error
            logging.warning("%s: CRC32C mismatch after the upload; sending it again.", uri)


def _send_file(blob, path: str, retry) -> None:
    # Overwriting with identical content is safe to retry, so retry always.
    if os.path.getsize(path) <= RESUMABLE_CHUNK_BYTES:
        blob.upload_from_filename(path, checksum="crc32c", retry=retry)
        return
    blob.chunk_size = RESUMABLE_CHUNK_BYTES
    with open(path, "rb") as file:
        # Given no size, the client cannot send the file in one request, so it opens a resumable session whatever
        # its own threshold for them (8 MiB in google-cloud-storage 3) is.
        blob.upload_from_file(file, checksum="crc32c", retry=retry)


def local_working_dir(model_dir: str, task_type: str, task_id: int) -> str:
    """A scratch directory per gs:// run and task. Tasks on one machine must not share it: on Vertex AI the chief
    and the first worker are both index 0 (of worker pools 0 and 1), so the index alone does not tell them apart."""
    digest = hashlib.sha256(model_dir.encode()).hexdigest()[:12]
    task = re.sub(r"[^A-Za-z0-9_]", "_", task_type)  # It comes from the environment; keep it one path component.
    return os.path.join(tempfile.gettempdir(), "trainer-runs", f"{digest}-{task}-{task_id}")
