"""The parity harness's checks, section by section: what our side computes against what the reference recorded."""

import keras
import numpy as np
import tensorflow as tf

from benchmarks import parity_forms as forms
from benchmarks import parity_ours as ours
from benchmarks.parity_forms import Check
from benchmarks.parity_forms import compare
from trainer.training import airbench
from trainer.training import distribution
from trainer.training import models
from trainer.training import optimization

WHITENING_SAMPLE = 500
KINDS = ("conv and head kernels", "BatchNorm biases", "whitening bias")


def initialisation_checks(model, arrays, facts, images) -> list[Check]:
    """Our initialisers and whitening fit (before the reference's weights are loaded) against the reference's."""
    state = ours.initial_state(arrays)
    ratios, dirac_differences = [], []
    for name, value in state.items():
        if value.ndim not in (2, 4) or name.startswith("0."):
            continue
        mine = keras.ops.convert_to_numpy(ours.our_variable(model, name)[0])
        reference = ours.to_ours(value)
        if value.ndim == 4:
            identity = min(reference.shape[2], reference.shape[3])
            dirac_differences.append(np.abs(mine[..., :identity] - reference[..., :identity]).max())
            mine, reference = mine[..., identity:], reference[..., identity:]
        if reference.size:  # A block's second convolution (as many outputs as inputs) is all identity.
            ratios.append(mine.std() / reference.std())
    checks = [Check("init: identity filters of the 3x3 convolutions", float(max(dirac_differences)), 0.0, 0.0,
                    judge="abs"),
              Check("init: std of random weights (ours / reference)", float(np.max(np.abs(np.array(ratios) - 1))),
                    float(np.max(np.abs(np.array(ratios) - 1))), 0.05,
                    "per layer; both draw U(-1/sqrt(fan_in), 1/sqrt(fan_in))")]
    whitening = model.get_layer("whitening")
    checks.append(compare("whitening: our fitted mean and std vs reference constants",
                          np.concatenate([whitening.mean.numpy(), whitening.std.numpy()]),
                          np.concatenate([facts["cifar_mean"], facts["cifar_std"]]), 1e-2,
                          "ours fits them to its 5,000 images; the reference uses fixed CIFAR-10 constants"))
    checks.append(whitening_output_check(model, arrays, facts, images))
    return checks


def whitening_output_check(model, arrays, facts, images) -> Check:
    """Our fitted whitening against the reference's, as functions of the same images, up to each filter's sign."""
    pixels = tf.constant(images[:WHITENING_SAMPLE], tf.float32)
    preprocessed = pixels / 255.0  # Our preprocessing of 32x32 images ("unit" style).
    mine = model.get_layer("whitening")(preprocessed).numpy()
    theirs_layer = airbench.PatchWhitening(dtype="float32")
    theirs_layer.build(preprocessed.shape)
    theirs_layer.kernel.assign(ours.to_ours(arrays["whitening_weight"]))
    theirs_layer.mean.assign(np.asarray(facts["cifar_mean"], np.float32))
    theirs_layer.std.assign(np.asarray(facts["cifar_std"], np.float32))
    theirs = theirs_layer(preprocessed).numpy()
    half = mine.shape[-1] // 2
    for index in range(half):  # An eigenvector's sign is arbitrary; its +/- pair then swaps places.
        if np.mean(mine[..., index] * theirs[..., index]) < 0:
            mine[..., [index, index + half]] = mine[..., [index + half, index]]
    return compare("whitening: output of the fitted layer (sign-aligned)", mine, theirs, 1e-2,
                   "on 500 training images; both fit 2x2 patch eigenvectors / sqrt(eigenvalue + 5e-4)")


def step_checks(steps, arrays, facts, inputs) -> list[Check]:
    """Forward, loss, gradients, one optimizer step at the peak rate, and BatchNorm statistics."""
    model, phase = steps.model, steps.phases[0]
    before = {name: ours.to_ours(value) for name, value in ours.initial_state(arrays).items()}
    outputs, per_example, gradients = ours.forward_and_gradients(
        model, steps.train_loss_fn, phase.variables, inputs["batch_images"], inputs["batch_labels"])
    checks = ours.activation_checks(outputs, arrays, "float32")
    checks.append(compare("loss: per example, label smoothing 0.2", per_example, arrays["float32/per_example_loss"],
                          ours.LOSS_TOLERANCE))
    batch = len(inputs["batch_labels"])
    checks.append(compare("loss: batch loss (ours mean, reference sum / 1024)", per_example.mean(),
                          arrays["float32/per_example_loss"].sum() / batch, ours.LOSS_TOLERANCE))
    mine = ours.named_gradients(model, phase.variables, gradients)
    for kind in KINDS:
        names = [name for name in mine if ours.parameter_kind(name) == kind]
        checks.append(float32_check(f"gradient: {kind}", {name: mine[name] for name in names}, {
            prefix: {name: ours.to_ours(arrays[f"{prefix}/gradient/{name}"]) / batch for name in names}
            for prefix in ("float32", "float64")}))
    optimizer = phase.optimizer
    phase_peak_step(optimizer)  # The reference's step, too, is taken at its schedule's peak.
    optimizer.apply_gradients(zip(gradients, phase.variables))
    checks += update_checks(model, arrays, facts, before, mine, steps.config, batch)
    checks += batch_norm_checks(model, arrays, facts)
    return checks


def phase_peak_step(optimizer) -> int:
    """Moves `optimizer` to the first step at which its schedule peaks, and returns that step."""
    peak, step = 0.0, 0
    for candidate in range(0, 2000):
        optimizer.iterations.assign(candidate)
        value = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if value > peak + 1e-9:
            peak, step = value, candidate
        elif value < peak:
            break
    optimizer.iterations.assign(step)
    return step


def update_checks(model, arrays, facts, before, gradients, config, batch) -> list[Check]:
    """One step's change per parameter kind, whole, and with each side's own weight-decay term taken out."""
    groups = {name: group for group in facts["groups"] for name in group["parameters"]}
    checks = []
    for kind in KINDS:
        names = [name for name in gradients if ours.parameter_kind(name) == kind]
        mine, my_decay, theirs, their_decay = {}, {}, {"float32": {}, "float64": {}}, {}
        for name in names:
            variable, factor = ours.our_variable(model, name)
            mine[name] = keras.ops.convert_to_numpy(variable) / factor - before[name]
            for prefix in theirs:
                theirs[prefix][name] = ours.to_ours(arrays[f"{prefix}/after/{name}"]) - before[name]
            group = groups[name]
            # The reference's first step: lr * (1 + momentum) * (gradient + weight_decay * p), in sum units.
            their_decay[name] = -group["base_lr"] * (1 + group["momentum"]) * group["weight_decay"] * before[name]
            decayed = optimizer_decays(name, config)
            my_decay[name] = -config.learning_rate * config.weight_decay * before[name] if decayed else 0.0
        checks.append(float32_check(f"one SGD step at peak lr: {kind}", mine, theirs))
        checks.append(float32_check(
            f"one SGD step, weight decay taken out: {kind}", {name: mine[name] - my_decay[name] for name in names},
            {prefix: {name: value[name] - their_decay[name] for name in names} for prefix, value in theirs.items()}))
    return checks


def relative_error(values: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(values - exact) / max(np.linalg.norm(exact), 1e-30))


def float32_check(name: str, mine: dict, theirs: dict) -> Check:
    """Ours against the reference's float64 run, allowed twice the error of the reference's own float32 run.

    At airbench's initialisation the gradients are ill-conditioned in float32 (identity convolutions, BatchNorm
    with epsilon 1e-12): the reference's float32 gradients are about 1% (relative L2) off its float64 ones. A
    fixed tolerance would judge that rounding; this judges whether ours is as close to exact as the reference.
    """
    exact = theirs["float64"]
    mine_error = max(relative_error(mine[key], exact[key]) for key in exact)
    their_error = max(relative_error(theirs["float32"][key], exact[key]) for key in exact)
    direct = max(relative_error(mine[key], theirs["float32"][key]) for key in exact)
    max_abs = max(float(np.abs(mine[key] - exact[key]).max()) for key in exact)
    return Check(f"{name} (vs float64)", max_abs, mine_error, max(2 * their_error, 1e-6),
                 f"rel column: relative L2 error, worst tensor; the reference's float32: {their_error:.2g}; "
                 f"ours vs its float32: {direct:.2g}")


def optimizer_decays(reference_name: str, config) -> bool:
    """Whether our optimizer decays the variable holding `reference_name`: measured on a same-named variable."""
    name = {"whitening bias": "bias", "BatchNorm biases": "beta"}.get(ours.parameter_kind(reference_name), "kernel")
    variable = keras.Variable(np.ones(2, np.float32), name=name)
    optimizer = optimization.create_optimizer("sgd", 1.0, momentum=0.0, weight_decay=0.5, precision="float32",
                                              **ours.optimizer_options(config))
    optimizer.apply_gradients([(tf.zeros(2), variable)])
    return bool(variable.numpy()[0] != 1.0)


def batch_norm_checks(model, arrays, facts) -> list[Check]:
    means, variances = ([], []), ([], [])
    for block in (1, 2, 3):
        for index in (1, 2):
            layer = model.get_layer(f"block{block}_bn{index}")
            module = f"{block + 1}.norm{index}"
            for (mine, theirs), variable, field in ((means, layer.moving_mean, "running_mean"),
                                                    (variances, layer.moving_variance, "running_var")):
                mine.append(variable.numpy())
                theirs.append(arrays[f"float32/after/{module}.{field}"])
    settings = facts["batch_norm"]
    layer = model.get_layer("block1_bn1")
    return [
        compare("BatchNorm: running mean after one step", np.concatenate(means[0]), np.concatenate(means[1]),
                ours.STATISTICS_TOLERANCE),
        compare("BatchNorm: running variance after one step", np.concatenate(variances[0]),
                np.concatenate(variances[1]), ours.STATISTICS_TOLERANCE,
                "PyTorch keeps the unbiased batch variance (n/(n-1)), Keras the biased one: at most 4e-5 here"),
        compare("BatchNorm: epsilon", layer.epsilon, settings["eps"], 0.0, judge="abs"),
        compare("BatchNorm: momentum (Keras m = 1 - PyTorch m)", layer.momentum, 1 - settings["momentum"], 1e-12,
                judge="abs"),
    ]


def whole_run_checks(config, inputs, arrays) -> list[Check]:
    """Each optimizer over a whole run of the reference's schedule, on the same synthetic gradients."""
    checks = []
    start = inputs["optimizer_start"]
    for kind, group, variable_name, storage in (
            ("conv and head kernels", 1, "kernel", 1.0), ("BatchNorm biases", 0, "beta", ours.BIAS_STORAGE),
            ("whitening bias", 1, "bias", 1.0)):
        mine = ours.our_run(config, inputs, variable_name, storage)
        theirs = arrays[f"optimizer/group{group}"]
        for scenario, label in enumerate(("weight decay alone", "noisy gradients")):
            checks.append(compare(f"whole-run SGD, {label}: {kind}", mine[scenario] - start,
                                  theirs[scenario] - start, ours.RUN_TOLERANCE,
                                  "displacement from the start after the reference's 476 steps"))
    return checks


def schedule_checks(steps, arrays, facts) -> list[Check]:
    phase = steps.phases[0]
    total = steps.steps_per_epoch * (phase.end_epoch - phase.first_epoch)
    mine = []
    for step in range(total):
        phase.optimizer.iterations.assign(step)
        mine.append(float(keras.ops.convert_to_numpy(phase.optimizer.learning_rate)))
    theirs = arrays["trace/learning_rates"]
    per_1024 = theirs[:, 1] * forms.REFERENCE_BATCH
    common = min(total, len(per_1024))
    checks = [
        Check("schedule: steps in the run", abs(total - len(per_1024)), abs(total - len(per_1024)) / len(per_1024),
              0.0, f"ours {total}, reference {len(per_1024)}", judge="abs"),
        compare("schedule: reference's lr matches the closed form", theirs[:, 1] / facts["groups"][1]["base_lr"],
                forms.reference_lr_factors(len(theirs)), 1e-9),
        compare("schedule: lr per step (per 1024 examples)", mine[:common], per_1024[:common], 1e-3,
                f"first step {mine[0]:.4f} vs {per_1024[0]:.4f}, last {mine[-1]:.4f} vs {per_1024[-1]:.4f}"),
        compare("schedule: BatchNorm-bias lr multiplier", airbench.BIAS_LEARNING_RATE_BOOST,
                theirs[0, 0] / theirs[0, 1], 1e-9),
    ]
    trained = arrays["trace/whitening_bias_trained"]
    whitening_bias = steps.model.get_layer("whitening").bias
    # Epochs whose phase trains the bias, up to --whiten_bias_epochs where the trainer has that option.
    window = getattr(steps.config, "whiten_bias_epochs", 0) or phase.end_epoch
    our_trained = sum(steps.steps_per_epoch for epoch in range(phase.first_epoch, min(phase.end_epoch, window))
                      if any(variable is whitening_bias for variable in steps.phase_of(epoch).variables))
    checks.append(Check("whitening bias: steps it trains", abs(our_trained - int(trained.sum())),
                        abs(our_trained - int(trained.sum())) / max(int(trained.sum()), 1), 0.0,
                        f"ours {our_trained}, reference {int(trained.sum())} (its first "
                        f"{facts['hyp']['opt']['whiten_bias_epochs']} epochs)", judge="abs"))
    return checks + lookahead_checks(steps, arrays, total)


def lookahead_checks(steps, arrays, total: int) -> list[Check]:
    """Our Lookahead's decay at every step, read off a scalar: weight 1 and slow 0 before each update."""
    lookahead = steps.lookahead
    weight = keras.Variable(1.0)
    probe = optimization.Lookahead([weight], lookahead.every, lookahead.decay)
    strategy = tf.distribute.get_strategy()
    mine = []
    for step in range(1, total + 1):
        probe.slow[0].assign(0.0)
        weight.assign(1.0)
        probe.update(strategy, step, total)
        if float(keras.ops.convert_to_numpy(weight)) != 1.0:
            mine.append((step, 1.0 - float(probe.slow[0].numpy())))
    mine.append((total, 1.0))  # Lookahead.finish ends the phase on the slow weights.
    theirs = [tuple(row) for row in arrays["trace/lookahead"]]
    closed = forms.reference_lookahead(len(arrays["trace/learning_rates"]))
    common = sorted(set(step for step, _ in mine) & set(step for step, _ in theirs))
    my_decays, their_decays = dict(mine), dict(theirs)
    return [
        compare("Lookahead: reference matches the closed form", [d for _, d in theirs], [d for _, d in closed], 1e-6),
        Check("Lookahead: update steps", float(len(set(s for s, _ in mine) ^ set(s for s, _ in theirs))), 0.0, 0.0,
              f"ours {len(mine)} updates, reference {len(theirs)}; steps in one only", judge="abs"),
        compare("Lookahead: decay at common update steps", [my_decays[s] for s in common],
                [their_decays[s] for s in common], 1e-3, "0.95^5 (step/total)^3; total differs with the run length"),
    ]


def tta_checks(model, arrays, inputs) -> list[Check]:
    """Eval-mode forward and multi-crop TTA on the reference's initial weights."""
    images = inputs["tta_images"].astype(np.float32)
    flipped = images[:, :, ::-1]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    shifted = [padded[:, :32, :32], padded[:, 2:34, 2:34]]
    views = [images, flipped] + [view for image in shifted for view in (image, image[:, :, ::-1])]
    logits = np.stack([model.predict(view, batch_size=250, verbose=0) for view in views])
    combined = forms.combine_views(logits)
    probabilities = keras.ops.convert_to_numpy(models.test_time_probabilities(model, tf.constant(images), True, 1))
    differ = float(np.mean(probabilities.argmax(-1) != arrays["tta/level2"].argmax(-1)))
    return [
        compare("eval-mode forward (running statistics)", logits[0], arrays["tta/level0"], ours.ACTIVATION_TOLERANCE),
        compare("TTA: mirror views and weights (as logits)", 0.5 * (logits[0] + logits[1]), arrays["tta/level1"],
                ours.ACTIVATION_TOLERANCE),
        compare("TTA: 6 views and weights (as logits)", combined, arrays["tta/level2"], ours.ACTIVATION_TOLERANCE),
        compare("TTA: ours = same weights over probabilities", probabilities,
                forms.combine_views(forms.softmax(logits)), 1e-5),
        Check("TTA: predictions that differ (probability vs logit mean)", differ, differ, None,
              "on the untrained initial weights: a lower bound; see the findings"),
    ]


def gelu_check(model, arrays) -> Check:
    grid = arrays["gelu/grid"].astype(np.float32)
    mine = keras.ops.convert_to_numpy(model.get_layer("whitening_gelu")(grid))
    return compare("GELU on [-6, 6] (exact erf form on both?)", mine, arrays["gelu/values"], 1e-6, judge="abs")


def precision_checks(state, facts, inputs, arrays) -> list[Check]:
    """bfloat16 (ours, this CPU) and float16 (the reference, a GPU) against float32, on the batch's first images."""
    count = arrays["float16_small/per_example_loss"].shape[0]
    images, labels = inputs["batch_images"][:count], inputs["batch_labels"][:count]
    results = {}
    for precision in ("float32", "mixed_bfloat16"):
        with distribution.dtype_policy(precision):
            network = airbench.build_airbench((32, 32, 3), 10, None, "none")
        ours.load_reference_weights(network.model, state, facts["cifar_mean"], facts["cifar_std"])
        loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2, reduction=None)
        variables = network.model.trainable_variables
        outputs, _, gradients = ours.forward_and_gradients(network.model, loss_fn, variables, images, labels)
        results[precision] = outputs[-1], ours.named_gradients(network.model, variables, gradients)
    checks = []
    for label, low, high in (("bfloat16 (ours)", results["mixed_bfloat16"], results["float32"]),
                             ("float16 (reference)", reference_precision(arrays, "float16_small"),
                              reference_precision(arrays, "float32_small"))):
        checks.append(relative_l2(f"precision: {label} vs float32, logits", low[0], high[0]))
        names = sorted(high[1])
        checks.append(relative_l2(f"precision: {label} vs float32, gradients",
                                  np.concatenate([low[1][name].ravel() for name in names]),
                                  np.concatenate([high[1][name].ravel() for name in names])))
    return checks


def relative_l2(name: str, low: np.ndarray, high: np.ndarray) -> Check:
    """Max abs difference, and (in the rel column) the error's L2 norm relative to the float32 values' norm."""
    difference = np.asarray(low, np.float64) - np.asarray(high, np.float64)
    return Check(name, float(np.abs(difference).max()), float(np.linalg.norm(difference) / np.linalg.norm(high)),
                 None, "rel column: ||low - float32|| / ||float32||")


def reference_precision(arrays, prefix):
    logits = arrays[f"{prefix}/activation/8#1"]
    gradients = {key.split("/")[-1]: ours.to_ours(value) for key, value in arrays.items()
                 if key.startswith(f"{prefix}/gradient/")}
    return logits, gradients


def all_checks(inputs, arrays, facts, *, data_dir: str, epochs: int, warmup_epochs: float, model_dir: str,
               progress=print):
    progress("our side: building --recipe=fast's steps (float32) and fitting its whitening")
    steps = ours.build_steps(data_dir, epochs, warmup_epochs, model_dir)
    state = ours.initial_state(arrays)
    checks = initialisation_checks(steps.model, arrays, facts, inputs["train_images"])
    progress("our side: schedule, Lookahead and whole-run optimizer")
    checks += schedule_checks(steps, arrays, facts)
    checks += whole_run_checks(steps.config, inputs, arrays)
    ours.load_reference_weights(steps.model, state, facts["cifar_mean"], facts["cifar_std"])
    checks.append(gelu_check(steps.model, arrays))
    progress("our side: evaluation and TTA")
    checks += tta_checks(steps.model, arrays, inputs)
    progress("our side: forward, loss, gradients and one step on the batch")
    checks += step_checks(steps, arrays, facts, inputs)
    progress("our side: bfloat16 against float32")
    checks += precision_checks(state, facts, inputs, arrays)
    return checks
