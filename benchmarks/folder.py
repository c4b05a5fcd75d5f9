"""The folder section of benchmarks/run.py: a folder of JPEGs prepared by trainer.folder_dataset against one epoch of
Keras's image_dataset_from_directory, our later epochs, and training fed from the folder against synthetic data."""

import concurrent.futures
import os
import pathlib
import shutil
import tempfile
import time

from absl import flags
from absl import logging
import keras
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from benchmarks.synthetic import synthetic_iterator
from trainer.training import data
from trainer.training import folder_dataset

def define_flags(flag_values: flags.FlagValues) -> None:
    """The section's flags, in benchmarks/run.py's own registry."""
    flags.DEFINE_integer("folder_images", 20000, "Images in the folder section's folder (fewer for a quick try).",
                         flag_values=flag_values)
    flags.DEFINE_string("work_dir", None, "Where the folder section keeps its JPEG folder (reused when present) and "
                        "prepares it. Default: a folder_benchmark directory in the system's temporary directory.",
                        flag_values=flag_values)
    flags.DEFINE_list("folder_models", ["cnn", "airbench"], "Models the folder section trains from the folder.",
                      flag_values=flag_values)
    flags.register_validator("folder_models", lambda models: set(models) <= {"cnn", "airbench"},
                             "--folder_models: choose from cnn, airbench.", flag_values=flag_values)
    flags.register_validator("folder_images", lambda count: 200 <= count <= 50000,
                             "--folder_images: from 200 (a few images per class for each split) to 50000 "
                             "(CIFAR-10's training set).", flag_values=flag_values)

# The folder: photographs of about 256x256, trained at --image_size=64 in batches of 128.
SOURCE_SIZE = 256
IMAGE_SIZE = 64
BATCH_SIZE = 128
JPEG_QUALITY = 90
VALIDATION_FRACTION = 0.1
# Epochs of our pipeline timed after preparation, each read in place from the shards (the first also opens them).
EPOCHS = 4
# The three timings the goals compare (a Keras epoch, our preparation, our first epoch) are each the median of this
# many runs: a single run of one of them varied by a third from one run of the benchmark to the next.
REPEATS = 3
# The goals: preparation / one Keras epoch, a later epoch / one Keras epoch, training from the folder /
# training from synthetic data.
GOALS = {"preparation": 1.0, "epoch": 10.0, "training": 0.95}
# Steps per timed call, as the throughput section takes them (cnn's steps are quick, so more of them per call).
STEPS_PER_LOOP = {"cnn": 50, "airbench": 10}


def benchmark(flag_values: flags.FlagValues, cifar_data_dir: str, make_steps, loop_runner, timed_rounds) -> dict:
    """All of the section's figures, measured in this process on the same folder: the three that the goals compare
    in alternating rounds, then training."""
    work_dir = pathlib.Path(flag_values.work_dir or pathlib.Path(tempfile.gettempdir()) / "folder_benchmark")
    images = flag_values.folder_images
    root = make_folder(work_dir / f"cifar10_jpeg_{images}", images, cifar_data_dir)
    read_every_file(root)  # Both readers then find the files in the page cache, as a second run would.
    prepared_dir = work_dir / "prepared"
    keras_epochs, preparations, first_epochs = [], [], []
    for round_index in range(REPEATS):
        # The three timings the goals compare, in rounds that alternate them: the machine's speed drifts within
        # minutes, and a drift then moves all three alike instead of one of them.
        keras_epochs.append(time_keras_epoch(root))
        builder, preparation = time_preparation(root, prepared_dir, images)
        preparations.append(preparation)
        # Each first epoch from a new pipeline, which reads the shards; the last round's goes on to the later epochs.
        epochs = time_our_epochs(builder, EPOCHS if round_index == REPEATS - 1 else 1)
        first_epochs.append(epochs[0])
    keras_epoch, preparation = median_run(keras_epochs), median_run(preparations)
    epochs[0] = median_run(first_epochs)
    training = [train_from_folder(model, str(root), str(prepared_dir), make_steps, loop_runner, timed_rounds)
                for model in flag_values.folder_models]
    return {"images": flag_values.folder_images, "source_size": SOURCE_SIZE, "image_size": IMAGE_SIZE,
            "batch_size": BATCH_SIZE, "keras_epoch": keras_epoch, "preparation": preparation, "epochs": epochs,
            "training": training, "goals": GOALS}


def make_folder(root: pathlib.Path, count: int, cifar_data_dir: str) -> pathlib.Path:
    """ROOT/<class>/<n>.jpg from the first `count` CIFAR-10 training images, upscaled to SOURCE_SIZE."""
    complete = root.with_suffix(".complete")  # Beside the folder: inside, it would be a file outside any class.
    if complete.exists():
        logging.info("folder: reusing %s", root)
        return root
    shutil.rmtree(root, ignore_errors=True)
    names = tfds.builder("cifar10", data_dir=cifar_data_dir).info.features["label"].names
    for name in names:
        (root / name).mkdir(parents=True)
    logging.info("folder: writing %d JPEGs of %dx%d to %s", count, SOURCE_SIZE, SOURCE_SIZE, root)
    examples = tfds.as_numpy(tfds.load("cifar10", split=f"train[:{count}]", data_dir=cifar_data_dir))

    def save(index_and_example):
        index, example = index_and_example
        image = Image.fromarray(example["image"]).resize((SOURCE_SIZE, SOURCE_SIZE), Image.Resampling.BICUBIC)
        image.save(root / names[example["label"]] / f"{index:05d}.jpg", quality=JPEG_QUALITY)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(save, enumerate(examples)))
    # Written last: a folder without it was interrupted, and is made again.
    complete.write_text(f"{count} CIFAR-10 training images at {SOURCE_SIZE}x{SOURCE_SIZE}\n")
    return root


def median_run(runs: list[dict]) -> dict:
    """The run of median seconds, with every run's seconds beside it."""
    median = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
    return {**median, "runs_seconds": [run["seconds"] for run in runs]}


def read_every_file(root: pathlib.Path) -> None:
    for path in root.glob("*/*.jpg"):
        path.read_bytes()


def time_keras_epoch(root: pathlib.Path) -> dict:
    """Listing the folder and reading one epoch of keras.utils.image_dataset_from_directory to its end."""
    began = time.perf_counter()
    batches = keras.utils.image_dataset_from_directory(str(root), image_size=(IMAGE_SIZE, IMAGE_SIZE),
                                                       batch_size=BATCH_SIZE, verbose=False)
    images = sum(int(labels.shape[0]) for _, labels in batches)
    seconds = time.perf_counter() - began
    logging.info("folder: one Keras epoch of %d images in %.1fs", images, seconds)
    return {"seconds": seconds, "images": images, "images_per_second": images / seconds}


def time_preparation(root: pathlib.Path, prepared_dir: pathlib.Path, images: int):
    """The folder prepared into an empty directory (a reused copy would take no time at all): (builder, timing)."""
    shutil.rmtree(prepared_dir, ignore_errors=True)
    began = time.perf_counter()
    builder = folder_dataset.load(str(root), str(prepared_dir), image_size=IMAGE_SIZE,
                                  validation_fraction=VALIDATION_FRACTION)
    seconds = time.perf_counter() - began
    logging.info("folder: prepared %d images in %.1fs", images, seconds)
    return builder, {"seconds": seconds, "images": images}


def time_our_epochs(builder, count: int) -> list[dict]:
    """Training batches as a run reads them (shuffled, batched uint8, read in place from the shards), for `count`
    epochs of a new pipeline."""
    info = data.dataset_info(builder, "train", "validation")
    steps_per_epoch = info.num_train_examples // BATCH_SIZE
    inputs = data.Inputs(builder, info, train_split="train", eval_split="validation", global_batch_size=BATCH_SIZE,
                         steps_per_epoch=steps_per_epoch, seed=0)
    epochs = []
    began = time.perf_counter()  # The first epoch includes making the pipeline, whatever it reads then.
    iterator = iter(inputs.training(tf.distribute.InputContext(), 0, count, 0))
    for epoch in range(count):
        if epoch:
            began = time.perf_counter()
        for _ in range(steps_per_epoch):
            next(iterator)
        seconds = time.perf_counter() - began
        images = steps_per_epoch * BATCH_SIZE
        epochs.append({"seconds": seconds, "images": images, "images_per_second": images / seconds,
                       "from": "the prepared shards, opened" if epoch == 0 else "the prepared shards, open"})
        logging.info("folder: our epoch %d, %d images in %.2fs", epoch + 1, images, seconds)
    return epochs


def train_from_folder(model: str, root: str, prepared_dir: str, make_steps, loop_runner, timed_rounds) -> dict:
    """Training images/s at --image_size=64 fed from the prepared folder and from one in-memory batch."""
    model_steps = make_steps(model, dataset=root, data_dir=prepared_dir, image_size=IMAGE_SIZE,
                             validation_fraction=VALIDATION_FRACTION)
    steps_per_loop = STEPS_PER_LOOP[model]
    medians = timed_rounds({"folder": loop_runner(model_steps, model_steps.training_iterator(model_steps.phases[0]),
                                                  steps_per_loop),
                            "synthetic": loop_runner(model_steps, synthetic_iterator(model_steps), steps_per_loop)},
                           rounds=5, warmup_steps=steps_per_loop)
    row = {"model": model, "precision": model_steps.precision, "steps_per_loop": steps_per_loop, **medians,
           "ratio": medians["folder"] / medians["synthetic"]}
    logging.info("folder: training %s", row)
    return row

