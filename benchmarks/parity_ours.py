"""Our side of the parity harness: the trainer's airbench model, optimizer, schedule, Lookahead and TTA,
run on the reference's initial weights and batch, and compared with what the reference recorded."""

import keras
import numpy as np
import tensorflow as tf

from benchmarks import parity_forms as forms
from benchmarks.parity_forms import Check
from benchmarks.parity_forms import compare
from trainer.training import airbench
from trainer import config as config_lib
from trainer.training import distribution
from trainer.training import optimization
from trainer.training import train

# Relative tolerances for float32 against float32: different convolution algorithms and summation orders
# leave differences of a few float32 ulps per layer, which grow through 10 layers and BatchNorm's division.
ACTIVATION_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5
# Running statistics: momentum 0.4 times batch statistics of activations that agree to ~3e-5.
STATISTICS_TOLERANCE = 1e-3
# A whole run of each optimizer on the same gradients: conventions that differ show up as percent-level gaps.
RUN_TOLERANCE = 1e-3
SIM_DIMENSIONS = 16


def layer_pairs() -> list[tuple[str, str]]:
    """(our layer, the reference module's output `name#call`): the GELU module runs twice per block."""
    pairs = [("whitening", "0#1"), ("whitening_gelu", "1#1")]
    for block in (1, 2, 3):
        module = block + 1
        pairs += [(f"block{block}_conv1", f"{module}.conv1#1"), (f"block{block}_pool", f"{module}.pool#1"),
                  (f"block{block}_bn1", f"{module}.norm1#1"), (f"block{block}_gelu1", f"{module}.activ#1"),
                  (f"block{block}_conv2", f"{module}.conv2#1"), (f"block{block}_bn2", f"{module}.norm2#1"),
                  (f"block{block}_gelu2", f"{module}.activ#2")]
    return pairs + [("pool", "6#1"), ("head", "7#1"), ("logits", "8#1")]


BIAS_STORAGE = np.sqrt(airbench.BIAS_LEARNING_RATE_BOOST)


def our_variable(model: keras.Model, name: str):
    """Our variable holding the reference's state entry `name`, and the factor ours = factor * reference."""
    module, *rest = name.split(".")
    field = rest[-1]
    if module == "0":
        layer = model.get_layer("whitening")
        return (layer.kernel if field == "weight" else layer.bias), 1.0
    if module == "7":
        return model.get_layer("head").kernel, 1.0
    block, part = int(module) - 1, rest[0]
    if part.startswith("conv"):
        return model.get_layer(f"block{block}_{part}").kernel, 1.0
    layer = model.get_layer(f"block{block}_bn{part[-1]}")
    if field == "bias":
        return layer.stored_bias, 1 / BIAS_STORAGE
    return {"running_mean": layer.moving_mean, "running_var": layer.moving_variance}.get(field), 1.0


def to_ours(value: np.ndarray) -> np.ndarray:
    """PyTorch layouts to Keras ones: convolutions OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def load_reference_weights(model: keras.Model, state: dict, cifar_mean, cifar_std) -> None:
    """The reference's initial state into our model; our whitening normalises with the reference's constants."""
    for name, value in state.items():
        variable, factor = our_variable(model, name)
        if variable is not None:
            variable.assign(to_ours(value) * factor)
    whitening = model.get_layer("whitening")
    whitening.mean.assign(np.asarray(cifar_mean, np.float32))
    whitening.std.assign(np.asarray(cifar_std, np.float32))


def initial_state(arrays: dict) -> dict:
    """The reference's initial state, without BatchNorm's fixed scale (ours has none; checked to be ones)."""
    state = {key[len("init/"):]: value for key, value in arrays.items() if key.startswith("init/")}
    return {name: value for name, value in state.items() if not (".norm" in name and name.endswith(".weight"))}


def build_steps(data_dir: str, epochs: int, warmup_epochs: float, model_dir: str):
    """`--recipe=fast`'s model, optimizer and steps in float32, as `trainer.task` builds them (whitening fitted)."""
    config = config_lib.build_config(recipe="fast", epochs=epochs, warmup_epochs=warmup_epochs, precision="float32",
                                     data_dir=data_dir, model_dir=model_dir, strategy="default")
    with distribution.dtype_policy("float32"):
        return train.build_steps(config, tf.distribute.get_strategy(), "float32")


def probe_model(model: keras.Model) -> keras.Model:
    return keras.Model(model.inputs, [model.get_layer(ours).output for ours, _ in layer_pairs()])


def forward_and_gradients(model, loss_fn, variables, images, labels):
    """Every layer's output, the per-example loss and the mean loss's gradients, in one training-mode call."""
    probe = probe_model(model)
    with tf.GradientTape() as tape:
        outputs = probe(tf.constant(images, tf.float32), training=True)
        per_example = loss_fn(tf.one_hot(labels, 10), outputs[-1])
        loss = tf.nn.compute_average_loss(per_example, global_batch_size=len(labels))
    gradients = tape.gradient(loss, variables)
    return [np.asarray(output) for output in outputs], per_example.numpy(), gradients


def nhwc(value: np.ndarray) -> np.ndarray:
    return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def activation_checks(outputs, arrays, prefix: str) -> list[Check]:
    checks = []
    for (ours, theirs), output in zip(layer_pairs(), outputs):
        reference = nhwc(arrays[f"{prefix}/activation/{theirs}"])
        checks.append(compare(f"forward: {ours}", output[:len(reference)], reference, ACTIVATION_TOLERANCE))
    return checks


def named_gradients(model, variables, gradients) -> dict:
    """Our gradients by the reference's parameter names, in our layout, per unit of the reference's parameter."""
    by_variable = {id(variable): np.asarray(gradient) for variable, gradient in zip(variables, gradients)}
    result = {}
    for name in reference_parameter_names(model):
        variable, factor = our_variable(model, name)
        if id(variable) in by_variable:
            # d loss / d reference = d loss / d ours * d ours / d reference = gradient * factor.
            result[name] = by_variable[id(variable)] * factor
    return result


def reference_parameter_names(model) -> list[str]:
    names = ["0.weight", "0.bias", "7.weight"]
    for module in (2, 3, 4):
        names += [f"{module}.conv1.weight", f"{module}.conv2.weight", f"{module}.norm1.bias", f"{module}.norm2.bias"]
    return names


def parameter_kind(name: str) -> str:
    if name == "0.bias":
        return "whitening bias"
    if ".norm" in name:
        return "BatchNorm biases"
    return "conv and head kernels"


def optimizer_scenarios(total_steps: int) -> dict:
    """Gradient sequences for a whole run of each optimizer: none (weight decay alone), and noisy ones."""
    rng = np.random.default_rng(1)
    noisy = 0.02 * (rng.normal(size=(total_steps, SIM_DIMENSIONS)) + 0.5)
    gradients = np.stack([np.zeros_like(noisy), noisy])
    # The reference sums the loss over its batch of 1,024; ours averages it.
    return {"optimizer_gradients": gradients * forms.REFERENCE_BATCH, "our_gradients": gradients,
            "optimizer_multipliers": forms.reference_lr_factors(total_steps),
            "optimizer_start": np.linspace(-1, 1, SIM_DIMENSIONS)}


def optimizer_options(config) -> dict:
    """create_optimizer's options beyond HEAD's: --decay_biases where the trainer has it (the proposed fix)."""
    return {"decay_biases": config.decay_biases} if hasattr(config, "decay_biases") else {}


@keras.saving.register_keras_serializable(package="parity")
class ArraySchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate of each step from an array (the reference's schedule, for the whole-run comparison)."""

    def __init__(self, values):
        self.values = tf.constant(np.asarray(values, np.float32))

    def __call__(self, step):
        return tf.gather(self.values, tf.minimum(tf.cast(step, tf.int32), tf.size(self.values) - 1))


def our_run(config, inputs: dict, variable_name: str, storage: float) -> np.ndarray:
    """Our optimizer (as `--recipe=fast` makes it) over the scenarios, on a variable named like ours are.

    `storage`: ours keeps the value divided by it (BatchNorm biases), which scales its gradient up by it.
    """
    finals = []
    schedule = ArraySchedule(config.learning_rate * inputs["optimizer_multipliers"])
    for scenario in inputs["our_gradients"]:
        variable = keras.Variable(inputs["optimizer_start"] / storage, dtype="float32", name=variable_name)
        optimizer = optimization.create_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                                  weight_decay=config.weight_decay, precision="float32",
                                                  **optimizer_options(config))
        optimizer.build([variable])
        step = tf.function(lambda gradient: optimizer.apply_gradients([(gradient, variable)]))
        for gradient in scenario:
            step(tf.constant(gradient * storage, tf.float32))
        finals.append(variable.numpy() * storage)
    return np.stack(finals)
