"""Learning-rate schedules and weight decay as airbench94 uses them."""

import math

import keras
import numpy as np

from trainer.training import optimization


def test_onecycle_from_and_to_fractions_of_the_peak():
    schedule = optimization.WarmupSchedule(1.5, 109, 476, "onecycle", start_fraction=0.2, end_fraction=0.07)
    values = [float(schedule(step)) for step in (0, 54, 109, 476)]
    assert math.isclose(values[0], 0.3, rel_tol=1e-6) and math.isclose(values[2], 1.5, rel_tol=1e-6)
    assert math.isclose(values[1], 1.5 * (0.2 + 0.8 * 54 / 109), rel_tol=1e-6)
    assert math.isclose(values[3], 1.5 * 0.07, rel_tol=1e-6)
    # Without fractions: from near zero to zero, as before.
    plain = optimization.WarmupSchedule(1.5, 109, 476, "onecycle")
    assert math.isclose(float(plain(0)), 1.5 / 109, rel_tol=1e-6) and float(plain(476)) == 0.0


def test_decay_biases_decays_batch_norm_offsets_but_not_the_whitening_bias():
    for decay_biases, beta_decayed in ((False, False), (True, True)):
        variables = [keras.Variable(np.ones(2, np.float32), name=name) for name in ("kernel", "beta", "bias")]
        optimizer = optimization.create_optimizer("sgd", 1.0, momentum=0.0, weight_decay=0.5, precision="float32",
                                                  decay_biases=decay_biases)
        optimizer.apply_gradients([(np.zeros(2, np.float32), variable) for variable in variables])
        kernel, beta, bias = (float(variable.numpy()[0]) for variable in variables)
        assert kernel == 0.5 and (beta == 0.5) == beta_decayed and bias == 1.0
