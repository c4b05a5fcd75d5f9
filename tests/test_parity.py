"""The parity harness's cheap parts (no torch): airbench94's closed forms, our side's readings, the table."""

import math

import keras
import numpy as np
import tensorflow as tf

from benchmarks import parity_checks
from benchmarks import parity_forms as forms
from benchmarks import parity_ours as ours
from trainer.training import airbench
from trainer.training import models
from trainer.training import optimization


def test_reference_schedule_closed_form():
    total = forms.reference_total_steps()
    assert total == 476  # 48 whole batches of 1,024 per epoch, 9.9 epochs, rounded up.
    factors = forms.reference_lr_factors(total)
    warmup = int(total * 0.23)
    assert math.isclose(factors[0], 0.2) and math.isclose(factors[warmup], 1.0)
    assert np.all(np.diff(factors[:warmup + 1]) > 0) and np.all(np.diff(factors[warmup:]) < 0)
    # One step short of the end of a line that reaches 0.07 at step `total`.
    assert math.isclose(factors[-1], 1 - 0.93 * (total - 1 - warmup) / (total - warmup))


def test_reference_lookahead_closed_form():
    updates = forms.reference_lookahead(476)
    assert [step for step, _ in updates[:3]] == [5, 10, 15] and updates[-1] == (476, 1.0)
    assert updates[-2][0] == 475 and math.isclose(updates[-2][1], 0.95 ** 5 * (475 / 476) ** 3)


def test_our_lookahead_follows_the_closed_form_over_a_run_of_the_same_length():
    weight = keras.Variable(1.0)
    lookahead = optimization.Lookahead([weight], 5, 0.95)
    decays = {}
    for step in range(1, 101):
        lookahead.slow[0].assign(0.0)
        weight.assign(1.0)
        lookahead.update(tf.distribute.get_strategy(), step, 100)
        if float(keras.ops.convert_to_numpy(weight)) != 1.0:
            decays[step] = 1.0 - float(lookahead.slow[0].numpy())
    expected = dict(forms.reference_lookahead(100)[:-1])
    assert sorted(decays) == sorted(expected)
    np.testing.assert_allclose([decays[step] for step in expected], list(expected.values()), atol=1e-6)


def test_peak_step_reader_finds_the_end_of_our_warmup():
    schedule = optimization.WarmupSchedule(1.5, warmup_steps=110, total_steps=480, decay="onecycle")
    optimizer = keras.optimizers.SGD(schedule)
    optimizer.build([keras.Variable(np.zeros(1, np.float32))])
    assert parity_checks.phase_peak_step(optimizer) == 109
    assert math.isclose(float(optimizer.learning_rate), 1.5, rel_tol=1e-6)


def test_our_tta_is_the_closed_form_weights_over_probabilities():
    model = airbench.build_airbench((32, 32, 3), 10, None, "none").model
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    shifted = [padded[:, :32, :32], padded[:, 2:34, 2:34]]
    views = [images, images[:, :, ::-1]] + [view for image in shifted for view in (image, image[:, :, ::-1])]
    logits = np.stack([model(view, training=False).numpy() for view in views])
    probabilities = models.test_time_probabilities(model, tf.constant(images), True, 1).numpy()
    np.testing.assert_allclose(probabilities, forms.combine_views(forms.softmax(logits)), atol=1e-6)
    assert math.isclose(sum(forms.TTA_VIEW_WEIGHTS), 1.0)


def test_reference_weights_load_into_our_layout():
    model = airbench.build_airbench((32, 32, 3), 10, None, "none").model
    rng = np.random.default_rng(0)
    state = {"2.conv1.weight": rng.normal(size=(64, 24, 3, 3)), "7.weight": rng.normal(size=(10, 256)),
             "3.norm2.bias": rng.normal(size=256), "4.norm1.running_var": rng.uniform(1, 2, size=256)}
    ours.load_reference_weights(model, state, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    kernel = model.get_layer("block1_conv1").kernel.numpy()
    np.testing.assert_allclose(kernel[1, 2, 5, 7], state["2.conv1.weight"][7, 5, 1, 2], rtol=1e-6)
    np.testing.assert_allclose(model.get_layer("head").kernel.numpy(), state["7.weight"].T, rtol=1e-6)
    layer = model.get_layer("block2_bn2")
    # Ours stores the bias divided by sqrt(64) and multiplies it back in the forward pass.
    np.testing.assert_allclose(layer.stored_bias.numpy() * 8, state["3.norm2.bias"], rtol=1e-6)
    np.testing.assert_allclose(model.get_layer("block3_bn1").moving_variance.numpy(), state["4.norm1.running_var"],
                               rtol=1e-6)
    np.testing.assert_allclose(model.get_layer("whitening").mean.numpy(), (0.5, 0.4, 0.3), rtol=1e-6)


def test_decay_probe_sees_our_optimizer_decay_kernels():
    config = type("Config", (), {})()  # HEAD's options only.
    assert parity_checks.optimizer_decays("2.conv1.weight", config)
    assert parity_checks.optimizer_decays("7.weight", config)


def test_checks_judge_their_tolerance_and_render():
    same = forms.compare("same", [1.0, 2.0], [1.0, 2.0], 1e-6)
    off = forms.compare("off", [1.0, 2.2], [1.0, 2.0], 1e-3)
    shapes = forms.compare("shapes", [1.0], [1.0, 2.0], 1e-3)
    count = forms.Check("count", 4.0, 0.01, 0.0, judge="abs")
    info = forms.compare("info", [1.0], [2.0], None)
    assert [check.status for check in (same, off, shapes, count, info)] == [
        "pass", "mismatch", "mismatch", "mismatch", "info"]
    assert math.isclose(off.max_abs, 0.2) and math.isclose(off.max_rel, 0.1)
    rendered = forms.table([same, off, info])
    assert rendered.count("\n") == 4 and "| off | 0.2 | 0.1 | rel ≤ 1e-03 | mismatch |" in rendered
