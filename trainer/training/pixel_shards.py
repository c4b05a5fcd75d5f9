"""Shards of raw uint8 pixels, as a prepared folder stores them: parsed a batch of records at a time through tf.data,
or read in place through memory maps for training batches."""

import mmap
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer.training import folder_records
from trainer.errors import Failure

AUTOTUNE = tf.data.AUTOTUNE
# Records parsed per call, and each file's read buffer.
PARSE_BATCH = 256
READ_BUFFER_BYTES = 8 << 20
# The number of shards tfds.core.reader interleaves when it may shuffle the examples' order (its default).
TFDS_INTERLEAVE_CYCLE = 16


def stores_raw_pixels(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether the images are stored as raw uint8 bytes in TFRecord shards, as a prepared folder's are."""
    image = builder.info.features["image"]
    return (isinstance(image, tfds.features.Tensor) and image.dtype == tf.uint8 and image.shape.count(None) == 0
            and image.get_serialized_info().dtype == tf.string
            and builder.info.file_format == tfds.core.file_adapters.FileFormat.TFRECORD)


def parsed_batches(builder: tfds.core.DatasetBuilder, split: str, with_index: bool) -> tf.data.Dataset:
    """Batches of (image, label), and the examples' indices `with_index`, read from the shards in as_dataset's
    order, parsed a batch of records at a time.

    TFDS parses one record at a time, and for small images its per-example cost made a run's first epoch slower
    than reading the bytes (benchmarks/run.py --only=folder). The order must stay as_dataset's, which names each
    example's index for exact resume and the feature cache (see _records_in_order; tests/test_image_folder.py
    compares the two).
    """
    records = _records_in_order(builder, builder.info.splits[split].file_instructions)
    shape = builder.info.features["image"].shape
    features = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}

    @tf.autograph.experimental.do_not_convert  # No Python control flow over tensors (see data._label).
    def parsed(batch_index: tf.Tensor, serialized: tf.Tensor) -> tuple[tf.Tensor, ...]:
        example = tf.io.parse_example(serialized, features)
        images = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), (-1, *shape))
        labels = tf.cast(example["label"], tf.int32)
        if not with_index:
            return images, labels
        return images, labels, batch_index * PARSE_BATCH + tf.range(tf.shape(labels, tf.int64)[0], dtype=tf.int64)

    return records.batch(PARSE_BATCH).enumerate().map(parsed, num_parallel_calls=AUTOTUNE, deterministic=True)


def _records_in_order(builder: tfds.core.DatasetBuilder, instructions) -> tf.data.Dataset:
    """The serialized examples the file instructions name, in as_dataset's order for shuffle_files=False: the
    files one after the other when TFDS keeps the examples in the order they were generated (as a prepared folder
    does), else its default interleaving of the files."""
    paths = [os.fspath(instruction.filename) for instruction in instructions]
    if builder.info.disable_shuffling and _one_run(instructions):
        # One reader over the files, and no per-file stages that every record would pass through: they cost more
        # than reading the bytes.
        records = tf.data.TFRecordDataset(paths, buffer_size=READ_BUFFER_BYTES)
        skipped, taken = instructions[0].skip, sum(instruction.take for instruction in instructions)
        records = records.skip(skipped) if skipped else records
        whole = sum(instruction.examples_in_shard for instruction in instructions) - skipped
        return records.take(taken) if taken < whole else records
    files = tf.data.Dataset.from_tensor_slices((paths,
                                                np.array([instruction.skip for instruction in instructions], np.int64),
                                                np.array([instruction.take for instruction in instructions], np.int64)))
    return files.interleave(
        _records_of_one_file,
        cycle_length=1 if builder.info.disable_shuffling else TFDS_INTERLEAVE_CYCLE,
        block_length=tfds.ReadConfig().interleave_block_length, num_parallel_calls=AUTOTUNE, deterministic=True)


@tf.autograph.experimental.do_not_convert
def _records_of_one_file(path: tf.Tensor, skip: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
    return tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES).skip(skip).take(take)


def _one_run(instructions) -> bool:
    """Whether the instructions read one unbroken run of records across their files, as a split or a slice of
    one does: only the first may skip records, and only the last may stop before its file's end."""
    return (all(instruction.skip == 0 for instruction in instructions[1:])
            and all(instruction.skip + instruction.take == instruction.examples_in_shard
                    for instruction in instructions[:-1]))


def in_place(builder: tfds.core.DatasetBuilder, split: str) -> "PixelShards | None":
    """The split's images read in place, in as_dataset's order, when its shards are raw pixels on this machine's disk
    with their indices (see PixelShards.open); else None."""
    if not stores_raw_pixels(builder) or not builder.info.disable_shuffling:
        return None
    instructions = builder.info.splits[split].file_instructions
    return PixelShards.open([(os.fspath(instruction.filename), instruction.skip, instruction.take)
                             for instruction in instructions], tuple(builder.info.features["image"].shape))


class PixelShards:
    """Images of shards read in place, through memory maps of the files and the indices beside them: no copy of the
    split is made in memory (on these machines, a first touch of fresh memory costs up to 2 ms per MB), so a run's
    first epoch costs what its later ones do, and a split larger than memory still trains from the page cache."""

    def __init__(self, maps: list[np.ndarray], indices: list[np.ndarray], shape: tuple[int, ...]):
        self._maps, self._shape = maps, shape
        self.labels = np.concatenate([index["label"] for index in indices]).astype(np.int32)
        # Each example's shard, and where its pixels begin in it.
        self._shard = np.repeat(np.arange(len(maps)), [len(index) for index in indices])
        self._offset = np.concatenate([index["offset"] for index in indices])

    @classmethod
    def open(cls, shards: list[tuple[str, int, int]], shape: tuple[int, ...]) -> "PixelShards | None":
        """The examples [skip, skip + take) of each (path, skip, take), in order; None when a shard is not a local
        file or has no index (a copy prepared before indices were written): tf.data then reads it."""
        maps, indices, size = [], [], int(np.prod(shape))
        for path, skip, take in shards:
            if "://" in path or not os.path.exists(path + folder_records.INDEX_SUFFIX):
                return None
            index = np.load(path + folder_records.INDEX_SUFFIX)
            with open(path, "rb") as file:
                # MAP_POPULATE maps every page at once instead of taking a fault per page on first reading.
                mapped = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            maps.append(np.frombuffer(mapped, np.uint8))
            if len(index) < skip + take or (len(index) and index["offset"].max() + size > len(maps[-1])):
                raise Failure(f"{path} does not match its index: the prepared copy is damaged; delete the "
                              "directory to prepare the folder again.")
            indices.append(index[skip:skip + take])
        return cls(maps, indices, shape)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images (uint8 [len(positions), *shape]) and labels (int32) of the examples at these positions."""
        size = int(np.prod(self._shape))
        images = np.empty((len(positions), size), np.uint8)
        for row, shard, offset in zip(images, self._shard[positions], self._offset[positions]):
            row[:] = self._maps[shard][offset:offset + size]
        return images.reshape(len(positions), *self._shape), self.labels[positions]

    def batches_of(self, positions: tf.data.Dataset) -> tf.data.Dataset:
        """(images, labels, positions) for each batch of int64 positions."""
        shape = self._shape

        @tf.autograph.experimental.do_not_convert  # No Python control flow over tensors (see data._label).
        def gathered(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            images, labels = tf.numpy_function(self.batch, [batch], (tf.uint8, tf.int32), stateful=False)
            return tf.ensure_shape(images, (None, *shape)), tf.ensure_shape(labels, (None,)), batch

        return positions.map(gathered, num_parallel_calls=AUTOTUNE, deterministic=True)
