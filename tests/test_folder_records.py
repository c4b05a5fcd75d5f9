"""A prepared folder's records: the workers' encoding is TFRecord's and tf.train.Example's to the byte, and the shard
writer splits chunks at record boundaries into local or remote shards, with indices that point at the pixels."""

import os

import numpy as np
import pytest
import tensorflow as tf

from trainer.training import folder_records


def examples(count: int, pixel_bytes: int = 48, seed: int = 0) -> list[tuple[bytes | str, int, str]]:
    """(pixels, label, file name), one in five a skipped file's reason; labels and names of varied lengths."""
    rng = np.random.default_rng(seed)
    made = []
    for number in range(count):
        pixels = rng.integers(0, 256, pixel_bytes, dtype=np.uint8).tobytes()
        made.append(("cannot be decoded" if number % 5 == 3 else pixels, number * 37, f"class/é{'x' * number}.jpg"))
    return made


def expected_example(pixels: bytes, label: int, file_name: str) -> tf.train.Example:
    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "file_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[file_name.encode()]))}))


def test_a_chunk_is_framed_as_tf_writes_it_with_its_pixels_where_the_offsets_say(tmp_path):
    # Pixel counts whose length prefixes take one, two and three bytes.
    items = examples(6, 48) + examples(3, 64 * 64 * 3, seed=1) + examples(2, 224 * 224 * 3, seed=2)
    chunk = folder_records.encode_chunk(items)
    kept = [item for item in items if not isinstance(item[0], str)]
    assert chunk.reasons == [item[0] if isinstance(item[0], str) else None for item in items]
    records = list(tf.data.TFRecordDataset(_written(tmp_path, chunk.records)).as_numpy_iterator())
    # The examples parse as protobuf's own, and the framing (lengths, masked CRC32C checksums) is TensorFlow's writer's
    # to the byte.
    assert [tf.train.Example.FromString(record) for record in records] == [expected_example(*item) for item in kept]
    path = str(tmp_path / "theirs.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    assert chunk.records == open(path, "rb").read()
    assert chunk.lengths == [len(record) for record in records] and chunk.labels == [item[1] for item in kept]
    for (pixels, _, _), offset in zip(kept, chunk.pixel_offsets):
        assert chunk.records[offset:offset + len(pixels)] == pixels


def _written(directory, records: bytes) -> str:
    path = directory / "ours.tfrecord"
    path.write_bytes(records)
    return str(path)


class Template:
    """The two methods of TFDS's ShardedFileTemplate that the writer calls."""

    def __init__(self, directory: str):
        self.directory = directory

    def filepath_prefix(self) -> str:
        return f"{self.directory}/image_folder-train.tfrecord"

    def sharded_filepath(self, shard_index: int, num_shards: int) -> str:
        return f"{self.filepath_prefix()}-{shard_index:05d}-of-{num_shards:05d}"


@pytest.mark.parametrize("directory", ["local", "ram://shards"])  # ram://: tf.io.gfile's path, as for gs://.
def test_shards_split_at_record_boundaries_from_spooled_and_passed_chunks(tmp_path, directory):
    template = Template(str(tmp_path) if directory == "local" else f"{directory}/{tmp_path.name}")
    tf.io.gfile.makedirs(template.directory)
    items = examples(40)
    writer = folder_records.ShardWriter(template, shard_bytes=7 * 120)  # About seven records a shard.
    with folder_records.spool_directory(template) as spool:
        for start in range(0, len(items), 9):
            chunk = folder_records.encode_chunk(items[start:start + 9])
            writer.write(chunk.spooled(spool) if start % 2 else chunk)
        assert os.listdir(spool) == []  # Each spool file goes once copied.
    writer.finish()
    kept = [item for item in items if not isinstance(item[0], str)]
    count = len(writer.shard_lengths)
    paths = [template.sharded_filepath(number, count) for number in range(count)]
    assert len(paths) > 3 and sum(writer.shard_lengths) == len(kept)
    records = list(tf.data.TFRecordDataset(paths).as_numpy_iterator())
    assert [tf.train.Example.FromString(record) for record in records] == [expected_example(*item) for item in kept]
    assert writer.num_bytes == sum(len(record) for record in records)
    found = []
    for path, length in zip(paths, writer.shard_lengths):
        with tf.io.gfile.GFile(path, "rb") as file:
            shard = file.read()
        with tf.io.gfile.GFile(path + folder_records.INDEX_SUFFIX, "rb") as file:
            index = np.load(file)
        assert len(index) == length
        found += [(shard[offset:offset + 48], int(label)) for offset, label in index]
    assert found == [(pixels, label) for pixels, label, _ in kept]
