"""TFDS image-classification data: decoded once, cached as uint8, sharded and batched per replica."""

import dataclasses
import os
import socket

from absl import logging
from google.protobuf import json_format
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer.training import folder_dataset
from trainer.training import image_folder
from trainer.training import pixel_shards
from trainer.errors import UsageError
from trainer.errors import one_line

AUTOTUNE = tf.data.AUTOTUNE
# Labels of the examples that pad the evaluation set to whole global batches; they carry no weight.
PADDING_LABEL = -1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the job needs to know about the data."""

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    num_train_examples: int
    num_eval_examples: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_builder(name: str, data_dir: str | None, *, image_size: int | None = None,
                 validation_fraction: float = image_folder.DEFAULT_VALIDATION_FRACTION) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder for `name`, downloading it when missing and possible.

    A `name` that looks like a path is a folder of images, prepared once into `data_dir` at the run's
    `image_size` (see folder_dataset.stored_image_size), with `validation_fraction` of each class held out when
    the folder has no split folders.
    """
    if image_folder.is_folder(name):
        return folder_dataset.load(name, data_dir, image_size=image_size, validation_fraction=validation_fraction)
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=True)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise UsageError(f"--dataset={name} is not a TFDS dataset; see `tfds.list_builders()` "
                         "for the names (e.g. cifar10, cifar100).") from error
    except (json_format.ParseError, ValueError, OSError) as error:
        # A prepared copy whose dataset_info.json or features.json is garbage or unreadable.
        where = os.path.join(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets", name)
        raise UsageError(f"the prepared copy of --dataset={name} in {where} cannot be read ({one_line(error, 160)}); "
                         "prepare it again, or point --data_dir (or TFDS_DATA_DIR) at a good copy.") from error
    if not builder.is_prepared():
        _download_and_prepare(builder, name)
    _check_features(builder, name)
    return builder


def folder_options(run_config: dict) -> dict:
    """load_builder's folder arguments as a finished run's config.json gives them, so that evaluating or
    reloading the run finds the copy of its folder it trained on."""
    return {"image_size": run_config.get("image_size"),
            "validation_fraction": run_config.get("validation_fraction", image_folder.DEFAULT_VALIDATION_FRACTION)}


def damaged_shard_error(name: str, data_dir: str | None) -> UsageError | None:
    """The one line for a DataLossError while reading --dataset: a UsageError naming its damaged file (a shard cut
    short or corrupted), or None when every file reads whole, so the error came from somewhere else."""
    if image_folder.is_folder(name):
        return None  # A folder's shards are ours, keyed by its fingerprint; a damaged copy is not found by name.
    directory = tfds.builder(name, data_dir=data_dir).data_dir
    for shard in sorted(tf.io.gfile.glob(os.path.join(directory, "*.tfrecord*"))):
        try:
            for _ in tf.data.TFRecordDataset(shard).batch(4096):
                pass
        except tf.errors.DataLossError:
            return UsageError(f"{shard} is damaged (cut short or corrupted); prepare --dataset={name} again, or "
                              "point --data_dir (or TFDS_DATA_DIR) at a good copy.")
    return None


def _download_and_prepare(builder: tfds.core.DatasetBuilder, name: str) -> None:
    where = os.path.dirname(os.path.dirname(builder.data_dir))
    advice = (f"point --data_dir (or TFDS_DATA_DIR) at a directory that holds a prepared copy "
              f"({name}/<version>/ as TFDS writes it)")
    # TFDS retries an unreachable host for minutes; without DNS the answer is known at once.
    if not _proxy_configured() and not _resolves("storage.googleapis.com"):
        raise UsageError(f"--dataset={name} is not in {where} and this machine cannot reach the internet "
                         f"to download it; {advice}.")
    logging.info("Downloading and preparing %s into %s.", name, where)
    try:
        builder.download_and_prepare()
    except Exception as error:  # TFDS surfaces network failures as many exception types.
        raise UsageError(f"--dataset={name} is not in {where} and downloading it failed "
                         f"({type(error).__name__}); {advice}.") from error


def _proxy_configured() -> bool:
    return any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _check_features(builder: tfds.core.DatasetBuilder, name: str) -> None:
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise UsageError(f"--dataset={name} has no 'image' and 'label' features; pick an image-classification "
                         "dataset.")
    shape = features["image"].shape
    if None in shape:
        raise UsageError(f"--dataset={name} has images of varying size {shape}; this job needs fixed-size images.")


def num_examples(builder: tfds.core.DatasetBuilder, split: str, flag: str) -> int:
    """Examples in a (possibly sliced) split; an unknown split is a usage error naming the flag."""
    try:
        count = builder.info.splits[split].num_examples
    except (ValueError, KeyError, AssertionError) as error:
        valid = ", ".join(builder.info.splits.keys())
        raise UsageError(f"{flag}={split} is not a split of {builder.info.name}: {str(error).rstrip('.')}. "
                         f"Splits: {valid}; slices such as 'train[:2000]' also work.") from error
    if count == 0:
        raise UsageError(f"{flag}={split} holds no examples.")
    return count


def dataset_info(builder: tfds.core.DatasetBuilder, train_split: str, eval_split: str) -> DatasetInfo:
    features = builder.info.features
    return DatasetInfo(
        name=getattr(builder, "source_name", builder.info.name),  # A folder dataset is named by its folder.
        class_names=tuple(features["label"].names),
        image_shape=tuple(features["image"].shape),
        num_train_examples=num_examples(builder, train_split, "--train_split"),
        num_eval_examples=num_examples(builder, eval_split, "--eval_split"))


def class_counts(builder: tfds.core.DatasetBuilder, split: str, num_classes: int) -> np.ndarray:
    """Examples per class in a (possibly sliced) split: a prepared folder's own counts for a whole split, else the
    labels counted once, without decoding an image (a few seconds for CIFAR-10's 50,000)."""
    # TFDS's split statistics hold no per-class counts for its image datasets; the folder builder keeps its own.
    folder_counts = (getattr(builder.info, "metadata", None) or {}).get("counts", {}).get(split)
    if folder_counts is not None:
        return np.asarray(folder_counts, np.int64)
    labels = builder.as_dataset(split=split, shuffle_files=False,
                                decoders={name: tfds.decode.SkipDecoding() for name in builder.info.features
                                          if name != "label"},
                                read_config=tfds.ReadConfig(try_autocache=False))
    counts = np.zeros(num_classes, np.int64)
    for batch in labels.map(_label).batch(8192).prefetch(AUTOTUNE):
        counts += np.bincount(batch.numpy(), minlength=num_classes)[:num_classes]
    return counts


def decoded_examples(builder: tfds.core.DatasetBuilder, split: str, with_index: bool = False) -> tf.data.Dataset:
    """(uint8 image, int32 label) pairs in a fixed order, decoded once and cached in memory.

    With `with_index`, triples that also carry the example's int64 position in the split, which
    names it for per-example augmentation views and cached features.
    """
    return _decoded(builder, split, with_index).cache()


def _decoded(builder: tfds.core.DatasetBuilder, split: str, with_index: bool = False) -> tf.data.Dataset:
    if pixel_shards.stores_raw_pixels(builder):
        # Unbatched before the cache: later epochs then read single examples from memory, as for other datasets.
        return pixel_shards.parsed_batches(builder, split, with_index).unbatch()
    examples = builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={name: tfds.decode.SkipDecoding() for name in builder.info.features if name not in ("image", "label")},
        read_config=tfds.ReadConfig(try_autocache=False))
    examples = examples.map(_image_and_label, num_parallel_calls=AUTOTUNE, deterministic=True)
    if with_index:
        examples = examples.enumerate().map(_with_index)
    return examples


# The dataset functions here have no Python control flow, so autograph is told not to convert them: it would cost
# about 0.1 s of CPU each, in every process.
@tf.autograph.experimental.do_not_convert
def _label(example: dict) -> tf.Tensor:
    return example["label"]


@tf.autograph.experimental.do_not_convert
def _image_and_label(example: dict) -> tuple[tf.Tensor, tf.Tensor]:
    return example["image"], tf.cast(example["label"], tf.int32)


@tf.autograph.experimental.do_not_convert
def _with_index(index: tf.Tensor, pair: tuple) -> tuple[tf.Tensor, ...]:
    return (*pair, index)


@tf.autograph.experimental.do_not_convert
def _image(image: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
    return image


def sample_images(builder: tfds.core.DatasetBuilder, split: str, count: int) -> np.ndarray:
    """The first `count` images of a split (in its fixed order), as one uint8 array."""
    # Not through the cache: a cache read in part is discarded, with a warning in the job's log.
    images = _decoded(builder, split).take(count).map(_image).batch(count)
    return next(iter(images)).numpy()


def _options() -> tf.data.Options:
    options = tf.data.Options()
    # Each pipeline shards explicitly (see training_batches), so tf.data must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return options


def training_batches(examples: tf.data.Dataset, *, num_examples: int, input_context: tf.distribute.InputContext,
                     global_batch_size: int, steps_per_epoch: int, start_epoch: int, end_epoch: int,
                     start_step: int, seed: int, images_of=None) -> tf.data.Dataset:
    """Per-replica training batches of one input pipeline, from (start_epoch, start_step) to end_epoch.

    Every pipeline shuffles the whole split with the same per-epoch seed and keeps every N-th
    example, so the pipelines read disjoint parts of each epoch, and the examples that form a global
    batch do not depend on the number of workers or replicas. A restarted job regenerates the same
    order and skips the steps it already trained.

    With `images_of` (pixel_shards.PixelShards.batches_of), `examples` holds the examples' positions only, and each
    batch of them becomes the batch of (image, label, position) that shuffling the examples themselves would give:
    a shuffle's order depends on its seed and buffer, not on what it shuffles.
    """
    per_replica = input_context.get_per_replica_batch_size(global_batch_size)
    replicas_per_pipeline = input_context.num_replicas_in_sync // input_context.num_input_pipelines
    batches_per_epoch = steps_per_epoch * replicas_per_pipeline

    def one_epoch(epoch: int) -> tf.data.Dataset:
        # Python-int seeds: tf.data rejects tensor seeds when the global seed is 0.
        return (examples.shuffle(num_examples, seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False)
                .shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
                .batch(per_replica, drop_remainder=True, num_parallel_calls=AUTOTUNE)
                .take(batches_per_epoch))

    batches = one_epoch(start_epoch).skip(start_step * replicas_per_pipeline)
    for epoch in range(start_epoch + 1, end_epoch):
        batches = batches.concatenate(one_epoch(epoch))
    if images_of is not None:
        batches = images_of(batches)
    return batches.prefetch(AUTOTUNE).with_options(_options())


def evaluation_batches(examples: tf.data.Dataset, *, num_examples: int, input_context: tf.distribute.InputContext,
                       global_batch_size: int, image_shape: tuple[int, int, int]) -> tf.data.Dataset:
    """Per-replica evaluation batches covering the split once, padded to whole global batches.

    Padding examples have label PADDING_LABEL and must be given zero weight. With equal, full
    batches on every replica, all workers run the same number of steps and shapes stay static.
    """
    per_replica = input_context.get_per_replica_batch_size(global_batch_size)
    padding = -num_examples % global_batch_size
    filler = tf.data.Dataset.from_tensors((tf.zeros(image_shape, tf.uint8), tf.constant(PADDING_LABEL, tf.int32)))
    padded = examples.concatenate(filler.repeat(padding))
    return (padded.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
            .batch(per_replica, drop_remainder=True, num_parallel_calls=AUTOTUNE)
            .prefetch(AUTOTUNE).with_options(_options()))


class Inputs:
    """A run's input pipelines: its training batches from any (epoch, step), its evaluation batches, its samples."""

    def __init__(self, builder: tfds.core.DatasetBuilder, info: DatasetInfo, *, train_split: str, eval_split: str,
                 global_batch_size: int, steps_per_epoch: int, seed: int):
        self.builder, self.info = builder, info
        self.train_split, self.eval_split = train_split, eval_split
        self.global_batch_size, self.steps_per_epoch, self.seed = global_batch_size, steps_per_epoch, seed

    @property
    def num_train_examples(self) -> int:
        return self.info.num_train_examples

    def indexed_training_examples(self) -> tf.data.Dataset:
        """(image, label, index) for every training example, in the split's fixed order."""
        return decoded_examples(self.builder, self.train_split, with_index=True)

    def training(self, input_context: tf.distribute.InputContext, start_epoch: int, end_epoch: int,
                 start_step: int) -> tf.data.Dataset:
        # A prepared folder's images on this machine's disk are read in place, the same batches from less memory.
        in_place = pixel_shards.in_place(self.builder, self.train_split)
        if in_place is None:
            examples, images_of = self.indexed_training_examples(), None
        else:
            examples, images_of = tf.data.Dataset.range(self.num_train_examples), in_place.batches_of
        return training_batches(
            examples, num_examples=self.num_train_examples, input_context=input_context,
            global_batch_size=self.global_batch_size, steps_per_epoch=self.steps_per_epoch, start_epoch=start_epoch,
            end_epoch=end_epoch, start_step=start_step, seed=self.seed, images_of=images_of)

    def evaluation(self, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        return evaluation_batches(
            decoded_examples(self.builder, self.eval_split), num_examples=self.info.num_eval_examples,
            input_context=input_context, global_batch_size=self.global_batch_size, image_shape=self.info.image_shape)

    def training_sample(self, count: int) -> np.ndarray:
        """The training split's first `count` images (uint8)."""
        return sample_images(self.builder, self.train_split, count)


def evaluation_steps(num_examples: int, global_batch_size: int) -> int:
    return -(-num_examples // global_batch_size)


def training_steps_per_epoch(num_examples: int, global_batch_size: int, cap: int | None) -> int:
    steps = num_examples // global_batch_size
    if steps == 0:
        raise UsageError(f"--batch_size={global_batch_size} is larger than the {num_examples} training examples; "
                         "use a smaller batch or a larger --train_split.")
    return min(steps, cap) if cap else steps
