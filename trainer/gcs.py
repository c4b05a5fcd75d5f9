"""gs:// run directories: the trainer works in a local directory that this module mirrors to Cloud Storage."""

import dataclasses
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid

from absl import logging

from trainer.errors import TrainingError
from trainer.errors import UsageError
from trainer.errors import one_line

CHECKPOINT_STATE = "checkpoint"
# Files larger than one chunk go up as resumable uploads in chunks of this size, so a failed request re-sends one
# chunk rather than the whole file. 8 MiB is the smallest chunk Cloud Storage recommends for throughput (every
# chunk is a request) and bounds the memory a chunk is buffered in; the client's default chunk, 100 MiB, would make
# most checkpoint shards a single chunk, resent whole. A file of one chunk or less gains nothing from a resumable
# session (it is resent whole either way) and would pay its extra request, so it goes up in one request.
RESUMABLE_CHUNK_BYTES = 8 * 1024 * 1024
# A CRC32C mismatch means the bytes were damaged on the way (the client has already deleted the damaged object);
# sending them again is safe, but a second mismatch points at something a retry will not fix.
UPLOAD_ATTEMPTS_AFTER_CHECKSUM_MISMATCH = 2
# Scratch files of the trainer that are never mirrored: non-chief checkpoint directories, staging
# exports, temporary JSON/PNG files and write probes.
SKIPPED = re.compile(r"(^|/)(\.worker-\d+-temp|export\.partial|\.tmp-[^/]*|\.write-check-[^/]*)(/|$)")


def is_gcs(path: str | None) -> bool:
    return bool(path) and path.startswith("gs://")


def split_uri(uri: str) -> tuple[str, str]:
    """gs://bucket/some/prefix -> ("bucket", "some/prefix")."""
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    if not bucket:
        raise UsageError(f"{uri} names no bucket; use gs://BUCKET/PATH.")
    return bucket, prefix.strip("/")


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

    def __init__(self, roots: list[Root], client=None):
        self.roots = roots
        self._client = client
        self._synced: dict[str, tuple[int, int]] = {}  # Local path -> (size, mtime_ns) when last synced.

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
                if self.client.lookup_bucket(bucket_name, timeout=30) is None:
                    raise UsageError(f"{root.remote}: bucket gs://{bucket_name} does not exist; create it "
                                     f"(gcloud storage buckets create gs://{bucket_name}) or pick another.")
                if write:
                    probe = self.client.bucket(bucket_name).blob(posixpath.join(prefix, f".write-check-{uuid.uuid4()}"))
                    probe.upload_from_string(b"", timeout=30)
                    probe.delete(timeout=30)
            except api_exceptions.Forbidden as error:
                raise UsageError(f"{root.remote}: no permission to {'write' if write else 'read'} gs://{bucket_name} "
                                 f"({service_reason(error)}).") from error
            except (api_exceptions.GoogleAPIError, OSError) as error:
                raise UsageError(f"{root.remote}: cannot reach Cloud Storage ({service_reason(error)}).") from error

    def restore(self) -> None:
        """Fetches what a resumed run reads: the latest checkpoint and the top-level run files.

        Cloud Storage is the truth: the local directories are emptied first, so every worker
        resumes from the same checkpoint.
        """
        for root in self.roots:
            shutil.rmtree(root.local, ignore_errors=True)
            os.makedirs(root.local, exist_ok=True)
        for root in self.roots:
            for blob in self._list(root):
                relative = blob.name[len(split_uri(root.remote)[1]):].lstrip("/")
                if self._wanted_for_restore(root, relative):
                    self._download(blob, os.path.join(root.local, relative))

    def _wanted_for_restore(self, root: Root, relative: str) -> bool:
        if "/" not in relative and relative.endswith((".json", CHECKPOINT_STATE)):
            return self._nested_root_for(root, relative) is None
        latest = self._latest_checkpoint(root)
        return latest is not None and relative.startswith(latest + ".")

    def _latest_checkpoint(self, root: Root) -> str | None:
        state = os.path.join(root.local, CHECKPOINT_STATE)
        if not os.path.exists(state):
            return None
        match = re.search(r'^model_checkpoint_path: "([^"]+)"', open(state).read(), re.M)
        return match.group(1) if match else None

    def _nested_root_for(self, root: Root, relative: str) -> Root | None:
        """The root inside `root` that owns this file, if any (it is then mirrored by that root)."""
        path = os.path.join(root.local, relative)
        inner = [other for other in self.roots if other.local.startswith(root.local.rstrip("/") + "/")]
        return next((other for other in inner if path.startswith(other.local.rstrip("/") + "/")), None)

    def _list(self, root: Root):
        bucket, prefix = split_uri(root.remote)
        # Checkpoint state comes first so the latest checkpoint is known when its files are listed.
        blobs = list(self.client.list_blobs(bucket, prefix=prefix + "/" if prefix else None))
        return sorted(blobs, key=lambda blob: not blob.name.endswith("/" + CHECKPOINT_STATE))

    def download_tree(self, relative_dir: str, local_dir: str) -> None:
        """Fetches everything under `relative_dir` of the first (model) root, e.g. the export."""
        root = self.roots[0]
        bucket, prefix = split_uri(root.remote)
        for blob in self.client.list_blobs(bucket, prefix=posixpath.join(prefix, relative_dir) + "/"):
            self._download(blob, os.path.join(local_dir, blob.name[len(prefix):].lstrip("/")[len(relative_dir) + 1:]))

    def _download(self, blob, path: str) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        os.makedirs(os.path.dirname(path), exist_ok=True)
        blob.download_to_filename(path, checksum="crc32c", retry=DEFAULT_RETRY)
        stat = os.stat(path)
        self._synced[path] = (stat.st_size, stat.st_mtime_ns)

    def upload(self) -> None:
        """Sends every new or changed file, then deletes remote checkpoints that were dropped locally."""
        sent = 0
        for root in self.roots:
            for path in self._local_files(root):
                stat = os.stat(path)
                if self._synced.get(path) == (stat.st_size, stat.st_mtime_ns):
                    continue
                relative = os.path.relpath(path, root.local).replace(os.sep, "/")
                self._upload_verified(path, posixpath.join(root.remote, relative))
                self._synced[path] = (stat.st_size, stat.st_mtime_ns)
                sent += 1
            self._delete_dropped_checkpoints(root)
        if sent:
            logging.info("Mirrored %d file(s) to %s.", sent, ", ".join(root.remote for root in self.roots))

    def _upload_verified(self, path: str, uri: str) -> None:
        """Uploads one file, sending it again once if its CRC32C does not match on arrival."""
        from google.cloud.storage.exceptions import DataCorruption

        for attempt in range(1, UPLOAD_ATTEMPTS_AFTER_CHECKSUM_MISMATCH + 1):
            try:
                _send_file(self._blob(uri), path)
                return
            except DataCorruption as error:
                if attempt == UPLOAD_ATTEMPTS_AFTER_CHECKSUM_MISMATCH:
                    raise TrainingError(f"{uri}: the upload of {path} failed its CRC32C check {attempt} times, so "
                                        f"data is damaged on its way to Cloud Storage ({one_line(error, 160)}).") \
                        from error
                logging.warning("%s: CRC32C mismatch after the upload; sending it again.", uri)

    def _local_files(self, root: Root):
        for directory, subdirectories, files in os.walk(root.local):
            for name in sorted(files):
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, root.local).replace(os.sep, "/")
                if not SKIPPED.search(relative) and self._nested_root_for(root, relative) is None:
                    yield path

    def _delete_dropped_checkpoints(self, root: Root) -> None:
        state = os.path.join(root.local, CHECKPOINT_STATE)
        if not os.path.exists(state):
            return
        kept = set(re.findall(r'^all_model_checkpoint_paths: "([^"]+)"', open(state).read(), re.M))
        kept.add(self._latest_checkpoint(root))
        _, prefix = split_uri(root.remote)
        for blob in self._list(root):
            relative = blob.name[len(prefix):].lstrip("/")
            match = re.match(r"(ckpt-\d+)\.", relative)
            if match and "/" not in relative and match.group(1) not in kept:
                blob.delete()
                self._synced.pop(os.path.join(root.local, relative), None)


def _send_file(blob, path: str) -> None:
    from google.cloud.storage.retry import DEFAULT_RETRY

    # Overwriting with identical content is safe to retry, so retry always.
    if os.path.getsize(path) <= RESUMABLE_CHUNK_BYTES:
        blob.upload_from_filename(path, checksum="crc32c", retry=DEFAULT_RETRY)
        return
    blob.chunk_size = RESUMABLE_CHUNK_BYTES
    with open(path, "rb") as file:
        # Given no size, the client cannot send the file in one request, so it opens a resumable session whatever
        # its own threshold for them (8 MiB in google-cloud-storage 3) is.
        blob.upload_from_file(file, checksum="crc32c", retry=DEFAULT_RETRY)


def local_working_dir(model_dir: str, task_type: str, task_id: int) -> str:
    """A scratch directory per gs:// run and task. Tasks on one machine must not share it: on Vertex AI the chief
    and the first worker are both index 0 (of worker pools 0 and 1), so the index alone does not tell them apart."""
    digest = hashlib.sha256(model_dir.encode()).hexdigest()[:12]
    task = re.sub(r"[^A-Za-z0-9_]", "_", task_type)  # It comes from the environment; keep it one path component.
    return os.path.join(tempfile.gettempdir(), "trainer-runs", f"{digest}-{task}-{task_id}")
