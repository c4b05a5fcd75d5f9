"""Training features: schedules, weight decay, clipping across replicas, EMA, TTA, recipes, fine-tuning."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import ROOT, make_config
from trainer import cli
from trainer import config as config_lib
from trainer.training import models
from trainer.training import optimization
from trainer import recipes
from trainer.training import train


def learning_rates(decay, warmup=0, total=100, peak=1.0):
    schedule = optimization.WarmupSchedule(peak, warmup_steps=warmup, total_steps=total, decay=decay)
    return np.array([float(schedule(step)) for step in range(total)])


def test_schedules_warm_up_then_decay_as_named():
    constant = learning_rates("constant", warmup=10)
    assert constant[0] == pytest.approx(0.1) and constant[9] == pytest.approx(1.0) and constant[-1] == 1.0
    cosine = learning_rates("cosine", warmup=10)
    assert cosine[10] == pytest.approx(1.0) and cosine[55] == pytest.approx(0.5, abs=0.02) and cosine[-1] < 0.01
    step = learning_rates("step")
    assert step[29] == 1.0 and step[30] == pytest.approx(0.1) and step[60] == pytest.approx(0.01)
    assert step[95] == pytest.approx(0.001)
    onecycle = learning_rates("onecycle")
    assert np.argmax(onecycle) == 19 and onecycle[-1] < 0.02
    assert np.all(np.diff(onecycle[:20]) > 0) and np.all(np.diff(onecycle[20:]) < 0)


def test_decoupled_weight_decay_shrinks_kernels_and_spares_biases():
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    layer.bias.assign(np.ones(3, np.float32))
    kernel = layer.kernel.numpy().copy()
    optimizer = optimization.create_optimizer("sgd", 0.1, momentum=0.0, weight_decay=0.5, precision="float32")
    optimizer.apply_gradients([(tf.zeros_like(variable.value), variable) for variable in layer.trainable_variables])
    np.testing.assert_allclose(layer.kernel.numpy(), kernel * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(layer.bias.numpy(), np.ones(3))


def test_weight_average_follows_its_formula_and_swaps_in_and_out():
    layer = keras.layers.Dense(2)
    layer.build((None, 2))
    start = layer.kernel.numpy().copy()
    average = optimization.WeightAverage(layer.weights, decay=0.9)
    layer.kernel.assign(start + 1.0)
    average.update(tf.distribute.get_strategy())
    decay = min(0.9, 2 / 11)  # The warm-up ramp after one update.
    np.testing.assert_allclose(average.averages[0].numpy(), start * decay + (start + 1.0) * (1 - decay), rtol=1e-6)
    average.swap_in()
    np.testing.assert_allclose(layer.kernel.numpy(), average.averages[0].numpy())
    average.swap_out()
    np.testing.assert_allclose(layer.kernel.numpy(), start + 1.0)


def test_tta_export_averages_the_image_and_its_mirror():
    model = models.build("cnn", image_shape=(32, 32, 3), num_classes=10, image_size=None, dropout=0.0,
                         weights="none").model
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    plain = models.inference_model(model, (32, 32, 3))(images).numpy()
    mirrored = models.inference_model(model, (32, 32, 3))(images[:, :, ::-1]).numpy()
    tta = models.inference_model(model, (32, 32, 3), tta=True)(images).numpy()
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, rtol=1e-5, atol=1e-7)
    assert not np.allclose(plain, mirrored)


def test_translate_tta_gives_the_shifted_pairs_half_the_weight():
    model = models.build("cnn", image_shape=(32, 32, 3), num_classes=10, image_size=None, dropout=0.0,
                         weights="none").model
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    flip_tta = models.inference_model(model, (32, 32, 3), tta=True)
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
    up_left, down_right = padded[:, :32, :32], padded[:, 4:36, 4:36]
    expected = (0.5 * flip_tta(images).numpy() + 0.25 * flip_tta(up_left).numpy()
                + 0.25 * flip_tta(down_right).numpy())
    translated = models.inference_model(model, (32, 32, 3), tta=True, tta_translate=2)(images).numpy()
    np.testing.assert_allclose(translated, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(translated.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(translated, flip_tta(images).numpy())


def test_lookahead_pulls_the_weights_back_to_the_slow_copy_on_its_schedule():
    layer = keras.layers.Dense(2)
    layer.build((None, 2))
    start = layer.kernel.numpy().copy()
    lookahead = optimization.Lookahead(layer.weights, every=2, decay=0.9)
    strategy = tf.distribute.get_strategy()
    layer.kernel.assign(start + 1.0)
    lookahead.update(strategy, 1, 4)  # Not a multiple of 2: nothing happens.
    np.testing.assert_allclose(layer.kernel.numpy(), start + 1.0)
    lookahead.update(strategy, 2, 4)  # Halfway through the phase: decay 0.9^2 * 0.5^3.
    decay = 0.9 ** 2 * 0.5 ** 3
    expected = start * decay + (start + 1.0) * (1 - decay)
    np.testing.assert_allclose(lookahead.slow[0].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(layer.kernel.numpy(), expected, rtol=1e-6)
    layer.kernel.assign(start + 5.0)
    lookahead.finish(strategy)  # The phase ends on the slow weights.
    np.testing.assert_allclose(layer.kernel.numpy(), expected, rtol=1e-6)


def test_ema_and_tta_change_what_evaluation_sees(cifar_dir, tmp_path):
    config = make_config(cifar_dir, tmp_path, steps_per_epoch=6, ema_decay=0.99, tta=True)
    strategy = tf.distribute.get_strategy()
    steps = train.build_steps(config, strategy, "float32")
    phase = steps.phases[0]
    steps.train(phase, steps.training_iterator(phase), 6)
    with_average = steps.evaluate()
    steps.average = None  # Evaluate the raw weights instead.
    raw = steps.evaluate()
    assert with_average["eval_loss"] != pytest.approx(raw["eval_loss"], rel=1e-4)


def test_lookahead_and_gradient_clipping_train_the_same_under_mirrored_and_each_changes_the_result(cifar_dir, tmp_path):
    """Clipping bounds the global gradient norm (across replicas, not each replica's own), and Lookahead's slow
    weights are updated alike under both strategies; a run without either option shows each one acting."""
    common = dict(dropout=0.0, random_flip=False, brightness=0.0, steps_per_epoch=6, steps_per_loop=3, seed=5,
                  optimizer="sgd", learning_rate=0.05, momentum=0.0)
    both = dict(lookahead_steps=2, clip_grad_norm=0.05)
    runs = {}
    for name, overrides in (("default", both), ("mirrored", dict(both, strategy="mirrored", cpu_devices=2)),
                            ("unclipped", dict(lookahead_steps=2)), ("no_lookahead", dict(clip_grad_norm=0.05))):
        metrics = train.run(make_config(cifar_dir, tmp_path / name, **common, **overrides))
        path = tf.train.latest_checkpoint(str(tmp_path / name / "checkpoints"))
        reader = tf.train.load_checkpoint(path)
        runs[name] = metrics["test_loss"], np.concatenate([
            reader.get_tensor(key).ravel() for key, _ in tf.train.list_variables(path)
            if key.startswith("model/") and "OPTIMIZER" not in key])
    difference = {name: np.abs(runs[name][1] - runs["default"][1]).max() for name in runs}
    assert difference["mirrored"] < 1e-4 and runs["mirrored"][0] == pytest.approx(runs["default"][0], rel=1e-4)
    for option_left_out in ("unclipped", "no_lookahead"):
        assert difference[option_left_out] > max(1e-4, 100 * difference["mirrored"]), option_left_out


def test_every_feature_at_once_trains_under_mirrored(cifar_dir, tmp_path):
    metrics = train.run(make_config(
        cifar_dir, tmp_path, strategy="mirrored", cpu_devices=2, steps_per_epoch=4, epochs=2, optimizer="sgd",
        learning_rate=0.05, weight_decay=5e-4, lr_schedule="cosine", warmup_epochs=0.5, label_smoothing=0.1,
        mixup=0.2, cutmix=1.0, translate=2, alternating_flip=True, ema_decay=0.9, lookahead_steps=2,
        clip_grad_norm=1.0, tta=True, tta_translate=1, early_stopping_patience=1))
    assert metrics["num_replicas"] == 2 and np.isfinite(metrics["test_loss"])
    assert all(np.isfinite(entry["train_loss"]) for entry in metrics["history"])
    assert os.path.exists(tmp_path / "export" / "saved_model.pb")


def test_recipes_set_their_flags_and_explicit_flags_win():
    config = config_lib.build_config(recipe="seed", model_dir="unused")
    assert (config.model, config.optimizer, config.epochs, config.early_stopping_patience) == ("cnn", "adam", 10, 5)
    assert config.random_flip and config.brightness > 0
    tuned = config_lib.build_config(recipe="finetune", epochs=3, model_dir="unused")
    assert (tuned.model, tuned.weights, tuned.epochs, tuned.fine_tune_stages) == ("resnet50", "imagenet", 3, 5)


def test_a_recipe_with_another_model_drops_its_airbench_only_setting():
    config = config_lib.build_config(recipe="fast", model="cnn", model_dir="unused")
    assert (config.model, config.whiten_bias_epochs, config.epochs) == ("cnn", 0, 10)
    with pytest.raises(config_lib.UsageError, match="--whiten_bias_epochs applies to --model=airbench only"):
        config_lib.build_config(recipe="fast", model="cnn", whiten_bias_epochs=3, model_dir="unused")


def config_of_command(command: str) -> config_lib.Config:
    """The configuration a `python -m trainer.task ...` command line resolves to."""
    flag_values = cli.flag_registry()
    config_lib.define_flags(flag_values)
    flag_values(["trainer.task", *command.split()[3:], "--model_dir=unused"])
    return config_lib.config_from_flags(flag_values)


def test_the_fast_recipe_is_what_its_readme_rows_measured():
    """docs/results.md's 10-epoch fast rows spell the parity options out; --recipe=fast must now mean exactly that."""
    runs = {run["name"]: run for run in json.loads((ROOT / "benchmarks" / "results.json").read_text())["fast"]["runs"]}
    for name, extra in (("fast-10-epochs-parity", ""), ("fast-10-epochs-parity-seed-1", " --seed=1")):
        assert config_of_command(runs[name]["command"]) == config_of_command(
            "python -m trainer.task --recipe=fast" + extra), name


# Per recipe, what shrinks it to a few steps on this machine; everything else is the recipe's own.
# The fast recipe keeps 4 of its 10 epochs: one past its whitening bias's 3.
RECIPE_SMOKE = {"seed": {}, "fast": {"epochs": 4},
                "finetune": {"weights": "none", "image_size": 32, "fine_tune_epochs": 1}}


@pytest.mark.parametrize("recipe", sorted(recipes.RECIPES))
def test_every_recipe_trains_a_few_steps(cifar_dir, tmp_path, recipe):
    assert set(RECIPE_SMOKE) == set(recipes.RECIPES), "give the new recipe a RECIPE_SMOKE entry"
    config = make_config(cifar_dir, tmp_path, recipe=recipe, batch_size=32, steps_per_epoch=2, steps_per_loop=2,
                         train_split="train[:256]", eval_split="test[:64]", **RECIPE_SMOKE[recipe])
    assert config.model == recipes.RECIPES[recipe]["flags"]["model"]
    metrics = train.run(config)
    assert metrics["epochs_completed"] == config.epochs + config.fine_tune_epochs
    assert all(np.isfinite(entry["train_loss"]) for entry in metrics["history"])
    assert metrics["flags"]["recipe"] == recipe
    assert (tmp_path / "export" / "saved_model.pb").is_file()
    if recipe == "finetune":  # ResNet50 without ImageNet weights, at a size of the user's choosing.
        assert metrics["flags"]["image_size"] == 32 and metrics["num_parameters"] > 23_000_000
        check_finetune_trained_the_head_then_every_stage_with_batchnorm_frozen(metrics, tmp_path / "checkpoints")


def check_finetune_trained_the_head_then_every_stage_with_batchnorm_frozen(metrics: dict, checkpoints):
    head, everything = metrics["phases"]
    assert (head["name"], everything["name"]) == ("train", "fine_tune")
    assert head["trainable_variables"] == 4 and everything["trainable_variables"] > 100
    # The checkpoint at the end of the head's epoch holds the backbone as it was built; the last, after fine-tuning.
    after_head, after_all = (tf.train.load_checkpoint(str(checkpoints / f"ckpt-{step}")) for step in (2, 4))
    variables = tf.train.list_variables(str(checkpoints / "ckpt-4"))
    # ResNet50's first convolution, the one 7x7x3x64 kernel, as the model's variable (not a copy or a slot).
    first_kernel = next(name for name, shape in variables if shape == [7, 7, 3, 64] and "_trainable_variables" in name)
    assert not np.allclose(after_head.get_tensor(first_kernel), after_all.get_tensor(first_kernel))  # It trains...
    # ...but a fresh backbone's zero means would have moved under training-mode BatchNorm.
    means = [name for name, _ in variables if "moving_mean" in name]
    assert means and all(np.all(after_all.get_tensor(name) == 0) for name in means)


def test_final_evaluation_and_export_agree_on_translate_tta(cifar_dir, translate_tta_run):
    from trainer.training import data

    model_dir, metrics = translate_tta_run
    export = tf.saved_model.load(str(model_dir / "export"))
    builder = data.load_builder("cifar10", cifar_dir)
    images, labels = zip(*data.decoded_examples(builder, "test[:256]").batch(256).as_numpy_iterator())
    probabilities = export.serve(images[0]).numpy()
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels[0]))
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1 / 256)
    # Same weights, but the epoch's evaluation used the flip pair only.
    assert metrics["test_loss"] != pytest.approx(metrics["history"][-1]["eval_loss"], rel=1e-5)
