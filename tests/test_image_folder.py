"""Folder datasets: both layouts, local and gs://, prepared once and reused, every bad input in one line, and the
class names reaching a run's export, metrics and evaluation."""

import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import image_folders
from image_folders import CLASSES
from trainer import image_files
from trainer.training import data
from trainer.training import folder_dataset
from trainer.training import folder_records
from trainer.training import image_folder
from trainer.training import pixel_shards
from trainer.errors import Failure
from trainer.errors import UsageError


@pytest.fixture(scope="module")
def pictures(cifar_dir):
    return image_folders.cifar_images(cifar_dir, per_class=10)


@pytest.fixture
def pets(tmp_path, pictures) -> pathlib.Path:
    """ROOT/<class>/<image> of mixed formats, with broken and odd files among them."""
    root = tmp_path / "pets"
    image_folders.make_class_folder(root, pictures)
    image_folders.truncated_jpeg(root / "cat" / "broken.jpg", pictures["cat"][0])
    (root / "ship" / "fake.png").write_text("not a picture")
    (root / "cat" / "notes.txt").write_text("taken in 2019")
    image_folders.huge_png(root / "ship" / "huge.png", 9_000, 6_000)  # 54 MP: ours, not Pillow's limit.
    image_folders.exif_rotated_jpeg(root / "airplane" / "rotated.jpg")
    os.mkfifo(root / "cat" / "pipe.jpg")  # Opening it would hang until a writer comes.
    os.symlink("loop.jpg", root / "cat" / "loop.jpg")
    os.symlink("..", root / "cat" / "up")  # A directory loop back to the root.
    return root


def stored(builder, split: str) -> dict[str, tuple[np.ndarray, int]]:
    return {example["file_name"].decode(): (example["image"], int(example["label"]))
            for example in tfds.as_numpy(builder.as_dataset(split=split))}


@pytest.mark.parametrize("name, folder", [("./pets", True), ("/data/pets", True), ("../pets", True), ("~/pets", True),
                                          ("gs://bucket/pets", True), ("cifar10", False), ("cifar100:3.0.2", False),
                                          ("imagenet2012/subset", False)])
def test_a_path_names_a_folder_and_anything_else_a_tfds_dataset(name, folder):
    assert image_folder.is_folder(name) is folder


def test_prepares_every_format_once_skipping_bad_files_and_leaving_the_folder_alone(pets, tmp_path):
    before = image_folders.tree_snapshot(pets)
    builder = data.load_builder(str(pets), str(tmp_path / "tfds"), image_size=32, validation_fraction=0.2)
    assert builder.info.features["label"].names == list(CLASSES)
    info = data.dataset_info(builder, "train", "validation")
    assert info.image_shape == (32, 32, 3) and info.name == str(pets)
    # 31 readable images: 11 airplanes (one rotated), 10 cats, 10 ships; 20% of each class held out.
    assert (info.num_train_examples, info.num_eval_examples) == (31 - 6, 6)
    validation, train = stored(builder, "validation"), stored(builder, "train")
    assert not set(validation) & set(train)
    assert sorted(np.bincount([label for _, label in validation.values()])) == [2, 2, 2]
    skipped = dict(folder_dataset.skipped_files(builder))
    assert set(skipped) == {"cat/broken.jpg", "ship/fake.png", "cat/notes.txt", "ship/huge.png", "cat/pipe.jpg",
                            "cat/loop.jpg", "cat/up"}
    assert "50-megapixel" in skipped["ship/huge.png"] and "FIFO" in skipped["cat/pipe.jpg"]
    assert "symlink loop" in skipped["cat/loop.jpg"]
    rotated = {**validation, **train}["airplane/rotated.jpg"][0]
    assert rotated[:, :12].mean() > 200 and rotated[:, 20:].mean() < 50  # EXIF orientation applied.
    assert image_folders.tree_snapshot(pets) == before

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    folder_dataset.write_skipped_files(builder, str(run_dir))
    lines = (run_dir / folder_dataset.SKIPPED_FILES).read_text().splitlines()
    assert len(lines) == 1 + len(skipped) and lines[1].startswith("cat/broken.jpg\t")


def test_an_unchanged_folder_is_reused_and_a_changed_one_prepared_again(pets, tmp_path):
    data_dir = tmp_path / "tfds"
    first = data.load_builder(str(pets), str(data_dir), image_size=32)
    shards = sorted(pathlib.Path(first.data_dir).iterdir())
    again = data.load_builder(str(pets), str(data_dir), image_size=32)
    assert again.data_dir == first.data_dir and sorted(pathlib.Path(again.data_dir).iterdir()) == shards
    assert data.load_builder(str(pets), str(data_dir), image_size=40).data_dir != first.data_dir
    image_folders.save_mixed(np.zeros((32, 32, 3), np.uint8), pets / "ship" / "new", 0)
    changed = data.load_builder(str(pets), str(data_dir), image_size=32)
    assert changed.data_dir != first.data_dir
    assert changed.info.splits["train"].num_examples + changed.info.splits["validation"].num_examples == 32


def test_the_held_out_images_do_not_depend_on_the_run(pets):
    first = image_folder.discover(str(pets), 0.3)
    assert first.fingerprint(32) == image_folder.discover(str(pets), 0.3).fingerprint(32)
    # round(0.3 x files named like images): 11 airplanes, 11 cats (one broken), 12 ships (two broken).
    assert first.held_out_quota == (3, 3, 4)
    assert first.fingerprint(32) != image_folder.discover(str(pets), 0.2).fingerprint(32)


def test_a_held_out_image_that_cannot_be_read_is_replaced_by_another(tmp_path, pictures):
    root = tmp_path / "few"
    image_folders.make_class_folder(root, {name: pictures[name][:4] for name in CLASSES})
    for name in CLASSES:
        (root / name / "zz_broken.png").write_text("broken")
    builder = data.load_builder(str(root), str(tmp_path / "tfds"), image_size=32, validation_fraction=0.2)
    assert builder.info.splits["validation"].num_examples == 3  # One readable image of each class.
    assert builder.info.splits["train"].num_examples == 9


def test_split_folders_keep_their_splits(tmp_path, pictures):
    root = tmp_path / "split"
    image_folders.make_class_folder(root, {name: pictures[name][:6] for name in CLASSES}, prefix="train")
    image_folders.make_class_folder(root, {name: pictures[name][6:8] for name in CLASSES}, prefix="test")
    assert image_folder.held_out_split(str(root)) == "test"
    builder = data.load_builder(str(root), str(tmp_path / "tfds"), image_size=32)
    assert {split: info.num_examples for split, info in builder.info.splits.items()} == {"train": 18, "test": 6}
    assert builder.info.features["label"].names == list(CLASSES)


@pytest.mark.parametrize("make, message", [
    (lambda root, pictures: None, "no such folder"),
    (lambda root, pictures: os.symlink(root, root), "symlink loop"),
    (lambda root, pictures: (root.mkdir(), (root / "notes.txt").write_text("x")), "holds no class folders"),
    (lambda root, pictures: image_folders.make_class_folder(root, {"cat": pictures["cat"][:4]}),
     "has 1 class folder in it (cat)"),
    (lambda root, pictures: [(root / name).mkdir(parents=True) for name in CLASSES], "holds no images"),
    (lambda root, pictures: (image_folders.make_class_folder(root, {"cat": pictures["cat"][:4],
                                                                    "ship": pictures["ship"][:4]}),
                             (root / "dog").mkdir()), "class 'dog' has no image in dog/"),
    (lambda root, pictures: image_folders.make_class_folder(root, {"cat": pictures["cat"][:4],
                                                                   "ship": pictures["ship"][:1]}),
     "class 'ship' has 1 image"),
    (lambda root, pictures: (image_folders.make_class_folder(root, {"cat": pictures["cat"][:4],
                                                                    "ship": pictures["ship"][:4]}, prefix="train"),
                             image_folders.make_class_folder(root, {"cat": pictures["cat"][4:6]}, prefix="validation")),
     "class 'ship' has no held-out image in validation/ship/"),
    (lambda root, pictures: (image_folders.make_class_folder(root, {"cat": pictures["cat"][:4],
                                                                    "ship": pictures["ship"][:4]}),
                             (root / "ship" / "a.png").unlink(missing_ok=True),
                             [path.write_bytes(b"junk") for path in (root / "ship").iterdir()]),
     "class 'ship' has no readable image"),
], ids=["missing", "symlink-loop", "no-classes", "one-class", "no-images", "empty-class", "nothing-to-hold-out",
        "class-missing-from-held-out", "class-unreadable"])
def test_a_folder_no_run_can_train_on_is_refused_in_one_line_naming_what_is_wrong(tmp_path, pictures, make, message):
    root = tmp_path / "mine"
    make(root, pictures)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        data.load_builder(str(root), str(tmp_path / "tfds"), image_size=32)
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "tfds").glob("image_folder/*/*/dataset_info.json"))


def test_a_bucket_folder_is_prepared_like_a_local_one(gcs_bucket, tmp_path, pictures):
    from google.cloud import storage

    root = tmp_path / "local"
    image_folders.make_class_folder(root, {name: pictures[name][:5] for name in CLASSES})
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8junk")
    bucket = storage.Client().bucket(gcs_bucket)
    for path in root.rglob("*.*"):
        bucket.blob(f"pictures/{path.relative_to(root)}").upload_from_filename(str(path))
    uri = f"gs://{gcs_bucket}/pictures"
    builder = data.load_builder(uri, str(tmp_path / "tfds"), image_size=32, validation_fraction=0.2)
    assert builder.info.features["label"].names == list(CLASSES)
    assert {split: info.num_examples for split, info in builder.info.splits.items()} == {"validation": 3, "train": 12}
    assert [path for path, _ in folder_dataset.skipped_files(builder)] == ["cat/broken.jpg"]
    assert data.load_builder(uri, str(tmp_path / "tfds"), image_size=32, validation_fraction=0.2).data_dir == \
        builder.data_dir
    with pytest.raises(UsageError, match="no such folder"):
        data.load_builder(f"gs://{gcs_bucket}/nothing-here", str(tmp_path / "tfds"), image_size=32)


def test_a_bucket_folder_without_permission_is_refused_in_one_line(monkeypatch, tmp_path):
    with image_folders.forbidding_bucket() as (endpoint, _):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        with pytest.raises(UsageError, match="no permission to list it.*storage.objects.list") as error:
            data.load_builder("gs://private/pictures", str(tmp_path / "tfds"), image_size=32)
        assert "\n" not in str(error.value)


def test_a_run_on_a_folder_carries_its_class_names_to_the_export_metrics_and_evaluation(pets, tmp_path):
    from helpers import read_metrics
    from trainer import config as config_lib
    from trainer.results import evaluate
    from trainer.training import train

    model_dir = tmp_path / "run"
    config = config_lib.build_config(dataset=str(pets), data_dir=str(tmp_path / "tfds"), model_dir=str(model_dir),
                                     batch_size=8, epochs=1, steps_per_epoch=1, early_stopping_patience=0,
                                     precision="float32", validation_fraction=0.2)
    assert config.eval_split == "validation"
    train.run(config)
    labels = (model_dir / "export" / "assets.extra" / "labels.txt").read_text().split()
    assert labels == list(CLASSES) == read_metrics(model_dir)["class_names"]
    assert read_metrics(model_dir)["dataset"] == str(pets)
    assert "cat/broken.jpg\t" in (model_dir / folder_dataset.SKIPPED_FILES).read_text()
    results = evaluate.evaluate_run(str(model_dir))
    assert results["class_names"] == list(CLASSES) and results["num_examples"] == 6


def test_the_command_line_refuses_a_folder_in_one_line(capsys, tmp_path):
    from helpers import fails_in_process
    from trainer import task

    line = fails_in_process(capsys, task, f"--dataset={tmp_path}/absent", f"--model_dir={tmp_path}/run")
    assert "--dataset=" in line and "no such folder" in line


def test_stored_examples_are_the_ones_tfds_would_write(tmp_path, pictures):
    """The workers serialize the examples themselves; TFDS's own serializer for the builder's features agrees."""
    root = tmp_path / "few"
    image_folders.make_class_folder(root, {name: pictures[name][:3] for name in CLASSES})
    builder = folder_dataset.ImageFolderBuilder(image_folder.discover(str(root), 0.0), 32, str(tmp_path / "tfds"))
    builder.download_and_prepare()
    paths = [os.fspath(instruction.filename) for split in builder.info.splits.values()
             for instruction in split.file_instructions]
    names = []
    for record in tf.data.TFRecordDataset(paths).as_numpy_iterator():
        ours = tf.train.Example.FromString(record)
        name = ours.features.feature["file_name"].bytes_list.value[0].decode()
        label = builder.folder.class_names.index(name.split("/")[0])
        image = image_files.load_image(str(root / name), (32, 32, 3))
        expected = builder.info.features.serialize_example({"image": image, "label": label, "file_name": name})
        assert ours == tf.train.Example.FromString(expected), name
        names.append(name)
    assert sorted(names) == sorted(str(path.relative_to(root)) for path in root.glob("*/*"))


def test_prepared_shards_read_in_batches_give_tfds_examples_in_tfds_order(tmp_path, pictures, cifar_dir, monkeypatch):
    root = tmp_path / "many"
    image_folders.make_class_folder(root, {name: pictures[name] * 2 for name in CLASSES})  # 60 images.
    builder = folder_dataset.ImageFolderBuilder(image_folder.discover(str(root), 0.1), 32, str(tmp_path / "tfds"))
    # Shards of 18 examples of 32x32x3 bytes (and a little more): three of the 54 training images. The reader follows
    # TFDS's order over them, since an example's position names it for exact resume and the feature cache.
    monkeypatch.setattr(folder_dataset, "SHARD_BYTES", 18 * 32 * 32 * 3)
    builder.download_and_prepare()
    assert pixel_shards.stores_raw_pixels(builder) and builder.info.splits["train"].num_shards == 3
    assert not pixel_shards.stores_raw_pixels(tfds.builder("cifar10", data_dir=cifar_dir))
    for split in ("train", "train[10%:70%]", "validation"):
        expected = [(example["image"], int(example["label"])) for example in tfds.as_numpy(
            builder.as_dataset(split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False)))]
        for read in (data._decoded(builder, split, with_index=True), data.decoded_examples(builder, split, True)):
            examples = list(read.as_numpy_iterator())
            assert [(label, index) for _, label, index in examples] == [
                (label, index) for index, (_, label) in enumerate(expected)]
            assert all(np.array_equal(image, expected_image)
                       for (image, *_), (expected_image, _) in zip(examples, expected))
        assert read.element_spec[0].shape == (32, 32, 3) and read.element_spec[1].dtype == "int32"


def test_training_batches_read_in_place_are_the_ones_the_cache_gives(tmp_path, pictures, monkeypatch):
    """A prepared copy on this machine's disk trains from memory maps of its shards; one without the indices beside
    its shards (prepared before them) is read through tf.data's cache. Every pipeline gets the same batches from
    both, from any step, for a split and a slice of it; a shard shorter than its index is refused in one line."""
    root = tmp_path / "many"
    image_folders.make_class_folder(root, {name: pictures[name] * 2 for name in CLASSES})  # 54 training images.
    monkeypatch.setattr(folder_dataset, "SHARD_BYTES", 18 * 32 * 32 * 3)  # Three shards: batches span two.
    builder = folder_dataset.load(str(root), str(tmp_path / "tfds"), image_size=32, validation_fraction=0.1)
    pipeline = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)

    def batches(split: str) -> list[tuple[np.ndarray, ...]]:
        info = data.dataset_info(builder, split, "validation")
        inputs = data.Inputs(builder, info, train_split=split, eval_split="validation", global_batch_size=8,
                             steps_per_epoch=info.num_train_examples // 8, seed=3)
        return [tuple(part.numpy() for part in batch) for batch in inputs.training(pipeline, 0, 2, start_step=1)]

    indices = sorted(pathlib.Path(builder.data_dir).glob("*train*" + folder_records.INDEX_SUFFIX))
    assert len(indices) == 3
    for split in ("train", "train[10%:70%]"):
        assert pixel_shards.in_place(builder, split) is not None
        in_place = batches(split)
        for index in indices:
            index.rename(index.with_suffix(".aside"))
        assert pixel_shards.in_place(builder, split) is None
        cached = batches(split)
        for index in indices:
            index.with_suffix(".aside").rename(index)
        assert len(in_place) == len(cached) == 2 * (data.dataset_info(builder, split, "validation").num_train_examples
                                                    // 8) - 1
        for ours, theirs in zip(in_place, cached):
            assert ours[0].shape == (4, 32, 32, 3) and ours[0].dtype == np.uint8 and ours[1].dtype == np.int32
            assert all(np.array_equal(mine, other) for mine, other in zip(ours, theirs))
    shard = pathlib.Path(str(indices[1]).removesuffix(folder_records.INDEX_SUFFIX))
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(Failure, match="does not match its index"):
        pixel_shards.in_place(builder, "train")
