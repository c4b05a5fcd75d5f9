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

from trainer.errors import UsageError
from trainer.errors import one_line

CHECKPOINT_STATE = "checkpoint"
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


@dataclasses.dataclass(frozen=True)
class Root:
    """A local directory and the gs:// prefix it mirrors; nested roots are mirrored on their own."""

    local: str
    remote: str


class Mirror:
    """Uploads a run's local working directories to Cloud Storage, and restores them from it.

    Uploads use the google-cloud-storage client with CRC32C verification and retries (files larger
    than 8 MiB go up as resumable uploads). Only files that changed since the last sync are sent,
    and remote checkpoints the local CheckpointManager has dropped are deleted.
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
                                 f"({one_line(error, 120)}).") from error
            except (api_exceptions.GoogleAPIError, OSError) as error:
                raise UsageError(f"{root.remote}: cannot reach Cloud Storage ({one_line(error, 160)}).") from error

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
        from google.cloud.storage.retry import DEFAULT_RETRY

        sent = 0
        for root in self.roots:
            for path in self._local_files(root):
                stat = os.stat(path)
                if self._synced.get(path) == (stat.st_size, stat.st_mtime_ns):
                    continue
                relative = os.path.relpath(path, root.local).replace(os.sep, "/")
                # Overwriting with identical content is safe to retry, so retry always.
                self._blob(posixpath.join(root.remote, relative)).upload_from_filename(
                    path, checksum="crc32c", retry=DEFAULT_RETRY)
                self._synced[path] = (stat.st_size, stat.st_mtime_ns)
                sent += 1
            self._delete_dropped_checkpoints(root)
        if sent:
            logging.info("Mirrored %d file(s) to %s.", sent, ", ".join(root.remote for root in self.roots))

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


def local_working_dir(model_dir: str, task_id: int) -> str:
    """A scratch directory per gs:// run and worker (workers on one machine must not share it)."""
    digest = hashlib.sha256(model_dir.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "trainer-runs", f"{digest}-task{task_id}")
