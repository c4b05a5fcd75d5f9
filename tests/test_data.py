"""The input pipeline: determinism, sharding across workers, resumption, evaluation padding, errors."""

import pathlib

import numpy as np
import pytest
import tensorflow as tf

from helpers import fails_in_process
from trainer.training import data
from trainer import task
from trainer.errors import UsageError


def index_examples(count: int) -> tf.data.Dataset:
    """Examples whose 'image' is their own index, so the test can see exactly which were read."""
    return tf.data.Dataset.range(count).map(lambda index: (index, tf.cast(index % 10, tf.int32)))


def read_training(count, *, pipelines=1, pipeline=0, replicas=1, batch=8, steps=4, start_epoch=0, end_epoch=2,
                  start_step=0, seed=0):
    context = tf.distribute.InputContext(pipelines, pipeline, replicas)
    batches = data.training_batches(index_examples(count), num_examples=count, input_context=context,
                                    global_batch_size=batch, steps_per_epoch=steps, start_epoch=start_epoch,
                                    end_epoch=end_epoch, start_step=start_step, seed=seed)
    return [images.numpy() for images, _ in batches]


def test_workers_read_disjoint_parts_that_cover_the_epoch():
    per_worker = [read_training(64, pipelines=2, pipeline=worker, replicas=2, steps=8, end_epoch=1)
                  for worker in (0, 1)]
    seen = np.concatenate([np.concatenate(batches) for batches in per_worker])
    assert len(seen) == 64 and len(set(seen.tolist())) == 64


def test_global_batches_do_not_depend_on_the_number_of_workers():
    single = read_training(64, batch=8, steps=8)
    workers = [read_training(64, pipelines=2, pipeline=worker, replicas=2, batch=8, steps=8) for worker in (0, 1)]
    for step, batch in enumerate(single):
        together = np.concatenate([workers[0][step], workers[1][step]])
        assert sorted(batch.tolist()) == sorted(together.tolist())


def test_each_epoch_is_a_new_permutation_and_the_order_is_reproducible():
    first, again = read_training(32), read_training(32)
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    epoch_one, epoch_two = np.concatenate(first[:4]), np.concatenate(first[4:])
    assert sorted(epoch_one.tolist()) == list(range(32)) == sorted(epoch_two.tolist())
    assert not np.array_equal(epoch_one, epoch_two)
    assert not np.array_equal(np.concatenate(read_training(32, seed=1)), np.concatenate(first))


def test_resuming_mid_epoch_continues_the_same_sequence():
    whole = read_training(64, steps=8, end_epoch=3)
    resumed = read_training(64, steps=8, start_epoch=1, start_step=3, end_epoch=3)
    np.testing.assert_array_equal(np.concatenate(resumed), np.concatenate(whole[8 + 3:]))


def test_uneven_shards_still_give_every_worker_the_same_number_of_steps():
    counts = [len(read_training(67, pipelines=3, pipeline=worker, replicas=3, batch=9, steps=67 // 9, end_epoch=1))
              for worker in range(3)]
    assert counts == [7, 7, 7]


def test_evaluation_covers_every_example_once_with_padding_marked():
    count, batch = 50, 16
    seen, padding = [], 0
    for worker in (0, 1):
        context = tf.distribute.InputContext(2, worker, 2)
        examples = index_examples(count).map(lambda index, label: (tf.fill([2, 2, 1], tf.cast(index, tf.uint8)), label))
        for images, labels in data.evaluation_batches(examples, num_examples=count, input_context=context,
                                                      global_batch_size=batch, image_shape=(2, 2, 1)):
            real = labels.numpy() != data.PADDING_LABEL
            seen.extend(images.numpy()[real, 0, 0, 0].tolist())
            padding += int((~real).sum())
    assert sorted(seen) == list(range(count))
    assert padding == data.evaluation_steps(count, batch) * batch - count


def test_host_pipeline_ships_uint8_images_at_their_stored_size(cifar_dir):
    builder = data.load_builder("cifar10", cifar_dir)
    info = data.dataset_info(builder, "train[:256]", "test[:64]")
    assert info.num_classes == 10 and info.class_names[0] == "airplane"
    assert (info.num_train_examples, info.num_eval_examples) == (256, 64)
    images, labels = next(iter(data.decoded_examples(builder, "train[:256]").batch(256)))
    assert images.dtype == tf.uint8 and images.shape == (256, 32, 32, 3)
    assert labels.dtype == tf.int32 and set(labels.numpy().tolist()) <= set(range(10))


def test_unknown_split_names_the_flag_and_the_valid_splits(cifar_dir):
    builder = data.load_builder("cifar10", cifar_dir)
    with pytest.raises(UsageError, match=r"--eval_split=tset is not a split of cifar10.*train, test"):
        data.dataset_info(builder, "train", "tset")


def test_unknown_dataset_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--dataset=cifar11 is not a TFDS dataset"):
        data.load_builder("cifar11", str(tmp_path))


def test_missing_dataset_without_network_says_how_to_point_at_a_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_resolves", lambda host: False)
    monkeypatch.setattr(data, "_proxy_configured", lambda: False)
    with pytest.raises(UsageError, match="cannot reach the internet.*--data_dir"):
        data.load_builder("cifar10", str(tmp_path))


def test_other_tfds_datasets_with_image_and_label_work(tiny_shapes_dir):
    builder = data.load_builder("tiny_shapes", tiny_shapes_dir)
    info = data.dataset_info(builder, "train", "test")
    assert info.class_names == ("left", "middle", "right") and info.image_shape == (16, 16, 1)
    images, _ = next(iter(data.decoded_examples(builder, "train").batch(8)))
    assert images.shape == (8, 16, 16, 1) and images.dtype == tf.uint8


def test_batch_larger_than_the_training_split_is_a_usage_error():
    with pytest.raises(UsageError, match="--batch_size=512 is larger than the 100 training examples"):
        data.training_steps_per_epoch(100, 512, None)


def damaged_copy(cifar_dir, tmp_path, name: str, content: bytes) -> str:
    """A TFDS data dir whose cifar10/3.0.2 links to the prepared copy's files, except `name`, which holds
    `content`: the shared copy is never touched."""
    source = pathlib.Path(cifar_dir) / "cifar10" / "3.0.2"
    copy = tmp_path / "tfds" / "cifar10" / "3.0.2"
    copy.mkdir(parents=True)
    for path in source.iterdir():
        (copy / path.name).symlink_to(path)
    (copy / name).unlink()
    (copy / name).write_bytes(content)
    return str(tmp_path / "tfds")


def test_a_garbage_dataset_info_gets_one_line_saying_to_prepare_it_again(capsys, cifar_dir, tmp_path):
    data_dir = damaged_copy(cifar_dir, tmp_path, "dataset_info.json", b'{"name": garbage')
    line = fails_in_process(capsys, task, f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'run'}")
    assert "cifar10" in line and "cannot be read" in line and "prepare it again" in line
    assert not (tmp_path / "run").exists()


def test_a_truncated_train_shard_gets_one_line_naming_the_file(capsys, cifar_dir, tmp_path):
    shard = "cifar10-train.tfrecord-00000-of-00001"
    with open(pathlib.Path(cifar_dir) / "cifar10" / "3.0.2" / shard, "rb") as file:
        data_dir = damaged_copy(cifar_dir, tmp_path, shard, file.read(100_000))  # About 30 images, cut mid-record.
    line = fails_in_process(capsys, task, f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'run'}", "--model=cnn",
                            "--train_split=train[:512]", "--eval_split=test[:64]", "--batch_size=64")
    assert f"{data_dir}/cifar10/3.0.2/{shard} is damaged" in line and "prepare --dataset=cifar10 again" in line
