"""--class_weight: its syntax and checks, balanced weights from the training split's counts, the weights in
metrics.json, and a minority class's recall rising on an imbalanced folder of CIFAR-10 images."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from helpers import fails_in_process, make_config, tiny_flags
from trainer.training import class_weights
from trainer.training import data
from trainer.results import evaluate
from trainer import task
from trainer.training import train
from trainer.errors import UsageError

# 20 training images of the minority class against 400 of the majority: 20:1.
MAJORITY, MINORITY = "airplane", "frog"  # CIFAR-10 labels 0 and 6: sky-blue against green-brown.
CIFAR_LABELS = {MAJORITY: 0, MINORITY: 6}
TRAIN_COUNTS = {MAJORITY: 400, MINORITY: 20}
TEST_PER_CLASS = 100


def test_balanced_weights_are_inverse_to_the_counts_and_average_one_over_the_examples():
    counts = np.array([400, 20, 80])
    weights = class_weights.balanced(counts)
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, 500 / (3 * counts), rtol=1e-6)  # scikit-learn's n / (classes * n_c).
    assert float(np.sum(weights * counts) / counts.sum()) == pytest.approx(1.0)
    assert class_weights.balanced(np.array([10, 0, 30]))[1] == 1.0  # No training example carries it.


def test_explicit_weights_are_by_class_name_and_unnamed_classes_weigh_one():
    weights = class_weights.resolve("cat:2, dog:0.5", ("bird", "cat", "dog"), count_classes=None)
    np.testing.assert_array_equal(weights, np.array([1.0, 2.0, 0.5], np.float32))
    assert class_weights.resolve(None, ("cat",), count_classes=None) is None


@pytest.mark.parametrize("value, message", [
    ("cat:0", "--class_weight=cat:0: the weight of cat must be a positive number, not '0'"),
    ("cat:-1", "the weight of cat must be a positive number, not '-1'"),
    ("cat:x", "the weight of cat must be a positive number, not 'x'"),
    ("cat:inf", "the weight of cat must be a positive number"),
    ("cat", "--class_weight=cat: 'cat' is not NAME:WEIGHT; give 'balanced' or NAME:WEIGHT pairs"),
    ("cat:1,cat:2", "--class_weight=cat:1,cat:2 names cat twice"),
])
def test_a_malformed_value_is_refused_where_it_enters(value, message):
    with pytest.raises(UsageError) as error:
        make_config("/nowhere", "/nowhere/run", class_weight=value)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_none_turns_it_off(tmp_path):
    assert make_config("/nowhere", tmp_path, class_weight="none").class_weight is None


def test_an_unknown_class_name_is_refused_naming_the_classes(cifar_dir, tmp_path):
    with pytest.raises(UsageError) as error:
        train.run(make_config(cifar_dir, tmp_path / "run", class_weight="cat:2,unicorn:3", steps_per_epoch=1))
    assert str(error.value).startswith("--class_weight=cat:2,unicorn:3: unicorn is not a class of the "
                                       "dataset; its classes are airplane, automobile, bird, cat,")


@pytest.mark.parametrize("value, message", [
    ("cat:0", "error: --class_weight=cat:0: the weight of cat must be a positive number, not '0'."),
    ("cat:2,unicorn:3", "error: --class_weight=cat:2,unicorn:3: unicorn is not a class of the dataset; its classes "
                        "are airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck."),
])
def test_the_command_line_refuses_a_bad_value_in_one_line(cifar_dir, tmp_path, capsys, value, message):
    argv = tiny_flags(cifar_dir, tmp_path / "run", f"--class_weight={value}", "--steps_per_epoch=1")
    assert fails_in_process(capsys, task, *argv) == message


def test_tfds_class_counts_are_counted_from_the_labels(cifar_dir):
    builder = data.load_builder("cifar10", cifar_dir)
    counts = data.class_counts(builder, "train[:1000]", 10)
    examples = builder.as_dataset(split="train[:1000]", as_supervised=True)
    labels = [int(label) for _, label in tfds.as_numpy(examples)]
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=10))


@pytest.fixture(scope="module")
def imbalanced_folder(cifar_dir, tmp_path_factory):
    """ROOT/train/<class> at 20:1 and ROOT/test/<class> balanced, from CIFAR-10's train and test images."""
    root = tmp_path_factory.mktemp("imbalanced") / "pictures"
    for split, counts in (("train", TRAIN_COUNTS), ("test", dict.fromkeys(CIFAR_LABELS, TEST_PER_CLASS))):
        saved = dict.fromkeys(CIFAR_LABELS, 0)
        for image, label in tfds.as_numpy(tfds.load("cifar10", split=f"{split}[:5000]", data_dir=cifar_dir,
                                                    as_supervised=True, shuffle_files=False)):
            name = next((name for name, number in CIFAR_LABELS.items() if number == label), None)
            if name is not None and saved[name] < counts[name]:
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(root / split / name / f"{saved[name]:04d}.png")
                saved[name] += 1
        assert saved == counts, saved
    return root


def minority_recall(folder, data_dir, model_dir, **overrides) -> tuple[float, dict]:
    metrics = train.run(make_config(str(data_dir), model_dir, dataset=str(folder), train_split="train",
                                    eval_split="test", batch_size=42, epochs=3, learning_rate=3e-3,
                                    image_size=32, **overrides))
    results = evaluate.evaluate_run(str(model_dir))
    (entry,) = [entry for entry in results["classes"] if entry["name"] == MINORITY]
    return entry["recall"], metrics


def test_balanced_weights_raise_the_minority_class_recall(imbalanced_folder, tmp_path):
    plain, plain_metrics = minority_recall(imbalanced_folder, tmp_path / "data", tmp_path / "plain")
    weighted, metrics = minority_recall(imbalanced_folder, tmp_path / "data", tmp_path / "weighted",
                                        class_weight="balanced")
    assert plain_metrics["class_weights"] is None
    # From the folder's own counts: 420 / (2 * 400) and 420 / (2 * 20).
    expected = {MAJORITY: pytest.approx(0.525), MINORITY: pytest.approx(10.5)}
    assert metrics["class_weights"] == {"class_weight": "balanced", "weights": expected}
    # Measured 0.0 without weights and 0.98 with them: unweighted, the network predicts the majority only.
    assert weighted >= plain + 0.5, (plain, weighted)


def model_variables(model_dir) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / "checkpoints")))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/") and "OPTIMIZER_SLOT" not in name}


def test_weighted_training_under_mirrored_matches_the_default_strategy(cifar_dir, tmp_path):
    """Each replica weights its examples and divides by the global batch, so two replicas take the one-device
    step; weights normalised per replica, or averaged over the weights, would not."""
    common = dict(dropout=0.0, random_flip=False, brightness=0.0, steps_per_epoch=4, seed=3, optimizer="sgd",
                  learning_rate=0.05, class_weight="cat:4,ship:0.25,truck:2")
    default_metrics = train.run(make_config(cifar_dir, tmp_path / "default", strategy="default", **common))
    metrics = train.run(make_config(cifar_dir, tmp_path / "mirrored", strategy="mirrored", cpu_devices=2,
                                    **common))
    assert metrics["num_replicas"] == 2
    weights = metrics["class_weights"]["weights"]
    assert (weights["cat"], weights["dog"]) == (4.0, 1.0)
    unweighted = train.run(make_config(cifar_dir, tmp_path / "unweighted", strategy="default",
                                       **{**common, "class_weight": None}))
    default, mirrored = model_variables(tmp_path / "default"), model_variables(tmp_path / "mirrored")
    plain = model_variables(tmp_path / "unweighted")
    changed = 0
    for name in default:
        difference = np.abs(mirrored[name] - default[name]).max()
        by_the_weights = np.abs(default[name] - plain[name]).max()
        assert difference <= by_the_weights / 100, (name, difference, by_the_weights)
        changed += by_the_weights > 0
    assert changed >= 8
    first_losses = [run["history"][0]["train_loss"] for run in (unweighted, default_metrics)]
    assert first_losses[0] != pytest.approx(first_losses[1])
