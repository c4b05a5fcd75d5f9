"""A prepared folder's records: examples encoded in tf.train.Example's wire format by the decoding workers, framed as
TFRecords, and written into TFDS's shards with an index of where each image's pixels lie (read by pixel_shards)."""

import contextlib
import dataclasses
import os
import shutil
import struct
import tempfile

import google_crc32c
import numpy as np
import tensorflow as tf

_LENGTH = struct.Struct("<Q")
# TFRecord's framing stores CRC32C checksums "masked", so that a checksum of data holding checksums stays strong.
_CRC_MASK_DELTA = 0xA282EAD8
# Where the pixels of each example of a shard begin in it (bytes from the file's start), and its label.
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("label", "<i4")])
INDEX_SUFFIX = ".pixel_index.npy"


def _masked_crc(crc: int) -> bytes:
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value >= 0x80:
        encoded.append((value & 0x7F) | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _header(field: int, length: int) -> bytes:
    """A length-delimited field's tag and length (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(length)


def _field(field: int, payload: bytes) -> bytes:
    return _header(field, len(payload)) + payload


def _entry(key: str, feature: bytes) -> bytes:
    """One entry of Features' map<string, Feature> (field 1): the key (1) and the Feature (2)."""
    return _field(1, _field(1, key.encode()) + _field(2, feature))


def example_parts(num_pixel_bytes: int, label: int, file_name: str) -> tuple[bytes, bytes]:
    """The serialized tf.train.Example of an image, label and file name, as the bytes before its pixels and the bytes
    after them: the workers encode it without copying the pixels into a message first (an Example message cost a
    tenth of decoding the image). Feature "image" is a BytesList (Feature field 1), "label" a packed Int64List (3)."""
    bytes_list = _header(1, num_pixel_bytes)  # BytesList.value (1), followed by the pixels.
    feature = _header(1, len(bytes_list) + num_pixel_bytes) + bytes_list
    image_entry = _field(1, b"image") + _header(2, len(feature) + num_pixel_bytes) + feature
    tail = (_entry("label", _field(3, _field(1, _varint(label))))
            + _entry("file_name", _field(1, _field(1, file_name.encode("utf-8")))))
    image_header = _header(1, len(image_entry) + num_pixel_bytes) + image_entry
    features_length = len(image_header) + num_pixel_bytes + len(tail)
    return _header(1, features_length) + image_header, tail


@dataclasses.dataclass
class EncodedChunk:
    """A task's examples, framed as TFRecords one after another in `records`, with each one's serialized length,
    label and the offset of its pixels in `records`; `reasons` names, per file of the task, why it was skipped
    (None for the files kept)."""

    records: bytes = b""
    lengths: list[int] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    pixel_offsets: list[int] = dataclasses.field(default_factory=list)
    reasons: list[str | None] = dataclasses.field(default_factory=list)
    spool: str | None = None  # The file that holds `records` instead, when a worker process wrote them there.

    def spooled(self, directory: str) -> "EncodedChunk":
        """This chunk with its records in a new file in `directory` (removed by ShardWriter.write)."""
        descriptor, path = tempfile.mkstemp(dir=directory)
        with open(descriptor, "wb") as file:
            file.write(self.records)
        return dataclasses.replace(self, records=b"", spool=path)


def encode_chunk(examples) -> EncodedChunk:
    """(pixels as bytes or the reason the file was skipped, label, file name) for each file, encoded."""
    chunk, pieces, position = EncodedChunk(), [], 0
    for pixels, label, file_name in examples:
        if isinstance(pixels, str):
            chunk.reasons.append(pixels)
            continue
        head, tail = example_parts(len(pixels), label, file_name)
        length = _LENGTH.pack(len(head) + len(pixels) + len(tail))
        checksum = google_crc32c.extend(google_crc32c.extend(google_crc32c.value(head), pixels), tail)
        pieces += [length, _masked_crc(google_crc32c.value(length)), head, pixels, tail, _masked_crc(checksum)]
        chunk.reasons.append(None)
        chunk.lengths.append(len(head) + len(pixels) + len(tail))
        chunk.labels.append(label)
        chunk.pixel_offsets.append(position + 12 + len(head))
        position += 16 + chunk.lengths[-1]
    chunk.records = b"".join(pieces)
    return chunk


@contextlib.contextmanager
def spool_directory(template):
    """A directory for the workers' records on this machine's disk: beside the shards when they are local (the same
    file system, so copying from it stays in the kernel), else a temporary one; removed at the end."""
    shards_directory = os.path.dirname(os.fspath(template.filepath_prefix()))
    directory = tempfile.mkdtemp(prefix="spool-", dir=None if "://" in shards_directory else shards_directory)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class ShardWriter:
    """Writes encoded chunks, in order, into shards of about `shard_bytes` of examples, named as TFDS names them
    (their count is known only at the end), each with its index beside it."""

    def __init__(self, template, shard_bytes: int):
        self._template, self._shard_bytes = template, shard_bytes
        # A local file takes a memoryview as it is; tf.io.gfile (gs://) wants bytes, a copy.
        self._local = "://" not in os.fspath(template.filepath_prefix())
        self.shard_lengths: list[int] = []
        self.num_bytes = 0
        self._paths, self._indices, self._file, self._position, self._bytes_in_shard = [], [], None, 0, 0

    def write(self, chunk: EncodedChunk) -> None:
        run_start = position = 0
        for length, label, pixel_offset in zip(chunk.lengths, chunk.labels, chunk.pixel_offsets):
            if self._file is None or self._bytes_in_shard >= self._shard_bytes:
                self._copy(chunk, run_start, position)
                run_start = position
                self._next_shard()
            self._indices[-1].append((self._position + pixel_offset - run_start, label))
            self.shard_lengths[-1] += 1
            self._bytes_in_shard += length
            self.num_bytes += length
            position += 16 + length
        self._copy(chunk, run_start, position)
        if chunk.spool:
            os.remove(chunk.spool)

    def _copy(self, chunk: EncodedChunk, start: int, end: int) -> None:
        """Appends the chunk's records [start, end) to the shard being written."""
        if end == start:
            return
        if chunk.spool is None:
            records = memoryview(chunk.records)[start:end]
            self._file.write(records if self._local else records.tobytes())
        else:
            with open(chunk.spool, "rb", buffering=0) as spool:
                if self._local:
                    self._file.flush()
                    _send(spool.fileno(), self._file.fileno(), start, end - start)
                else:
                    self._file.write(os.pread(spool.fileno(), end - start, start))
        self._position += end - start

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._paths.append(f"{self._template.filepath_prefix()}.shard-{len(self._paths):05d}")
        self._file = open(self._paths[-1], "wb") if self._local else tf.io.gfile.GFile(self._paths[-1], "wb")
        self._indices.append([])
        self.shard_lengths.append(0)
        self._position = self._bytes_in_shard = 0

    def close(self) -> None:
        """Closes the shard being written; what is written stays under its temporary name (see finish)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Closes the last shard, gives every shard its TFDS name and writes the indices."""
        self.close()
        for number, (path, index) in enumerate(zip(self._paths, self._indices)):
            final = os.fspath(self._template.sharded_filepath(shard_index=number, num_shards=len(self._paths)))
            tf.io.gfile.rename(path, final, overwrite=True)
            with tf.io.gfile.GFile(final + INDEX_SUFFIX, "wb") as file:
                np.save(file, np.array(index, INDEX_DTYPE))


def _send(source: int, destination: int, offset: int, count: int) -> None:
    """Copies `count` bytes of `source` from `offset` to the end of `destination`, in the kernel."""
    while count:
        sent = os.sendfile(destination, source, offset, count)
        if not sent:
            raise OSError(f"a spooled chunk of records ended {count} bytes early")
        offset, count = offset + sent, count - sent
