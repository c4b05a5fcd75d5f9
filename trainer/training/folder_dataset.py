"""A folder of images prepared once into TFDS shards in --data_dir (decoded and serialized in parallel, resized to
the stored size), then read back like any TFDS dataset; with the summary of what was prepared and what was
skipped."""

import collections
import concurrent.futures
import itertools
import multiprocessing
import os
import random

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder

from trainer.training import image_folder
from trainer.training import gcs
from trainer import cli
from trainer import display_text
from trainer.training import folder_records
from trainer.training import folder_workers
from trainer import image_files
from trainer.training import progress
from trainer.errors import UsageError
from trainer.errors import one_line

# Side length of the stored images when the run does not set --image_size (cnn and airbench take the dataset's).
DEFAULT_IMAGE_SIZE = 64
SKIPPED_FILES = "skipped_files.txt"
# How many skipped files the summary names; the rest are in the run directory's SKIPPED_FILES.
NAMED_IN_SUMMARY = 5
# Images a worker process decodes per task: one at a time, the pool's own bookkeeping cost as much as decoding them.
CHUNK = 64
# Bytes of examples per shard file (TFDS's own writer made 2 shards of a 20,000-image folder at 64x64).
SHARD_BYTES = 128 * 1024 * 1024


def stored_image_size(image_size: int | None) -> int:
    """The side length a folder's images are stored at: the run's --image_size, so the network sees them without a
    second resize, else DEFAULT_IMAGE_SIZE."""
    return image_size or DEFAULT_IMAGE_SIZE


class ImageFolderBuilder(dataset_builder.FileReaderBuilder, skip_registration=True):
    """One folder at one stored size; its config name carries the folder's fingerprint, so a changed folder is
    prepared into a new directory and an unchanged one is found prepared.

    It reads like any TFDS dataset, but writes its shards itself: TFDS's GeneratorBasedBuilder encodes and
    serializes every example in this one process (2.4 s of its CPU for 20,000 images, half the workers' decoding);
    here the workers encode the examples as TFDS would have and frame them as TFRecords, and this process only
    copies them into the shards and writes an index beside each (see folder_records).
    """

    name = "image_folder"
    # 2.0.0: raw uint8 pixels instead of PNG (a copy prepared as 1.0.0 is prepared again, in its own directory).
    # 3.0.0: the examples in the order they were generated, not shuffled by TFDS (see _info).
    VERSION = tfds.core.Version("3.0.0")

    def __init__(self, folder: image_folder.Folder, image_size: int, data_dir: str | None):
        self.folder, self.image_size = folder, image_size
        self.unreadable: list[tuple[str, str]] = []
        self._held_out: set[str] = set()  # Files the quota-chosen validation split took, readable or not.
        self.counts = {split: [0] * len(folder.class_names) for split in folder.splits}
        self._progress = progress.ImageProgress(folder.num_images, "prepared")
        config = tfds.core.BuilderConfig(name=config_name(folder, image_size), description=folder.root)
        super().__init__(data_dir=data_dir, config=config)

    def _info(self) -> tfds.core.DatasetInfo:
        side = self.image_size
        return tfds.core.DatasetInfo(
            builder=self, description=f"The images of {self.folder.root} at {side}x{side}.",
            features=tfds.features.FeaturesDict({
                # Raw pixels, not PNG: encoding a PNG cost as much as decoding the JPEG, and decoding it again
                # made a run's first epoch several times slower. A run holds every decoded image in memory anyway,
                # so the shards are no larger than what it needs in RAM.
                "image": tfds.features.Tensor(shape=(side, side, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "label": tfds.features.ClassLabel(names=list(self.folder.class_names)),
                "file_name": tfds.features.Text()}),
            supervised_keys=("image", "label"), metadata=tfds.core.MetadataDict(),
            # Training shuffles the whole split every epoch anyway. Kept in the order they were generated, the
            # examples read back as one run of records over the shards, without TFDS's interleaving of them (see
            # data._records_in_order), which cost a third of reading the split.
            disable_shuffling=True)

    @property
    def source_name(self) -> str:
        """The folder as the user gave it: the dataset's name in metrics.json and reports."""
        return self.folder.root

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        del dl_manager, download_config  # Nothing to download: the folder is read where it is.
        # In the order of folder.splits: a held-out split chosen by quota comes first, and training takes the rest.
        split_infos = []
        for split in self.folder.splits:
            template = self._get_filename_template(split_name=split)
            writer = folder_records.ShardWriter(template, SHARD_BYTES)
            try:
                with folder_records.spool_directory(template) as spool:
                    for chunk in self._encoded_chunks(split, spool):
                        writer.write(chunk)
            except BaseException:
                writer.close()  # TFDS removes its incomplete directory, with the shard.
                raise
            writer.finish()
            self._check_every_class_kept(split)
            split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=writer.shard_lengths,
                                                   num_bytes=writer.num_bytes, filename_template=template))
        self.info.set_splits(tfds.core.SplitDict(split_infos))
        # Written with the dataset's info, and read back with it on later runs.
        self.info.metadata.update({"folder": self.folder.root, "image_size": self.image_size,
                                   "counts": self.counts, "unreadable": sorted(self.unreadable)})

    def _encoded_chunks(self, split: str, spool: str):
        """The split's readable images as encoded examples, in the files' order; the others in self.unreadable."""
        if split != image_folder.TRAIN_SPLIT and self.folder.held_out_quota:
            prepared = self._held_out_prepared(split, spool)
        else:
            files = self.folder.splits[split]
            if self.folder.held_out_quota:
                files = [labelled for labelled in files if labelled.file.relative not in self._held_out]
            prepared = _prepared_in_parallel(self.folder, files, self.image_size, spool)
        kept = self.counts[split]
        for files, chunk in prepared:
            self._progress.update(len(files))
            for labelled, reason in zip(files, chunk.reasons):
                if reason is None:
                    kept[labelled.label] += 1
                else:
                    self.unreadable.append((labelled.file.relative, reason))
            yield chunk

    def _held_out_prepared(self, split: str, spool: str):
        """The held-out split chosen by quota: each class's first files in their ranked order, as many as its share,
        then the next ones only in place of files that could not be read. Every file it took, readable or not, is
        in self._held_out; training takes the rest."""
        quota, kept = self.folder.held_out_quota, self.counts[split]
        untried = [collections.deque() for _ in quota]
        for labelled in self.folder.splits[split]:
            untried[labelled.label].append(labelled)
        while wanted := [untried[label].popleft() for label, share in enumerate(quota)
                         for _ in range(min(share - kept[label], len(untried[label])))]:
            # _encoded_chunks counts the images of each chunk it takes, so `kept` is up to date for the next round.
            for files, chunk in _prepared_in_parallel(self.folder, wanted, self.image_size, spool):
                self._held_out.update(labelled.file.relative for labelled in files)
                yield files, chunk

    def _check_every_class_kept(self, split: str) -> None:
        for name, count in zip(self.folder.class_names, self.counts[split]):
            if count == 0:
                raise UsageError(f"--dataset={self.folder.root}: class '{name}' has no readable image in the {split} "
                                 f"split (see the skipped files above); every class needs at least one.")


def config_name(folder: image_folder.Folder, image_size: int) -> str:
    """A TFDS config name: the folder's base name, for people, and its fingerprint, for telling versions apart."""
    base = os.path.basename(folder.root.rstrip("/")) or "root"
    readable = "".join(character if character.isalnum() else "_" for character in base.lower())[:40]
    return f"{readable}_{image_size}px_{folder.fingerprint(image_size)[:16]}"


def _prepared_in_parallel(folder: image_folder.Folder, files, image_size: int, spool: str):
    """(files, their folder_records.EncodedChunk) in the files' order, prepared by a pool of workers in chunks. A
    bounded window of chunks keeps memory flat. Worker processes leave their records in files in `spool`: passed
    back through the pool's pipes, they cost a sixth of the preparation (benchmarks/run.py --only=folder)."""
    pool, workers, chunk_size = _decoding_pool(folder)
    spool = spool if isinstance(pool, concurrent.futures.ProcessPoolExecutor) else None
    window = collections.deque()
    with pool:
        for chunk in _chunks(files, chunk_size):
            labelled_files = [(labelled.file.relative, labelled.label) for labelled in chunk]
            window.append((chunk, pool.submit(_encoded_chunk, folder.source, labelled_files, image_size, spool)))
            if len(window) >= 2 * workers:
                chunk, future = window.popleft()
                yield chunk, future.result()
        while window:
            chunk, future = window.popleft()
            yield chunk, future.result()


def _decoding_pool(folder: image_folder.Folder) -> tuple[concurrent.futures.Executor, int, int]:
    """The pool, its number of workers and the images each task decodes.

    A local folder is decoded by forked processes, which start in milliseconds with what this process imported
    (spawned ones would import the job's main module, TensorFlow and all): Pillow's Python code holds the GIL about
    as long as its decoder runs, so threads kept one core of two busy (benchmarks/run.py --only=folder measures
    preparation). Tasks of CHUNK images keep the pool's own cost small. The workers run only Pillow, numpy and
    google_crc32c, none of TensorFlow's runtime or the locks of this process's other threads. Cloud
    Storage reads wait on the network: there a pool of threads overlaps them, an image at a time.
    """
    if gcs.is_gcs(folder.root) or "fork" not in multiprocessing.get_all_start_methods():
        workers = 16 if gcs.is_gcs(folder.root) else max(2, len(os.sched_getaffinity(0)))
        return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="prepare"), workers, 1
    workers = len(os.sched_getaffinity(0))
    return (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")), workers,
            CHUNK)


def _chunks(items, size: int):
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _encoded_chunk(source, labelled_files: list[tuple[str, int]], image_size: int,
                   spool: str | None) -> folder_records.EncodedChunk:
    """The files' examples as TFDS would write them for ImageFolderBuilder's features (tests/test_image_folder.py
    compares them), framed as TFRecords (in a file in `spool`, if given), and why each file that was skipped was: a
    worker's task."""
    chunk = folder_records.encode_chunk((_pixel_bytes(source, relative, image_size), label, relative)
                                        for relative, label in labelled_files)
    return chunk.spooled(spool) if spool else chunk


def _pixel_bytes(source, relative: str, image_size: int) -> bytes | str:
    image = _loaded_image(source, relative, image_size)
    return image if isinstance(image, str) else image.tobytes()


def _loaded_image(source, relative: str, image_size: int) -> np.ndarray | str:
    """The image as uint8 pixels at image_size x image_size, prepared as predict and the server prepare an image (EXIF
    orientation, 8-bit RGB, alpha on white, area-averaged shrinking); or why it was skipped."""
    try:
        return image_files.load_image(source.open(relative), (image_size, image_size, 3))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return _reason(error)


def _reason(error: Exception) -> str:
    if isinstance(error, image_files.ImageTooLarge):
        return str(error).replace(" for images to classify", "")  # predict's words; the limit is the same.
    if isinstance(error, image_files.UnsupportedFormat):
        return str(error)
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(error, Image.DecompressionBombError):
        return f"more pixels than the {image_files.MAX_PIXELS // 10**6}-megapixel limit"
    return f"cannot be decoded ({one_line(error, 160)})"


def load(root: str, data_dir: str | None, *, image_size: int | None, validation_fraction: float) -> ImageFolderBuilder:
    """The folder's prepared builder: prepared now when the folder (or the stored size) is new, else reused. In a
    multi-worker job only the chief prepares it; the others wait for its word (see folder_workers)."""
    size = stored_image_size(image_size)
    worker = folder_workers.this_worker()
    if worker is None or worker.is_chief:
        with folder_workers.telling_the_others(worker, root, size) as tell_the_others:
            builder = _prepared(root, data_dir, size, validation_fraction)
            tell_the_others(builder.builder_config.name)
    else:
        chief_copy = folder_workers.wait_for_chief(worker, root, size)
        builder = _prepared(root, data_dir, size, validation_fraction, chief_copy=chief_copy)
    skipped = skipped_files(builder)
    if skipped:
        named = "; ".join(f"{display_text.printable(path)} ({reason})" for path, reason in skipped[:NAMED_IN_SUMMARY])
        logging.warning("%s: %d file%s skipped (all of them are listed in the run directory's %s): %s%s.", root,
                        len(skipped), "s" * (len(skipped) != 1), SKIPPED_FILES, named,
                        "; ..." if len(skipped) > NAMED_IN_SUMMARY else "")
    return builder


def _prepared(root: str, data_dir: str | None, image_size: int, validation_fraction: float,
              chief_copy: str | None = None) -> ImageFolderBuilder:
    # Listing a folder and fingerprinting it make a few objects per file, none in a cycle; the full collections they
    # set off walked every object the job holds (0.1 to 0.3 s of a 20,000-image folder's 0.3 s). The decoding
    # processes, forked meanwhile, run without the collector too.
    with cli.without_garbage_collection():
        return _listed_and_prepared(root, data_dir, image_size, validation_fraction, chief_copy)


def _listed_and_prepared(root: str, data_dir: str | None, image_size: int, validation_fraction: float,
                         chief_copy: str | None) -> ImageFolderBuilder:
    folder = image_folder.discover(root, validation_fraction)
    builder = ImageFolderBuilder(folder, image_size, data_dir)
    if chief_copy is not None and builder.builder_config.name != chief_copy:
        # Workers training on different images would not train one model.
        raise UsageError(f"--dataset={root} changed while the job started: the chief prepared {chief_copy}, this "
                         f"worker lists {builder.builder_config.name}; leave the folder alone while a job reads it.")
    if builder.is_prepared():
        logging.info("%s: using its prepared copy in %s (%s).", root, builder.data_dir, _totals(builder))
    else:
        if chief_copy is not None:
            logging.info("%s: the chief's copy is not in this worker's --data_dir (%s), which it does not share; "
                         "preparing the same copy here.", root, data_dir)
        _prepare(builder)
    return builder


def _prepare(builder: ImageFolderBuilder) -> None:
    folder = builder.folder
    logging.info("%s: preparing %s images of %d classes at %dx%d into %s (once; later runs reuse it).", folder.root,
                 f"{folder.num_images:,}", len(folder.class_names), builder.image_size, builder.image_size,
                 builder.data_dir)
    showing = tfds.core.utils.tqdm_utils._active  # TFDS's own bars would overwrite ours on the same terminal.
    tfds.display_progress_bar(False)
    # TFDS draws from Python's generator while it writes, and Keras seeds its initializers from it: without this, a
    # run that prepares the folder would start from other weights than its rerun, which finds the folder prepared.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        builder.download_and_prepare()
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        tfds.display_progress_bar(showing)
        builder._progress.close()
    for line in summary(builder):
        logging.info("%s", line)


def summary(builder: ImageFolderBuilder) -> list[str]:
    """Images per class and per split, and how many files were skipped: the lines logged after preparing."""
    counts, names = builder.info.metadata["counts"], builder.info.features["label"].names
    splits = sorted(counts, key=lambda split: split != image_folder.TRAIN_SPLIT)
    width = max(len("class"), *(len(name) for name in names))
    lines = [f"{builder.folder.root}: {_totals(builder)}.",
             f"  {'class':<{width}}  " + "  ".join(f"{split:>10}" for split in splits)]
    for label, name in enumerate(names):
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{counts[split][label]:>10,}" for split in splits))
    return lines


def _totals(builder: ImageFolderBuilder) -> str:
    counts, skipped = builder.info.metadata["counts"], skipped_files(builder)
    images = ", ".join(f"{sum(per_class):,} {split}" for split, per_class in counts.items())
    return (f"{images} images of {len(builder.info.features['label'].names)} classes at "
            f"{builder.image_size}x{builder.image_size}, {len(skipped)} file{'s' * (len(skipped) != 1)} skipped")


def skipped_files(builder: ImageFolderBuilder) -> list[tuple[str, str]]:
    """(path, reason) for every file not trained on: passed over while listing (this run's listing, since files
    that are not images do not change the fingerprint), or unreadable when the folder was prepared."""
    unreadable = [tuple(entry) for entry in builder.info.metadata.get("unreadable") or []]
    return sorted([*builder.folder.skipped, *unreadable])


def write_skipped_files(builder, run_dir: str) -> None:
    """Lists the files a folder dataset skipped, with the reasons, in the run directory (nothing for TFDS data)."""
    if not isinstance(builder, ImageFolderBuilder):
        return
    skipped = skipped_files(builder)
    path = os.path.join(run_dir, SKIPPED_FILES)
    if not skipped:
        if os.path.exists(path):
            os.remove(path)  # Left by an earlier run on a folder that has since been fixed.
        return
    with open(path, "w", encoding="utf-8") as file:
        file.write(f"# Files of {builder.folder.root} that were not trained on: path<TAB>reason\n")
        for relative, reason in skipped:
            file.write(f"{display_text.printable(relative)}\t{reason}\n")
