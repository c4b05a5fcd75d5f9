"""The run configuration: every option declared once, its flag, its check and its README row made from that."""

import dataclasses
import datetime
import math
import os
import types
from typing import Callable

from absl import flags

from trainer.training import class_weights
from trainer.training import image_folder
from trainer.training import model_specs
from trainer import recipes
from trainer.errors import UsageError

ACCELERATORS = ("auto", "cpu", "gpu", "tpu")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
COMMUNICATIONS = ("auto", "ring", "nccl")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step", "onecycle")
EARLY_STOPPING_MONITORS = ("eval_accuracy", "eval_loss")

# A rule is (test, what the value must be); the message reads "--flag=value must ...".
Rule = tuple[Callable[[object], bool], str]
POSITIVE_INTEGER: Rule = (lambda value: value > 0, "must be a positive integer")
POSITIVE: Rule = (lambda value: value > 0, "must be positive")
ZERO_OR_MORE: Rule = (lambda value: value >= 0, "must be zero or more")
OFF_OR_MORE: Rule = (lambda value: value >= 0, "must be zero (off) or more")
AT_LEAST_ONE: Rule = (lambda value: value >= 1, "must be at least 1")


def option(default, help: str, *, group: str, choices: tuple[str, ...] | None = None, rule: Rule | None = None,
           resumable: bool = False, default_text: str | None = None):
    """Declares one option: a Config field whose metadata makes its flag, its check and its README row.

    resumable: the option may change when a run resumes from its checkpoint, because it moves or speeds up the
    same computation; any other change would silently alter what the checkpoint is resumed into.
    default_text: the default in words, for a default that depends on other options or the environment.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "group": group, "choices": choices, "rule": rule, "resumable": resumable,
        "default_text": default_text})


# The options by group, one small frozen dataclass each; Config joins them, so `config.batch_size` reads as
# before and the groups keep their order in the flag tables and config.json.
@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The network and its weights."""

    recipe: str | None = option(
        None, "A named group of flag values (see Recipes); flags given explicitly still win.", group="Model",
        choices=tuple(recipes.RECIPES), default_text="none")
    model: str = option(
        "cnn", f"Network to train: {model_specs.describe()}.", group="Model", choices=tuple(model_specs.SPECS))
    weights: str | None = option(
        None, "Initial backbone weights: 'imagenet', 'none', or the path of a weights file (for resnet50 the Keras "
        "no-top ResNet50 .h5; for other models a full model .weights.h5).", group="Model",
        default_text="imagenet for resnet50, else none")
    image_size: int | None = option(
        None, "Side length the network sees; images are resized on the accelerator, inside the model.",
        group="Model", rule=(lambda value: value is None or value >= 32, "must be at least 32"),
        default_text="224 for resnet50, else the dataset's")
    dropout: float = option(0.5, "Dropout rate before the cnn's output layer.", group="Model",
                            rule=(lambda value: 0 <= value < 1, "must be in [0, 1)"))


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Where the images come from and which splits train and evaluate."""

    dataset: str = option(
        "cifar10", "TFDS image-classification dataset with 'image' and 'label' (e.g. cifar100), or a folder of "
        "labelled images, local or gs://, when the value starts with /, ./, ../, ~ or gs:// (see 'Train on your own "
        "images').", group="Data")
    validation_fraction: float = option(
        image_folder.DEFAULT_VALIDATION_FRACTION, "Folder datasets laid out as ROOT/<class>/<image>: the share of "
        "each class held out as the validation split (at least one image per class; the same images on every run).",
        group="Data", rule=(lambda value: 0 < value < 1, "must be in (0, 1)"))
    data_dir: str | None = option(None, "TFDS data directory.", group="Data", resumable=True,
                                  default_text="TFDS's own, or $TFDS_DATA_DIR when set")
    train_split: str = option("train", "TFDS split to train on; slicing such as 'train[:2000]' works.", group="Data")
    eval_split: str = option("test", "TFDS split evaluated after every epoch and at the end.", group="Data",
                             resumable=True, default_text="test; for a folder, validation (test when it has "
                             "train/ and test/ only)")


@dataclasses.dataclass(frozen=True)
class HardwareOptions:
    """Devices, the distribution strategy, precision and the cluster's timeouts."""

    accelerator: str | None = option(
        None, "What the run must train on. gpu and tpu stop the run at start-up, in one line naming the likely cause, "
        "when TensorFlow sees no such device, instead of training on the CPU; tpu also means --tpu=local unless --tpu "
        "or $TPU_NAME names one. cpu hides any GPU. auto takes what there is and warns when that is the CPU.",
        group="Hardware", choices=ACCELERATORS, resumable=True,
        default_text="$TRAINER_ACCELERATOR (each image sets it to the accelerator it was built for), else auto")
    strategy: str = option(
        "auto", "tf.distribute strategy. auto: TPU if one is configured (--tpu or $TPU_NAME), multi-worker when the "
        "environment describes a cluster, mirrored on several GPUs, one_device on one GPU, default on CPU.",
        group="Hardware", choices=STRATEGIES, resumable=True)
    tpu: str | None = option(None, "TPU name or grpc:// address; 'local' on a TPU VM.", group="Hardware",
                             resumable=True, default_text="$TPU_NAME")
    devices: tuple[str, ...] = option(
        (), "Devices for one_device (one) or mirrored (several), e.g. /gpu:0,/gpu:1.", group="Hardware",
        resumable=True, default_text="all GPUs, else the CPU")
    cpu_devices: int = option(
        0, "Split the host CPU into this many logical devices, so mirrored can be tried without GPUs. 0 leaves the "
        "CPU whole.", group="Hardware", rule=ZERO_OR_MORE, resumable=True)
    precision: str = option(
        "auto", "Keras dtype policy. auto: mixed_float16 with loss scaling on GPU, mixed_bfloat16 on TPU and on CPUs "
        "that multiply bfloat16 natively (AVX512_BF16, AMX), float32 on other CPUs. Logits and loss are float32 in "
        "every case.", group="Hardware", choices=PRECISIONS)
    communication: str = option(
        "auto", "Cross-worker all-reduce for multi_worker_mirrored: ring (gRPC), nccl (GPUs), or auto.",
        group="Hardware", choices=COMMUNICATIONS, resumable=True)
    collective_timeout: int = option(
        600, "multi_worker_mirrored: seconds a collective may wait for its peers before the job fails; 0 waits "
        "forever.", group="Hardware", rule=(lambda value: value >= 0, "must be 0 or more"), resumable=True)
    heartbeat_timeout: int = option(
        30, "multi_worker_mirrored: seconds without a heartbeat after which a worker counts as dead and the job "
        "fails.", group="Hardware", rule=POSITIVE, resumable=True)
    cluster_start_timeout: int = option(
        600, "multi_worker_mirrored: seconds to wait for every worker of the cluster to start; after it the job "
        "fails in one line naming the missing ones.", group="Hardware", rule=POSITIVE, resumable=True)
    jit_compile: bool | None = option(
        None, "Compile the training and evaluation steps with XLA (TPUs always compile). XLA's CPU convolutions "
        "measured 2x slower here.", group="Hardware", resumable=True, default_text="on for GPU, off for CPU")


@dataclasses.dataclass(frozen=True)
class OptimisationOptions:
    """The optimizer, its schedule, the loss and what selects the best weights."""

    batch_size: int = option(128, "Global batch size, split evenly over all replicas.", group="Optimisation",
                             rule=POSITIVE_INTEGER)
    epochs: int = option(10, "Training epochs (for resnet50: epochs of the frozen-backbone phase).",
                         group="Optimisation", rule=ZERO_OR_MORE, resumable=True)
    optimizer: str = option("adam", "Optimizer. adamw and sgd (Nesterov) use --weight_decay.", group="Optimisation",
                            choices=OPTIMIZERS)
    learning_rate: float = option(1e-3, "Peak learning rate.", group="Optimisation", rule=POSITIVE)
    momentum: float = option(0.9, "Momentum for sgd (Nesterov).", group="Optimisation",
                             rule=(lambda value: 0 <= value < 1, "must be in [0, 1)"))
    weight_decay: float = option(
        0.0, "Decoupled weight decay for adamw and sgd; it spares biases and BatchNorm unless --decay_biases.",
        group="Optimisation", rule=ZERO_OR_MORE)
    decay_biases: bool = option(
        False, "Weight decay also shrinks biases and BatchNorm offsets (airbench94 decays its BatchNorm biases at "
        "the kernels' rate).", group="Optimisation")
    whiten_bias_epochs: int = option(
        0, "airbench: train the whitening layer's bias for the first N epochs only, then freeze it (airbench94: 3); "
        "0 trains it throughout.", group="Optimisation", rule=OFF_OR_MORE)
    lr_schedule: str = option(
        "constant", "Learning-rate schedule of each phase after the warmup: constant; cosine decay to zero; step "
        "(divide by 10 at 30%, 60% and 90%); onecycle (linear rise, for 20% of the phase without --warmup_epochs, "
        "then linear decay to zero).", group="Optimisation", choices=LR_SCHEDULES)
    warmup_epochs: float = option(0.0, "Linear learning-rate warmup from zero, in epochs.", group="Optimisation",
                                  rule=ZERO_OR_MORE)
    lr_start_fraction: float = option(
        0.0, "The warmup starts at this fraction of --learning_rate instead of near zero (airbench94: 0.2).",
        group="Optimisation", rule=(lambda value: 0 <= value <= 1, "must be in [0, 1]"))
    lr_end_fraction: float = option(
        0.0, "onecycle decays to this fraction of --learning_rate instead of zero (airbench94: 0.07).",
        group="Optimisation", rule=(lambda value: 0 <= value <= 1, "must be in [0, 1]"))
    label_smoothing: float = option(0.0, "Label smoothing of the training loss (0.1 is typical).",
                                    group="Optimisation", rule=(lambda value: 0 <= value < 1, "must be in [0, 1)"))
    class_weight: str | None = option(
        None, "Weight each training example's loss by its class: 'balanced' (inversely proportional to the class's "
        "examples in --train_split, averaging 1 over them, as scikit-learn's) or NAME:WEIGHT pairs such as "
        "cat:2,dog:0.5 (unnamed classes weigh 1; 'none' turns it off). metrics.json records the weights.",
        group="Optimisation", default_text="none")
    clip_grad_norm: float = option(
        0.0, "Clip the global gradient norm (over all replicas' summed gradient) to this; 0 turns clipping off.",
        group="Optimisation", rule=OFF_OR_MORE)
    ema_decay: float = option(
        0.0, "Keep an exponential moving average of the weights with this decay (e.g. 0.999) and use it for "
        "evaluation, best-weight selection and the export; 0 turns it off.", group="Optimisation",
        rule=(lambda value: 0 <= value < 1, "must be in [0, 1), e.g. 0.999"))
    lookahead_steps: int = option(
        0, "Lookahead (hlb-CIFAR10, airbench): every N steps, move a slow copy of the weights toward the weights and "
        "continue training from it. Its decay rises along a cubic ramp over each phase to --lookahead_decay^N, and "
        "the phase ends on the slow weights. 0 turns it off.", group="Optimisation", rule=OFF_OR_MORE)
    lookahead_decay: float = option(
        0.95, "Per-step decay of --lookahead_steps' slow weights at the end of a phase.", group="Optimisation",
        rule=(lambda value: 0 < value < 1, "must be in (0, 1)"))
    tta: bool = option(
        False, "Flip test-time augmentation: evaluate (and export) the average of the predictions for each image and "
        "its mirror image.", group="Optimisation")
    tta_translate: int = option(
        0, "With --tta, also average over the image and its mirror shifted N pixels up-left and down-right (reflect "
        "padding); the shifted views share half the weight, as in airbench's multi-crop TTA. They triple the cost "
        "of an evaluation, so only the final evaluation and the export use them. 0 turns it off.",
        group="Optimisation", rule=(lambda value: value >= 0, "must be zero (off) or more pixels"))
    seed: int = option(0, "Seed for weights, data order and augmentation.", group="Optimisation")
    early_stopping_patience: int = option(
        5, "Stop a phase after this many epochs without improvement of --early_stopping_monitor, and finish with the "
        "best weights. 0 turns early stopping off.", group="Optimisation",
        rule=(lambda value: value >= 0, "must be zero (off) or more"), resumable=True)
    early_stopping_monitor: str = option("eval_accuracy", "Metric that early stopping and best-weight selection "
                                         "watch.", group="Optimisation", choices=EARLY_STOPPING_MONITORS)


@dataclasses.dataclass(frozen=True)
class FineTuningOptions:
    """ResNet50's second phase, which trains the backbone's last stages."""

    fine_tune_epochs: int = option(
        0, "resnet50 only: epochs of a second phase that unfreezes the top --fine_tune_stages stages of the "
        "backbone. BatchNorm stays in inference mode.", group="Fine-tuning (resnet50)", rule=ZERO_OR_MORE,
        resumable=True)
    fine_tune_learning_rate: float | None = option(
        None, "Peak learning rate of the fine-tuning phase.", group="Fine-tuning (resnet50)", rule=POSITIVE,
        default_text="--learning_rate / 10")
    fine_tune_stages: int = option(
        2, "How many of ResNet50's five stages, counted from the top, the fine-tuning phase unfreezes (5 unfreezes "
        "everything).", group="Fine-tuning (resnet50)", rule=(lambda value: 1 <= value <= 5, "must be 1 to 5"))


@dataclasses.dataclass(frozen=True)
class AugmentationOptions:
    """Augmentation on the accelerator, and the features cached for a frozen backbone."""

    random_flip: bool = option(True, "Random horizontal flips.", group="Augmentation (on the accelerator)")
    alternating_flip: bool = option(
        False, "With --random_flip: flip a random half of the examples in the first epoch and flip each example in "
        "every other epoch after that (airbench), so every example is seen both ways every two epochs.",
        group="Augmentation (on the accelerator)")
    brightness: float = option(
        0.2, "Maximum random brightness change, as a fraction of the pixel range; 0 turns it off.",
        group="Augmentation (on the accelerator)", rule=(lambda value: 0 <= value <= 1, "must be in [0, 1]"))
    translate: int = option(
        0, "Random translation of up to this many pixels (reflect padding); 0 turns it off.",
        group="Augmentation (on the accelerator)", rule=(lambda value: value >= 0, "must be zero or more pixels"))
    augment_views: int = option(
        0, "0: every step draws a fresh random transform. N > 0: each example gets N fixed transforms and uses one "
        "of them per epoch, which lets --cache_features compute a frozen backbone's features once per view.",
        group="Augmentation (on the accelerator)", rule=ZERO_OR_MORE)
    cache_features: bool = option(
        False, "While the backbone is frozen (resnet50 before fine-tuning), compute its features once per "
        "augmentation view and train the head on them; later epochs then cost almost nothing. Needs "
        "--augment_views when augmenting, and no mixup/CutMix.", group="Augmentation (on the accelerator)")
    mixup: float = option(0.0, "Mixup with Beta(alpha, alpha) blending (0.2 is typical); 0 turns it off.",
                          group="Augmentation (on the accelerator)", rule=OFF_OR_MORE)
    cutmix: float = option(
        0.0, "CutMix with Beta(alpha, alpha) box sizes (1.0 is typical); 0 turns it off. With --mixup, each batch "
        "uses one of the two.", group="Augmentation (on the accelerator)", rule=OFF_OR_MORE)


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """The training loop's cadence and where its outputs go."""

    model_dir: str | None = option(
        None, "Where checkpoints, logs, the export and metrics go; local or gs://.", group="Loop and outputs",
        resumable=True, default_text="$AIP_MODEL_DIR (Vertex AI), else runs/<model>-<time>")
    force_unlock: bool = option(
        False, "Take over the run lock of a gs:// --model_dir whose holder is dead (a crashed job elsewhere); a live "
        "holder would then be overwritten, so check first. Local locks free themselves when their process dies.",
        group="Loop and outputs", resumable=True)
    storage_retry_seconds: int = option(
        600, "gs:// --model_dir: how long Cloud Storage may stay unreachable, with training going on and uploads "
        "retried with backoff, before the job stops with exit status 75 (rerun it to resume).",
        group="Loop and outputs", rule=POSITIVE_INTEGER, resumable=True)
    steps_per_epoch: int | None = option(
        None, "Cap on training steps per epoch, for smoke runs.", group="Loop and outputs",
        rule=(lambda value: value is None or value > 0, "must be at least 1 (leave it out for whole epochs)"),
        default_text="a whole epoch")
    steps_per_loop: int = option(
        50, "Training steps per tf.function call; progress and NaN checks happen between calls.",
        group="Loop and outputs", rule=AT_LEAST_ONE, resumable=True)
    checkpoint_steps: int = option(
        0, "Also checkpoint every this many steps (rounded up to a whole loop); 0 checkpoints once per epoch.",
        group="Loop and outputs", rule=ZERO_OR_MORE, resumable=True)
    log_upload_seconds: int = option(
        60, "For a gs:// run: send new TensorBoard events to the bucket at least this often, between checkpoints "
        "as well, so TensorBoard (and Vertex AI TensorBoard) shows a long epoch while it runs.",
        group="Loop and outputs", rule=POSITIVE_INTEGER, resumable=True)
    profile_steps: tuple[int, int] | None = option(
        None, "Two global steps A,B: capture a TensorFlow profiler trace from step A to step B into the TensorBoard "
        "logs (view it with the tensorboard-plugin-profile package).", group="Loop and outputs", resumable=True,
        default_text="none")



@dataclasses.dataclass(frozen=True)
class Config(LoopOptions, AugmentationOptions, FineTuningOptions, OptimisationOptions, HardwareOptions, DataOptions,
             ModelOptions):
    """Everything a run needs, validated; made by `build_config` or `config_from_flags`. Dataclasses take the
    fields of their bases from the last base to the first: the groups in this order keep ModelOptions' first."""

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.fine_tune_epochs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OPTIONS = dataclasses.fields(Config)
# Options that may differ between a run and its resumption (see `option`).
RESUMABLE_OPTIONS = frozenset(field.name for field in OPTIONS if field.metadata["resumable"])


# Flags.

def _value_type(field: dataclasses.Field) -> type:
    """The option's type without None: int for `int | None`, tuple for `tuple[str, ...]`."""
    annotation = field.type
    if isinstance(annotation, types.UnionType):
        annotation = next(member for member in annotation.__args__ if member is not type(None))
    return getattr(annotation, "__origin__", annotation)


def define_flags(flag_values: flags.FlagValues) -> flags.FlagValues:
    """Defines one absl flag per option in `flag_values` (the entry point's registry) and returns it."""
    for field in OPTIONS:
        _define_flag(field, flag_values, field.default, field.metadata["default_text"])
    return flag_values


def define_option_flag(name: str, flag_values: flags.FlagValues, default, default_text: str | None = None,
                       note: str = "") -> None:
    """Defines option `name`'s flag in another tool's registry (trainer.evaluate's), with that tool's default and
    its declared help, so the two cannot drift; check its value with `check_option`."""
    field = next(field for field in OPTIONS if field.name == name)
    _define_flag(field, flag_values, default, default_text, note)


def _define_flag(field: dataclasses.Field, flag_values: flags.FlagValues, default, default_text: str | None,
                 note: str = "") -> None:
    help_text = field.metadata["help"] + (f" {note}" if note else "")
    if default_text:
        help_text += f" Default: {default_text}."
    if field.name == "recipe":
        help_text += " " + recipes.describe()
    kind = _value_type(field)
    arguments = dict(name=field.name, default=None if kind is tuple else default, help=help_text,
                     flag_values=flag_values, module_name=__name__)
    if field.metadata["choices"]:
        flags.DEFINE_enum(enum_values=field.metadata["choices"], **arguments)
    elif kind is tuple:
        flags.DEFINE_list(**arguments)
    else:
        define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                  str: flags.DEFINE_string}[kind]
        define(**arguments)


def config_from_flags(flag_values: flags.FlagValues) -> Config:
    """The run configuration the parsed command line asks for: defaults, then the recipe, then the
    flags given explicitly (on the command line or in a --flagfile)."""
    return build_config(**{field.name: flag_values[field.name].value for field in OPTIONS
                           if flag_values[field.name].present or field.name == "recipe"})


# The configuration.

def build_config(**values) -> Config:
    """The options' defaults overridden by the recipe, then by `values`, with dependent defaults filled in;
    validated."""
    unknown = set(values) - {field.name for field in OPTIONS}
    if unknown:
        raise TypeError(f"Unknown config fields: {sorted(unknown)}")
    merged = {field.name: field.default for field in OPTIONS}
    recipe = values.get("recipe")
    if recipe is not None:
        if recipe not in recipes.RECIPES:
            raise UsageError(f"--recipe={recipe} is unknown; choose one of {', '.join(recipes.RECIPES)}.")
        merged.update(recipes.RECIPES[recipe]["flags"])
    merged.update(values)
    merged["devices"] = tuple(merged["devices"] or ())
    merged["profile_steps"] = _profile_steps(merged["profile_steps"])
    if merged["class_weight"] in ("", "none"):
        merged["class_weight"] = None
    merged["tpu"] = merged["tpu"] or os.environ.get("TPU_NAME") or None
    if not merged["accelerator"]:
        merged["accelerator"] = os.environ.get("TRAINER_ACCELERATOR") or "auto"
        if merged["accelerator"] not in ACCELERATORS:
            raise UsageError(f"$TRAINER_ACCELERATOR={merged['accelerator']} is unknown; use one of "
                             f"{', '.join(ACCELERATORS)}, or give --accelerator.")
    if merged["accelerator"] == "tpu" and merged["tpu"] is None:
        merged["tpu"] = "local"  # The TPU a TPU VM or a GKE TPU pod has attached.
    spec = model_specs.SPECS.get(merged["model"])
    if spec is not None:  # An unknown --model is named by validate.
        _apply_model_defaults(merged, spec, given=values)
    _folder_defaults(merged, values)
    if merged["fine_tune_learning_rate"] is None:
        merged["fine_tune_learning_rate"] = merged["learning_rate"] / 10
    if not merged["model_dir"]:
        merged["model_dir"] = default_model_dir(merged["model"])
    config = Config(**merged)
    validate(config)
    return config


def _apply_model_defaults(merged: dict, spec: model_specs.ModelSpec, given: dict) -> None:
    """The network's own defaults; a recipe's model-specific option does not follow --model to another network."""
    if merged["weights"] is None:
        merged["weights"] = spec.default_weights
    if merged["image_size"] is None:
        merged["image_size"] = spec.default_image_size
    for option_name, unused in model_specs.MODEL_SPECIFIC_OPTIONS.items():
        if option_name not in given and option_name not in spec.options:
            merged[option_name] = unused


def _folder_defaults(merged: dict, values: dict) -> None:
    """A folder of images evaluates on its held-out split unless --eval_split says otherwise."""
    if image_folder.is_folder(merged["dataset"]) and "eval_split" not in values:
        merged["eval_split"] = image_folder.held_out_split(merged["dataset"])


def _profile_steps(value) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        first, last = (int(step) for step in value)
    except ValueError as error:
        raise UsageError(f"--profile_steps={','.join(map(str, value))} must be two step numbers A,B "
                         "(e.g. 100,110).") from error
    if not 0 < first <= last:
        raise UsageError(f"--profile_steps={first},{last} needs 0 < A <= B.")
    return first, last


def default_model_dir(model: str) -> str:
    """Vertex AI's output directory when it set one, else a new timestamped local directory."""
    if os.environ.get("AIP_MODEL_DIR"):
        return os.environ["AIP_MODEL_DIR"]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{model}-{stamp}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def validate(config: Config) -> None:
    """Rejects values no run could use, naming the flag and what is allowed: each option's own rule, then the
    rules that tie options together."""
    for field in OPTIONS:
        _check_value(field, getattr(config, field.name))
    _require(config.tta or not config.tta_translate, f"--tta_translate={config.tta_translate} needs --tta.")
    _require(config.random_flip or not config.alternating_flip, "--alternating_flip needs --random_flip.")
    _require(not (config.alternating_flip and config.augment_views),
             "--alternating_flip and --augment_views both fix each example's flips; use one of them.")
    if config.class_weight is not None:
        class_weights.parse(config.class_weight)  # Its class names are checked once the dataset is loaded.
    _validate_feature_cache(config)
    _validate_model_options(config)
    _validate_weights(config)


def check_option(name: str, value) -> None:
    """Option `name`'s own rule on a value given to another tool (see `define_option_flag`)."""
    _check_value(next(field for field in OPTIONS if field.name == name), value)


def _check_value(field: dataclasses.Field, value) -> None:
    choices, rule = field.metadata["choices"], field.metadata["rule"]
    if choices and value is not None:
        _require(value in choices, f"--{field.name}={value} is unknown; choose one of {', '.join(choices)}.")
    if isinstance(value, float):
        _require(math.isfinite(value), f"--{field.name}={value} must be a finite number.")
    if rule is not None and value is not None:
        test, requirement = rule
        _require(test(value), f"--{field.name}={value} {requirement}.")


def _validate_model_options(config: Config) -> None:
    spec = model_specs.SPECS[config.model]
    for option_name, unused in model_specs.MODEL_SPECIFIC_OPTIONS.items():
        if option_name == "cache_features":
            continue  # _validate_feature_cache says why in its own words.
        models = " or --model=".join(model_specs.models_taking(option_name))
        _require(getattr(config, option_name) == unused or option_name in spec.options,
                 f"--{option_name} applies to --model={models} only, not --model={config.model}.")


def _validate_feature_cache(config: Config) -> None:
    if not config.cache_features:
        return
    _require("cache_features" in model_specs.SPECS[config.model].options,
             f"--cache_features needs a frozen backbone; --model={config.model} has none.")
    _require(config.mixup == 0 and config.cutmix == 0,
             "--cache_features cannot reproduce --mixup/--cutmix, which blend pixels before the backbone; turn "
             "them off or drop --cache_features.")
    augmenting = config.random_flip or config.brightness > 0 or config.translate > 0
    _require(config.augment_views > 0 or not augmenting,
             "--cache_features with augmentation needs --augment_views=N (e.g. 2): features can be cached for a "
             "finite set of views only.")


def _validate_weights(config: Config) -> None:
    if config.weights in ("none", "imagenet"):
        _require(config.weights == "none" or model_specs.SPECS[config.model].imagenet_weights,
                 f"--weights=imagenet: --model={config.model} has no ImageNet weights; use --weights=none "
                 "or a weights file.")
        return
    _require(os.path.isfile(config.weights),
             f"--weights={config.weights}: no such file; give 'imagenet', 'none' or the path of a weights file.")


# The README's flag tables.

def _default_cell(field: dataclasses.Field) -> str:
    if field.metadata["default_text"]:
        return field.metadata["default_text"]
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    return f"`{field.default}`"


def markdown() -> str:
    """The README's flag tables, one per group (tests check that the README holds exactly this)."""
    sections, group = [], None
    for field in OPTIONS:
        if field.metadata["group"] != group:
            group = field.metadata["group"]
            sections.append(f"\n**{group}**\n\n| Flag | Default | Meaning |\n|---|---|---|")
        choices = field.metadata["choices"]
        meaning = field.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        if field.metadata["resumable"]:
            meaning += " May change when a run resumes."
        sections.append(f"| `--{field.name}` | {_default_cell(field)} | {meaning} |")
    return "\n".join(sections).lstrip("\n") + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
