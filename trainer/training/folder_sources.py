"""Where an image folder's files come from: a local directory or a gs:// prefix, listed and read the same way."""

import dataclasses
import errno
import io
import os
import posixpath
import stat

from trainer.training import gcs
from trainer.errors import UsageError
from trainer.errors import one_line


@dataclasses.dataclass(frozen=True)
class ListedFile:
    """A regular file in the folder: its path relative to the root ('/'-separated), its size and a stamp that
    changes whenever its content does (the modification time in ns locally, the object generation on gs://)."""

    relative: str
    size: int
    stamp: int


@dataclasses.dataclass
class Children:
    """What one directory of the folder holds: sub-directory names, files, and entries that are neither
    (a FIFO, a symlink loop, ...) with the reason each was passed over."""

    directories: list[str] = dataclasses.field(default_factory=list)
    files: list[ListedFile] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _hidden(name: str) -> bool:
    # .DS_Store, ._resource forks, .ipynb_checkpoints: never pictures, not worth a line in the summary.
    return name.startswith(".")


class LocalSource:
    """A folder on this machine's disk. Symlinks are followed; the fixed depth of the layouts keeps a symlink
    that points back up the tree from being followed in a circle."""

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.abspath(os.path.expanduser(root))
        try:
            info = os.stat(self.path)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UsageError(f"--dataset={root} is a symlink loop; point it at a folder of images.") from error
            if error.errno == errno.ENOENT:
                raise UsageError(f"--dataset={root}: no such folder ({self.path}).") from error
            raise UsageError(f"--dataset={root} cannot be read ({error.strerror}).") from error
        if not stat.S_ISDIR(info.st_mode):
            raise UsageError(f"--dataset={root} is not a folder; give the folder that holds one folder per class.")

    def children(self, relative_dir: str) -> Children:
        children = Children()
        directory = os.path.join(self.path, relative_dir)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            raise UsageError(f"--dataset={self.root}: cannot read the folder {relative_dir or '.'} "
                             f"({error.strerror}).") from error
        for entry in entries:
            if _hidden(entry.name):
                continue
            relative = posixpath.join(relative_dir, entry.name)
            try:
                info = os.stat(entry.path)  # Follows symlinks; the type is known before anything is opened.
            except OSError as error:
                children.skipped.append((relative, _stat_failure(error, entry)))
                continue
            if stat.S_ISDIR(info.st_mode):
                children.directories.append(entry.name)
            elif stat.S_ISREG(info.st_mode):
                children.files.append(ListedFile(relative, info.st_size, info.st_mtime_ns))
            else:
                # Opening a FIFO named cat.jpg would wait forever for a writer.
                children.skipped.append((relative, "not a regular file (a FIFO, socket or device); not opened"))
        return children

    def open(self, relative: str):
        """The file's bytes, for Pillow: read whole, they decode faster than from the file, which Pillow reads in
        many small pieces (a tenth of a small JPEG's preparation)."""
        with open(os.path.join(self.path, relative), "rb") as file:
            return io.BytesIO(file.read())


def _stat_failure(error: OSError, entry: os.DirEntry) -> str:
    if error.errno == errno.ELOOP:
        return "a symlink loop"
    if error.errno == errno.ENOENT and entry.is_symlink():
        return "a broken symlink"
    return f"cannot be read ({error.strerror})"


class BucketSource:
    """A gs:// prefix, listed once (a listing gives every object's size and generation) and read object by object
    through the google-cloud-storage client, which also talks to the Cloud Storage emulator."""

    def __init__(self, root: str, client=None):
        self.root = root.rstrip("/")
        self.bucket_name, self.prefix = gcs.split_uri(self.root)
        self._client = client or _client(root)
        self._tree: dict[str, Children] = {}
        blobs = gcs.retry_transient(self._list, f"listing --dataset={root}", gcs.RETRY_SECONDS)
        for name, size, generation in blobs:
            self._add(name, size, generation)
        if not self._tree:
            raise UsageError(f"--dataset={root}: no such folder (no objects under it in the bucket).")

    def _list(self) -> list[tuple[str, int, int]]:
        from google.api_core import exceptions as api_exceptions

        start = f"{self.prefix}/" if self.prefix else ""
        try:
            return [(blob.name[len(start):], blob.size, blob.generation)
                    for blob in self._client.list_blobs(self.bucket_name, prefix=start)]
        except api_exceptions.Forbidden as error:
            raise UsageError(f"--dataset={self.root}: no permission to list it ({gcs.service_reason(error)}); the "
                             "job's account needs storage.objects.list and storage.objects.get on the bucket "
                             "(e.g. roles/storage.objectViewer).") from error
        except api_exceptions.NotFound as error:
            raise UsageError(f"--dataset={self.root}: no such bucket gs://{self.bucket_name}.") from error

    def _add(self, name: str, size: int, generation: int) -> None:
        parts = name.split("/")
        if not name or name.endswith("/") or any(_hidden(part) for part in parts):
            return  # Directory placeholders that consoles create, and hidden files.
        for depth in range(len(parts)):
            directory = "/".join(parts[:depth])
            children = self._tree.setdefault(directory, Children())
            if depth < len(parts) - 1:
                if parts[depth] not in children.directories:
                    children.directories.append(parts[depth])
            else:
                children.files.append(ListedFile(name, size, generation))

    def children(self, relative_dir: str) -> Children:
        found = self._tree.get(relative_dir, Children())
        return Children(sorted(found.directories), sorted(found.files, key=lambda file: file.relative), [])

    def open(self, relative: str):
        """The object's bytes, for Pillow."""
        from google.api_core import exceptions as api_exceptions

        name = posixpath.join(self.prefix, relative)
        try:
            return io.BytesIO(self._client.bucket(self.bucket_name).blob(name).download_as_bytes())
        except api_exceptions.Forbidden as error:
            raise UsageError(f"--dataset={self.root}: no permission to read gs://{self.bucket_name}/{name} "
                             f"({gcs.service_reason(error)}); the job's account needs storage.objects.get.") from error
        except api_exceptions.NotFound as error:
            raise OSError(f"it disappeared from the bucket while being read ({one_line(error, 80)})") from error


def _client(root: str):
    from google.auth import exceptions as auth_exceptions
    from google.cloud import storage

    try:
        return storage.Client()
    except auth_exceptions.DefaultCredentialsError as error:
        raise UsageError(f"--dataset={root}: no Google Cloud credentials ({one_line(error, 120)}). Run `gcloud auth "
                         "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS.") from error


def open_source(root: str):
    """The folder `root` names, checked to exist and to be a folder."""
    return BucketSource(root) if gcs.is_gcs(root) else LocalSource(root)
